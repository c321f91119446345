"""Every bad input gets its status and an OpenAI error body, never a 500, and the server stays up."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support.images import data_uri, image_message, png_bytes
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.integration

PNG = png_bytes(11)
IMG0 = "messages.0.content.0.image_url"


def _error(r: httpx.Response, status: int, param: str | None = "__any__") -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param != "__any__":
        assert err["param"] == param, err
    return dict(err)


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid PNG header claiming a huge image with a tiny compressed body (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * (width * 3)
    body = zlib.compress(row * 16, 9)  # only a few rows: decoding would fail late, after allocating everything
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def tiff_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TIFF")
    return buf.getvalue()


def chat(**body: Any) -> dict[str, Any]:
    return {"messages": image_message("describe", PNG), "max_tokens": 4, **body}


CHAT_CASES: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("conservativeness above 1", chat(conservativeness=1.5), 400, "conservativeness"),
    ("conservativeness below 0", chat(conservativeness=-0.1), 400, "conservativeness"),
    ("unknown preset", chat(conservativeness="paranoid"), 400, "conservativeness"),
    ("boolean knob", chat(conservativeness=True), 400, "conservativeness"),
    ("negative max_tokens", chat(max_tokens=-3), 400, "max_tokens"),
    ("zero max_completion_tokens", chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("max_tokens over the limit", chat(max_tokens=5000), 400, "max_tokens"),
    ("negative omega", chat(alignment={"omega": -1}), 400, "alignment.omega"),
    ("start_layer past the depth", chat(alignment={"start_layer": 99}), 400, "alignment.start_layer"),
    ("kappa above 1", chat(alignment={"kappa": 2}), 400, "alignment.kappa"),
    ("too many images", {"messages": image_message("x", PNG, PNG, PNG), "max_tokens": 4}, 400, "messages"),
    ("n > 1", chat(n=2), 400, "n"),
    ("logprobs", chat(logprobs=True), 400, "logprobs"),
    ("temperature above 2", chat(temperature=3), 400, "temperature"),
    ("top_p zero", chat(top_p=0), 400, "top_p"),
    ("five stop strings", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("no messages", {"messages": []}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("unknown part type", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages.0.content"),
    (
        "image in an assistant turn",
        {
            "messages": [
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_uri(PNG)}}]},
                {"role": "user", "content": "hi"},
            ]
        },
        400,
        "messages.0.content.0.image_url",
    ),
    ("unknown model", chat(model="gpt-9"), 404, "model"),
    (
        "URL host not allow-listed",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}
            ]
        },
        400,
        IMG0,
    ),
    (
        "file URL",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}
            ]
        },
        400,
        IMG0,
    ),
    (
        "data URI not base64",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}]}
            ]
        },
        400,
        IMG0,
    ),
    (
        "invalid base64",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!!"}}]}
            ]
        },
        400,
        IMG0,
    ),
    (
        "svg media type",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_uri(b"<svg/>", "image/svg+xml")}}],
                }
            ]
        },
        415,
        IMG0,
    ),
    (
        "not an image",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(b"hello world")}}]}
            ]
        },
        415,
        IMG0,
    ),
    (
        "truncated PNG",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_uri(png_bytes(1, (200, 200))[:300])}}],
                }
            ]
        },
        415,
        IMG0,
    ),
    (
        "TIFF",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_uri(tiff_bytes(), "image/png")}}],
                }
            ]
        },
        415,
        IMG0,
    ),
    (
        "decompression bomb",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(bomb_png())}}]}
            ]
        },
        413,
        IMG0,
    ),
    (
        "image over the byte limit",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_uri(b"\x89PNG" + b"\x00" * 300_000)}}],
                }
            ]
        },
        413,
        IMG0,
    ),
    (
        "prompt too long for the context",
        {"messages": [{"role": "user", "content": "a " * 1100}], "max_tokens": 8},
        400,
        "max_tokens",
    ),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_errors(server: LiveServer, case: str, body: dict[str, Any], status: int, param: str | None) -> None:
    with server.client() as c:
        _error(c.post("/v1/chat/completions", json=body), status, param)


def test_chat_malformed_bodies(server: LiveServer) -> None:
    with server.client() as c:
        err = _error(
            c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400
        )
        assert "JSON" in err["message"]
        _error(
            c.post(
                "/v1/chat/completions",
                content=b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                headers={"content-type": "application/json"},
            ),
            400,
            "temperature",
        )
        _error(c.post("/v1/chat/completions", content=b"[]", headers={"content-type": "application/json"}), 400)
        _error(c.get("/v1/chat/completions"), 405)
        _error(c.get("/no/such/route"), 404)


CAPTION_JSON_CASES: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("no image", {"prompt": "describe"}, 400, "image"),
    ("image not a string", {"image": 5}, 400, "image"),
    ("knob out of range", {"image": data_uri(PNG), "conservativeness": 7}, 400, "conservativeness"),
    ("unknown preset", {"image": data_uri(PNG), "conservativeness": "max"}, 400, "conservativeness"),
    ("negative max_tokens", {"image": data_uri(PNG), "max_tokens": -1}, 400, "max_tokens"),
    ("negative seed", {"image": data_uri(PNG), "seed": -5}, 400, "seed"),
    ("empty prompt", {"image": data_uri(PNG), "prompt": ""}, 400, "prompt"),
    ("bad omega", {"image": data_uri(PNG), "omega": -2}, 400, "omega"),
    ("misspelt knob", {"image": data_uri(PNG), "conservatism": 1}, 400, "conservatism"),
    ("invalid base64", {"image": "%%%"}, 400, "image"),
    ("not an image", {"image": base64.b64encode(b"GIF89a-but-not-really").decode()}, 415, "image"),
    ("bomb", {"image": data_uri(bomb_png())}, 413, "image"),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "param"), CAPTION_JSON_CASES, ids=[c[0] for c in CAPTION_JSON_CASES]
)
def test_caption_json_errors(
    server: LiveServer, case: str, body: dict[str, Any], status: int, param: str | None
) -> None:
    with server.client() as c:
        _error(c.post("/caption", json=body), status, param)


def test_caption_multipart_errors(server: LiveServer) -> None:
    with server.client() as c:
        # Text only: /caption needs an image.
        _error(
            c.post("/caption", data={"prompt": "describe"}, files={"other": ("x.txt", b"x", "text/plain")}),
            400,
            "image",
        )
        _error(
            c.post("/caption", files={"image": ("a.png", PNG, "image/png")}, data={"conservativeness": "2"}),
            400,
            "conservativeness",
        )
        _error(
            c.post("/caption", files={"image": ("a.png", PNG, "image/png")}, data={"max_tokens": "-4"}),
            400,
            "max_tokens",
        )
        _error(c.post("/caption", files={"image": ("a.png", PNG, "image/png")}, data={"colour": "red"}), 400, "colour")
        _error(c.post("/caption", files={"image": ("a.png", b"\x00\x01garbage", "image/png")}), 415, "image")
        _error(
            c.post("/caption", files={"image": ("a.png", png_bytes(1, (200, 200))[:500], "image/png")}), 415, "image"
        )
        _error(c.post("/caption", files={"image": ("a.png", bomb_png(), "image/png")}), 413, "image")
        _error(
            c.post("/caption", files={"image": ("a.png", b"\x89PNG" + b"\x00" * 300_000, "image/png")}), 413, "image"
        )
        _error(c.post("/caption", content=b"image please", headers={"content-type": "text/plain"}), 415)
        _error(
            c.post("/caption", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"}),
            400,
        )


def test_request_body_limit(server: LiveServer) -> None:
    big = b"{" + b" " * (server.settings.max_request_bytes + 10) + b"}"
    with server.client() as c:
        err = _error(c.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"}), 413)
        assert err["code"] == "request_too_large"

        def chunked() -> Any:  # no Content-Length: the limit is enforced while reading
            for _ in range(20):
                yield b" " * 65536

        _error(c.post("/caption", content=chunked(), headers={"content-type": "application/json"}), 413)
        assert c.get("/health").status_code == 200


def test_a_refused_request_does_not_sink_its_batch(server: LiveServer) -> None:
    """One request the model refuses (too long) arrives with good ones: they are served, it gets a 400."""

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            good = [c.post("/v1/chat/completions", json=chat(max_tokens=6)) for _ in range(3)]
            bad = c.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a " * 1100}], "max_tokens": 8}
            )
            return list(await asyncio.gather(bad, *good))

    bad, *good = asyncio.run(go())
    _error(bad, 400, "max_tokens")
    assert all(r.status_code == 200 for r in good), [r.text for r in good]
    assert len({r.json()["choices"][0]["message"]["content"] for r in good}) == 1


def test_server_survives_everything(server: LiveServer) -> None:
    with server.client() as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    assert server.metric("sevi_requests_total", {"endpoint": "/v1/chat/completions", "status": "500"}) == 0
    assert server.metric("sevi_requests_total", {"endpoint": "/caption", "status": "500"}) == 0
