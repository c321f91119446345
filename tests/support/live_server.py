"""The app served live for the HTTP tests: `LiveServer` (uvicorn in a thread of the test process) and the settings
the tests start from (`base_settings`)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from server.app import create_app
from server.settings import Settings
from sevi.engines.api import Engine
from tests.support.waiting import eventually

# The one path the loopback image host of tests/server/conftest.py serves.
IMAGE_SERVER_PATH = "/pic.png"


class LiveServer:
    """create_app(settings) served by uvicorn on a pre-bound loopback socket (no port race). `engine` and
    `exit_process` go to create_app (a stub engine; a hook that records the exit a dead engine asks for)."""

    def __init__(
        self, settings: Settings, engine: Engine | None = None, exit_process: Callable[[int], None] | None = None
    ) -> None:
        self.settings = settings
        self.app = create_app(settings, engine, exit_process)
        self.engine = self.app.state.engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    # The first server of a run with an empty kernel cache builds the CPU kernels at load (the paged K/V kernel,
    # the compiled operator): about 15 s on two idle cores, past 60 s when they are shared (seen: 64 tests
    # erred on one slow start).
    def start(self, timeout: float = 240) -> LiveServer:
        self.thread.start()
        eventually(
            lambda: httpx.get(self.url + "/ready", timeout=2).status_code == 200,
            timeout_s=timeout,
            what=f"the server on {self.url} to answer /ready with 200",
        )
        return self

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


def base_settings(model: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        model=model,
        engine="transformers",
        max_batch_size=8,
        max_queue=64,
        max_tokens_limit=1000,
        default_max_tokens=8,
        max_request_bytes=1024 * 1024,
        max_image_bytes=256 * 1024,
        max_image_pixels=512 * 512,
        max_images_per_request=2,
        default_conservativeness=0.5,
        request_timeout_s=60,
    )
    values.update(overrides)
    return Settings(**values)
