"""The batch command on the reference engine (the tiny LLaVA behind the package's live server): each input kind,
levels, bad items, results equal to the API's, and resume after a kill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.batch import api_caption, batch_settings, by_key, image_folder, run_in_process
from tests.support.images import data_uri, png_bytes
from tests.support.live_server import LiveServer
from tests.support.repo import REPO
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

LEVELS = [0.0, 0.5, 1.0]


def test_folder_at_each_level_equals_the_caption_api(server: LiveServer, tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "pics", 4)
    big = folder / "sub" / "huge.png"
    big.write_bytes(png_bytes(9, size=(600, 600)))  # over the server's pixel limit (512 x 512): a 413, as the API
    out = tmp_path / "out.jsonl"
    summary = run_in_process(
        batch_settings(server.settings, input=folder, output=out, levels="0,0.5,1"), engine=server.engine
    )
    got = by_key(out)
    ids = ["broken.jpg", "img000.png", "img001.png", "img003.png", "sub/huge.png", "sub/img002.png"]
    assert sorted({k[0] for k in got}) == ids and len(got) == len(ids) * len(LEVELS)
    assert summary["failures"] == 2 * len(LEVELS) and summary["this_run"]["images"] == 4
    for level in LEVELS:
        broken = got[("broken.jpg", json.dumps(level))]
        assert broken["status_code"] == 415 and broken["error"]["code"] == "unsupported_image"
        assert set(broken["error"]) == {"message", "type", "param", "code"}
        assert got[("sub/huge.png", json.dumps(level))]["error"]["code"] == "image_too_large"
    with server.client() as client:
        for name in ("img000.png", "img001.png", "sub/img002.png", "img003.png"):
            png = (folder / name).read_bytes()
            for level in LEVELS:
                rec = got[(name, json.dumps(level))]
                api = api_caption(client, png, level)
                assert rec["error"] is None
                assert rec["caption"] == api["caption"], (name, level)
                assert rec["usage"] == api["usage"] and rec["alignment"] == api["alignment"]
                assert rec["telemetry"] == api["telemetry"]
                assert rec["timings"]["engine_ms"] > 0
    # Not vacuous: the levels ran differently (contrast above 0).
    assert any(got[(n, "0.0")]["telemetry"] != got[(n, "1.0")]["telemetry"] for n in ("img000.png", "img001.png"))
    assert summary["levels"]["0.5"]["mean_telemetry"]["contrast_steps"] > 0


def test_manifest_fields_and_bad_lines(server: LiveServer, tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes(21))
    uri_png = png_bytes(22)
    lines = [
        {"id": "a", "image": "imgs/a.png"},
        {"id": "uri", "image": data_uri(uri_png), "conservativeness": "focused", "prompt": "What is it?"},
        {"id": "short", "image": "imgs/a.png", "max_tokens": 2},
        {"id": "typo", "image": "imgs/a.png", "conservativness": 1},
        {"id": "gone", "image": "imgs/missing.png"},
        {"id": "knob", "image": "imgs/a.png", "conservativeness": 3},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{broken\n")
    out = tmp_path / "out.jsonl"
    run_in_process(batch_settings(server.settings, input=manifest, output=out, max_tokens=6), engine=server.engine)
    got = {k[0]: v for k, v in by_key(out).items()}
    assert set(got) == {"a", "uri", "short", "typo", "gone", "knob", "line-7"}
    assert got["typo"]["error"]["param"] == "conservativness" and got["typo"]["status_code"] == 400
    assert got["gone"]["error"]["code"] == "image_not_found"
    assert got["knob"]["error"]["code"] == "invalid_alignment" and got["knob"]["conservativeness"] == 3
    assert got["line-7"]["error"]["code"] == "invalid_json"
    assert got["short"]["usage"]["completion_tokens"] <= 2
    assert got["a"]["conservativeness"] == server.settings.default_conservativeness  # no --levels: the default
    with server.client() as client:
        api = api_caption(client, uri_png, "focused", prompt="What is it?", max_tokens=6)
        assert got["uri"]["caption"] == api["caption"] and got["uri"]["alignment"] == api["alignment"]
        api_a = api_caption(client, (tmp_path / "imgs" / "a.png").read_bytes(), 0.5, max_tokens=6)
        assert got["a"]["caption"] == api_a["caption"]


def test_openai_batch_file_is_answered_in_the_batch_output_format(server: LiveServer, tmp_path: Path) -> None:
    png = png_bytes(31)

    def line(custom_id: str, url: str = "/v1/chat/completions", **body: object) -> str:
        content = [{"type": "image_url", "image_url": {"url": data_uri(png)}}, {"type": "text", "text": "Describe."}]
        full = {"messages": [{"role": "user", "content": content}], "max_tokens": 6, **body}
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": full}) + "\n"

    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        line("plain") + line("focused", conservativeness="focused") + line("n2", n=2) + line("emb", "/v1/embeddings")
    )
    out = tmp_path / "out.jsonl"
    run_in_process(batch_settings(server.settings, input=batch, output=out), engine=server.engine)
    got = {k[0]: v for k, v in by_key(out).items()}
    assert set(got) == {"plain", "focused", "n2", "emb"}
    for name in ("plain", "focused"):
        rec = got[name]
        assert rec["id"].startswith("batch_req_") and rec["error"] is None and "conservativeness" not in rec
        assert rec["response"]["status_code"] == 200
        body = rec["response"]["body"]
        assert body["object"] == "chat.completion" and body["id"] == rec["response"]["request_id"]
        with server.client() as client:
            want = json.loads(line(name, **({"conservativeness": "focused"} if name == "focused" else {})))["body"]
            api = client.post("/v1/chat/completions", json=want).json()
        assert body["choices"][0]["message"]["content"] == api["choices"][0]["message"]["content"]
        assert body["alignment"] == api["alignment"] and body["usage"] == api["usage"]
    assert got["n2"]["response"]["status_code"] == 400 and got["n2"]["error"]["param"] == "n"
    assert got["n2"]["response"]["body"] == {"error": got["n2"]["error"]}
    assert got["emb"]["error"]["code"] == "unsupported_endpoint"
    # With --levels, each request that names no conservativeness runs at each; records name their level.
    out2 = tmp_path / "levels.jsonl"
    run_in_process(batch_settings(server.settings, input=batch, output=out2, levels="0,1"), engine=server.engine)
    keys = set(by_key(out2))
    assert {("plain", "0.0"), ("plain", "1.0"), ("focused", '"focused"'), ("n2", "0.0"), ("emb", "1.0")} <= keys
    assert len(keys) == 7


def _cli(*args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "server.batch", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def test_resume_after_kill_gives_one_line_per_item_equal_to_an_uninterrupted_run(
    server: LiveServer, tmp_path: Path
) -> None:
    folder = image_folder(tmp_path / "pics", 16, seed0=300)
    args = ["--model", str(server.settings.model), "--engine", "transformers", "--input", str(folder),
            "--levels", "0,1", "--max-tokens", "8", "--max-batch-size", "2", "--torch-threads", "1",
            "--max-image-pixels", str(server.settings.max_image_pixels),
            "--max-image-bytes", str(server.settings.max_image_bytes), "--log-level", "warning"]  # fmt: skip
    out = tmp_path / "out.jsonl"
    total = 17 * 2
    proc = _cli(*args, "--output", str(out))

    def a_third_written_or_ended() -> bool:  # an ended run fails just below, with its log
        return proc.poll() is not None or (out.exists() and out.read_bytes().count(b"\n") >= total // 3)

    try:
        eventually(a_third_written_or_ended, 300, 0.02, what=f"a third of the {total} result lines to be written")
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    written = out.read_bytes().count(b"\n")
    assert 0 < written < total
    with out.open("ab") as f:  # what a kill in the middle of a write would leave
        f.write(b'{"id": "img009.png", "conservativeness": 1.0, "capt')
    rerun = _cli(*args, "--output", str(out))
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert summary["this_run"]["skipped"] == written and summary["this_run"]["results"] == total - written
    resumed = by_key(out)  # fails on a duplicate line
    assert len(resumed) == total
    # The same collection without interruption (in this process, the server's engine).
    whole = tmp_path / "whole.jsonl"
    run_in_process(
        batch_settings(server.settings, input=folder, output=whole, levels="0,1", max_tokens=8), engine=server.engine
    )
    uninterrupted = by_key(whole)
    assert resumed.keys() == uninterrupted.keys()
    for k, rec in uninterrupted.items():
        assert resumed[k].get("caption") == rec.get("caption"), k
        assert resumed[k]["error"] == rec["error"], k
