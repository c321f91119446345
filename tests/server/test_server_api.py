"""The happy paths against a live server: /caption (multipart, JSON), chat completions (httpx and the official
`openai` client, streaming and not), probes, and that the server runs exactly what the model would run."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from sevi.engines.api import GenerationRequest, SamplingParams, user_message
from sevi.engines.reference.generation import ReferenceModel, run_to_completion
from sevi.method.knob import resolve_alignment
from sevi.method.telemetry import Telemetry
from sevi.testing.tiny import build
from tests.support.images import data_uri, image_message, png_bytes
from tests.support.live_server import IMAGE_SERVER_PATH, LiveServer, base_settings

pytestmark = pytest.mark.integration


def test_probes_and_models(server: LiveServer) -> None:
    with server.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").json()["status"] == "ready"
        assert c.get("/ready").json()["aligned_kernel"] == "torch"  # the reference engine: the torch operator
        models = c.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [server.engine.model_name]
    assert models["data"][0]["num_layers"] == 4


def test_caption_multipart_matches_the_model(server: LiveServer, llava_dir: Path) -> None:
    png = png_bytes(3)
    with server.client() as c:
        r = c.post(
            "/caption",
            files={"image": ("a.png", png, "image/png")},
            data={"conservativeness": "0.5", "max_tokens": "12", "prompt": "what do you see"},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    applied = resolve_alignment(0.5, 4)
    assert body["alignment"] == applied.to_dict()
    assert body["object"] == "caption" and body["model"] == server.engine.model_name
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 12
    assert 0 < float(r.headers["x-engine-time-ms"]) <= float(r.headers["x-server-time-ms"])
    assert r.headers["x-request-id"].startswith("req-")
    assert body["telemetry"]["aligned_rows"] > 0  # alignment was on for this request

    # The same request straight through the model gives the same caption.
    model = ReferenceModel.load(llava_dir)
    image = Image.open(io.BytesIO(png))
    req = GenerationRequest("x", user_message("what do you see"), [image], applied, SamplingParams(max_tokens=12))
    expected = run_to_completion(model, [req])["x"]
    assert body["caption"] == expected.text
    assert body["finish_reason"] == expected.finish_reason
    assert usage["prompt_tokens"] == len(expected.prompt_token_ids)


def test_caption_json_base64_data_uri_and_multipart_agree(server: LiveServer) -> None:
    png = png_bytes(4)
    with server.client() as c:
        form = c.post("/caption", files={"image": ("a.png", png, "image/png")}, data={"max_tokens": "10"}).json()
        b64 = c.post("/caption", json={"image": base64.b64encode(png).decode(), "max_tokens": 10}).json()
        uri = c.post("/caption", json={"image": data_uri(png), "max_tokens": 10}).json()
    assert form["caption"] == b64["caption"] == uri["caption"]
    assert form["alignment"]["conservativeness"] == 0.5  # the server default


def test_caption_knob_maps_and_overrides(server: LiveServer) -> None:
    png = png_bytes(5)
    with server.client() as c:
        off = c.post("/caption", json={"image": data_uri(png), "conservativeness": "off", "max_tokens": 6}).json()
        focused = c.post("/caption", json={"image": data_uri(png), "conservativeness": 1, "max_tokens": 6}).json()
        custom = c.post(
            "/caption",
            files={"image": ("a.png", png, "image/png")},
            data={
                "conservativeness": "balanced",
                "omega": "2.5",
                "start_layer": "0",
                "kappa": "0.3",
                "contrast": "false",
                "max_tokens": "6",
            },
        ).json()
    assert off["alignment"] == resolve_alignment(0, 4).to_dict()
    assert off["alignment"]["omega"] == 0 and off["alignment"]["contrast"] is False
    assert off["telemetry"]["aligned_rows"] == 0
    assert focused["alignment"] == resolve_alignment(1, 4).to_dict()
    assert custom["alignment"] == {
        "conservativeness": 0.5,
        "omega": 2.5,
        "start_layer": 0,
        "kappa": 0.3,
        "contrast": False,
    }


def _chat(server: LiveServer, **body: object) -> dict[str, object]:
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": server.engine.model_name, **body})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_chat_completion_shape_and_alignment(server: LiveServer) -> None:
    body = _chat(
        server,
        messages=image_message("what do you see", png_bytes(6)),
        max_tokens=9,
        conservativeness=1,
        alignment={"kappa": 0.5},
    )
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]  # type: ignore[index]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert body["alignment"] == resolve_alignment(1, 4, kappa=0.5).to_dict()
    # Every field of the engines' telemetry, the contrast ones too (conservativeness 1: this request was contrasted).
    assert set(body["telemetry"]) == {f.name for f in fields(Telemetry)}  # type: ignore[arg-type]
    assert body["telemetry"]["contrast_steps"] == body["usage"]["completion_tokens"] + (  # type: ignore[index]
        choice["finish_reason"] == "stop"
    )  # one per token chosen, the EOS included


def test_openai_client_plain_and_streaming_agree(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = image_message("what do you see", png_bytes(8))
    plain = client.chat.completions.create(
        model=server.engine.model_name,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=10,
        extra_body={"conservativeness": 0.5},
    )
    assert plain.choices[0].message.content
    assert plain.usage is not None and plain.usage.completion_tokens <= 10
    extra = plain.model_extra or {}
    assert extra["alignment"] == resolve_alignment(0.5, 4).to_dict()

    stream = client.chat.completions.create(
        model=server.engine.model_name,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"conservativeness": 0.5},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_raw_sse_framing(server: LiveServer) -> None:
    body = {"messages": image_message("describe", png_bytes(9)), "max_tokens": 5, "stream": True}
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[0]["alignment"]["conservativeness"] == 0.5
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert not any("usage" in e for e in events)  # not asked for
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_text_only_chat_and_stop_sequences(server: LiveServer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what do you see"}]
    full = _chat(server, messages=messages, max_tokens=12, conservativeness=0.5)
    text = full["choices"][0]["message"]["content"]  # type: ignore[index]
    assert full["telemetry"]["aligned_rows"] == 0  # type: ignore[index]  # no image: nothing to align
    words = text.split()
    assert len(words) >= 3
    cut = _chat(server, messages=messages, max_tokens=12, conservativeness=0.5, stop=[" " + words[2]])
    assert cut["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert not cut["choices"][0]["message"]["content"].endswith(words[2])  # type: ignore[index]
    assert text.startswith(cut["choices"][0]["message"]["content"])  # type: ignore[index]
    # Streamed, the deltas add up to the same text: the start of a stop string is held back, not sent and
    # then cut, and what is held is sent at the end when no stop string completes.
    across = f"{words[1][-1]} {words[2][0]}"  # a stop string that spans two tokens
    cut2 = _chat(server, messages=messages, max_tokens=12, conservativeness=0.5, stop=[across])
    assert cut2["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert cut2["choices"][0]["message"]["content"] == text[: text.index(across)]  # type: ignore[index]
    for stop, want in (
        (across, cut2["choices"][0]["message"]["content"]),  # type: ignore[index]
        (" never-generated", text),
    ):
        assert _streamed_text(server, messages=messages, max_tokens=12, conservativeness=0.5, stop=[stop]) == want


def _streamed_text(server: LiveServer, **body: object) -> str:
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json={"stream": True, **body}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


def test_seeded_sampling_is_reproducible(server: LiveServer) -> None:
    kwargs = dict(messages=image_message("what do you see", png_bytes(10)), max_tokens=12, temperature=1.0, top_p=0.9)
    a = _chat(server, seed=1234, **kwargs)
    b = _chat(server, seed=1234, **kwargs)
    assert a["choices"] == b["choices"]


def test_allow_listed_image_url_is_fetched(server: LiveServer) -> None:
    host = server.settings.allowed_image_hosts[0]
    url = f"http://{host}{IMAGE_SERVER_PATH}"
    fetched = _chat(
        server,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "describe"}],
            }
        ],
        max_tokens=6,
    )
    inline = _chat(server, messages=image_message("describe", png_bytes(7)), max_tokens=6)
    assert fetched["choices"] == inline["choices"]  # the host serves png_bytes(7)


def test_openapi_describes_the_extra_fields(server: LiveServer) -> None:
    with server.client() as c:
        spec = c.get("/openapi.json").json()
        assert c.get("/docs").status_code == 200
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"conservativeness", "alignment", "stream_options", "max_completion_tokens"} <= set(chat)
    caption = spec["paths"]["/caption"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(caption)
    assert caption["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    out = tmp_path_factory.mktemp("server-tiny-qwen")
    build("qwen2_vl", out, seed=0, layers=4, heads=4, kv_heads=2)
    live = LiveServer(base_settings(out)).start()
    yield live
    live.stop()


def test_qwen_family_and_inputs_its_processor_refuses(qwen_server: LiveServer) -> None:
    """Qwen2-VL's processor refuses extreme aspect ratios: that request gets a 400, its batch-mates are served."""
    thin = io.BytesIO()
    Image.new("RGB", (2, 600), (9, 9, 9)).save(thin, "PNG")

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=qwen_server.url, timeout=60) as c:
            good = [c.post("/caption", json={"image": data_uri(png_bytes(50)), "max_tokens": 6}) for _ in range(3)]
            bad = c.post("/caption", json={"image": data_uri(thin.getvalue()), "max_tokens": 6})
            return list(await asyncio.gather(bad, *good))

    bad, *good = asyncio.run(go())
    assert bad.status_code == 400, bad.text
    assert "aspect ratio" in bad.json()["error"]["message"]
    assert [r.status_code for r in good] == [200] * 3
    body = good[0].json()
    assert body["alignment"] == resolve_alignment(0.5, 4).to_dict()
    assert body["telemetry"]["aligned_rows"] > 0
    assert len({r.json()["caption"] for r in good}) == 1
