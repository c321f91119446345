"""Live servers on 127.0.0.1 for the HTTP tests: uvicorn in a thread of the test process, a tiny model behind it.

Servers are package-scoped: built once for tests/server and shut down before the other test packages run. What they
are built from is in tests/support/ (LiveServer and base_settings in live_server.py, png_bytes in images.py). The
engine tests are not in this folder (tests/sevi/engines/): the one-thread pin below does not reach them.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sevi.testing.tiny import build
from tests.support.images import png_bytes
from tests.support.live_server import IMAGE_SERVER_PATH, LiveServer, base_settings


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # The test machine is shared: with several intra-op threads a busy CPU makes the tiny model ~15x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Our own build (not the shared fixture): LONG_* in tests/support/images.py were found on exactly this model.
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


@pytest.fixture(scope="package")
def server(llava_dir: Path, image_host: str) -> Iterator[LiveServer]:
    # The image host is on loopback: internal addresses must be allowed explicitly (listing it is not enough).
    settings = base_settings(llava_dir, allowed_image_hosts=[image_host], allow_internal_image_hosts=True)
    live = LiveServer(settings).start()
    yield live
    live.stop()


@pytest.fixture(scope="package")
def small_server(llava_dir: Path) -> Iterator[LiveServer]:
    """One batch slot and one queue slot: capacity is easy to fill, and to see freed."""
    live = LiveServer(base_settings(llava_dir, max_batch_size=1, max_queue=1, max_cohorts=1)).start()
    yield live
    live.stop()
