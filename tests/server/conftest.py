"""Live servers on 127.0.0.1 for the HTTP tests: uvicorn in a thread of the test process, a tiny model behind it.

Servers are package-scoped: built once for tests/server and shut down before the other test packages run.
"""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from models.tiny import build
from server.app import create_app
from server.settings import Settings

IMAGE_SERVER_PATH = "/pic.png"


class LiveServer:
    """create_app(settings) served by uvicorn on a pre-bound loopback socket (no port race)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.engine = self.app.state.engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    # The first server of a run with an empty kernel cache builds the CPU kernels at load (the paged K/V kernel,
    # the compiled operator): about 15 s on two idle cores, past 60 s when they are shared (seen: 64 tests
    # erred on one slow start).
    def start(self, timeout: float = 240) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server on {self.url} did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample from /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics").text
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items())) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == want or _normalise(key) == want:
                return float(value)
        return 0.0


def _normalise(key: str) -> str:
    if "{" not in key:
        return key
    name, _, rest = key.partition("{")
    pairs = sorted(p for p in rest.rstrip("}").split(",") if p)
    return name + "{" + ",".join(pairs) + "}"


def png_bytes(seed: int = 1, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def image_message(text: str = "what do you see", *images: bytes) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_uri(im)}} for im in images]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


# A greedy request that runs ~750 tokens on the tiny LLaVA before its EOS (found by search): long enough
# to be cancelled mid-way.
LONG_IMAGE_COLOUR = (80, 100, 140)
LONG_PROMPT = "Please describe this image in detail."


def long_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), LONG_IMAGE_COLOUR).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # The test machine is shared: with several intra-op threads a busy CPU makes the tiny model ~15x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Our own build (not the shared fixture): LONG_* below were found on exactly this model.
    out = tmp_path_factory.mktemp("server-tiny-llava")
    build("llava", out, seed=0, layers=4, heads=8, kv_heads=4)
    return out


@pytest.fixture(scope="package")
def image_host() -> Iterator[str]:
    """A loopback HTTP server with one PNG, standing for an allow-listed image host."""
    payload = png_bytes(7)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path != IMAGE_SERVER_PATH:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def base_settings(model: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        model=model, engine="transformers", max_batch_size=8, max_queue=64, max_tokens_limit=1000, default_max_tokens=8,
        max_request_bytes=1024 * 1024, max_image_bytes=256 * 1024, max_image_pixels=512 * 512,
        max_images_per_request=2, default_conservativeness=0.5, request_timeout_s=60,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="package")
def server(llava_dir: Path, image_host: str) -> Iterator[LiveServer]:
    live = LiveServer(base_settings(llava_dir, allowed_image_hosts=[image_host])).start()
    yield live
    live.stop()


@pytest.fixture(scope="package")
def small_server(llava_dir: Path) -> Iterator[LiveServer]:
    """One batch slot and one queue slot: capacity is easy to fill, and to see freed."""
    live = LiveServer(base_settings(llava_dir, max_batch_size=1, max_queue=1, max_cohorts=1)).start()
    yield live
    live.stop()
