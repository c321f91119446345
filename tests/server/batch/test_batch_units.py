"""The batch command's parts that need no model: input kinds, the crash-safe output, levels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.batch import inputs
from server.batch.config import BatchSettings, parse_cli
from server.batch.output import Writer, done_keys, key, repair
from server.batch.prepare import levels_for
from tests.support.images import png_bytes


def test_input_kinds_are_told_apart_by_content(tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "z.png").write_bytes(png_bytes(1))
    (folder / "a" / "b" / "y.JPG").write_bytes(b"x")
    (folder / "a" / "notes.txt").write_text("not an image")
    manifest = tmp_path / "list.txt"  # the name does not matter, the content does
    manifest.write_text('\n{"id": "k", "image": "z.png"}\n')
    batch = tmp_path / "req.jsonl"
    batch.write_text(json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {}}))
    assert inputs.detect(folder) == "folder"
    assert inputs.detect(manifest) == "manifest"
    assert inputs.detect(batch) == "openai"
    assert [i.id for i in inputs.read(folder)] == ["a/b/y.JPG", "z.png"]  # recursive, sorted, images only
    assert inputs.count(folder, "folder") == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    for bad in (empty, tmp_path / "missing"):
        with pytest.raises(inputs.InputError):
            inputs.detect(bad)
    text = tmp_path / "plain.txt"
    text.write_text("hello\n")
    with pytest.raises(inputs.InputError, match="not JSON"):
        inputs.detect(text)


def test_manifest_lines_become_items_or_errors(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    lines = [
        '{"id": 7, "image": "sub/p.png", "conservativeness": "focused"}',
        '{"image": "q.png"}',
        "not json",
        '{"id": "noimg"}',
        '{"id": "uri", "image": "data:image/png;base64,AAAA"}',
    ]
    manifest.write_text("\n".join(lines) + "\n")
    items = list(inputs.read(manifest))
    assert [i.id for i in items] == ["7", "q.png", "line-3", "noimg", "uri"]
    assert items[0].image == str(tmp_path / "sub" / "p.png") and items[0].fields == {"conservativeness": "focused"}
    assert items[2].error is not None and items[2].error.code == "invalid_json"
    assert items[3].error is not None and items[3].error.param == "image"
    assert items[4].image is not None and items[4].image.startswith("data:")
    # Items travel to Ray actors as JSON and come back the same.
    for item in items:
        back = inputs.item_from_dict(json.loads(json.dumps(inputs.item_to_dict(item))))
        assert (back.id, back.image, back.fields, back.body) == (item.id, item.image, item.fields, item.body)
        assert (back.error and back.error.body()) == (item.error and item.error.body())


def test_openai_lines_for_other_endpoints_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    rows = [
        {"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
        {"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {}},
        {"custom_id": "nobody", "method": "POST", "url": "/v1/chat/completions"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = list(inputs.read(path))
    assert items[0].body == {"messages": []} and items[0].error is None
    assert items[1].error is not None and items[1].error.param == "url"
    assert items[2].error is not None and items[2].error.status == 400


def test_a_partial_last_line_is_cut_before_appending(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with Writer(out) as w:
        w.write({"id": "a", "conservativeness": 0.0, "caption": "x", "error": None})
        w.write({"id": "b", "conservativeness": 0.0, "caption": "y", "error": None})
    whole = out.read_bytes()
    with out.open("ab") as f:
        f.write(b'{"id": "c", "conserv')  # a run killed mid-line (and a power loss's zero tail)
        f.write(b"\0\0\0")
    assert repair(out) == len(b'{"id": "c", "conserv') + 3
    assert out.read_bytes() == whole
    with out.open("ab") as f:
        f.write(b'{"id": "c"')
    with Writer(out) as w:  # opening for a run repairs too
        w.write({"id": "c", "conservativeness": 0.0, "caption": "z", "error": None})
    lines = out.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "c"]
    assert done_keys(out) == {key("a", 0.0), key("b", 0.0), key("c", 0.0)}
    assert repair(tmp_path / "none.jsonl") == 0


def test_levels_per_item() -> None:
    folder_item = inputs.Item(id="a.png", image="a.png")
    own = inputs.Item(id="b", image="b.png", fields={"conservativeness": "balanced"})
    chat = inputs.Item(id="r", body={"messages": []})
    chat_own = inputs.Item(id="r2", body={"messages": [], "conservativeness": 1})
    assert levels_for(folder_item, [0.0, 1.0], 0.5) == [0.0, 1.0]
    assert levels_for(folder_item, None, 0.5) == [0.5]
    assert levels_for(own, [0.0, 1.0], 0.5) == ["balanced"]
    assert levels_for(chat, None, 0.5) == [None]  # the request as written
    assert levels_for(chat, [0.0, 1.0], 0.5) == [0.0, 1.0]
    assert levels_for(chat_own, [0.0, 1.0], 0.5) == [1]


def test_cli_contract_flags(tmp_path: Path) -> None:
    s = parse_cli(
        ["--model", "m", "--input", "in", "--output", "o.jsonl", "--levels", "0,0.5,focused", "--prompt", "Say",
         "--max-tokens", "9", "--ray", "--workers", "3", "--ray-address", "auto", "--engine", "transformers",
         "--max-batch-size", "4", "--vllm.enforce-eager", "true"]
    )  # fmt: skip
    assert isinstance(s, BatchSettings)
    assert s.level_list() == [0.0, 0.5, "focused"]
    assert (s.prompt, s.max_tokens, s.ray, s.workers, s.ray_address) == ("Say", 9, True, 3, "auto")
    assert (s.engine, s.max_batch_size, s.vllm.enforce_eager) == ("transformers", 4, True)
    assert parse_cli(["--model", "m", "--input", "i", "--output", "o"]).level_list() is None
