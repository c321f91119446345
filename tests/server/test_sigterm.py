"""SIGTERM with requests in flight (`python -m server` in a subprocess, the reference engine): the requests in flight
finish normally, new connections are refused at once, and the process ends (status 0, or by the signal, which
uvicorn re-raises) within the graceful timeout."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.vs_vllm import Server
from server.__main__ import GRACEFUL_SHUTDOWN_S
from tests.support.repo import REPO
from tests.support.request_load import RequestLoad, long_request
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

MAX_TOKENS = 60  # a few seconds of decoding for 6 requests on two busy cores: in flight when the signal comes


@pytest.fixture
def server(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> Iterator[Server]:
    cmd = [sys.executable, "-m", "server", "--model", str(tiny_model_dir("llava")), "--engine", "transformers",
           "--host", "127.0.0.1", "--torch-threads", "1"]  # fmt: skip
    srv = Server("sevi-sigterm", cmd, dict(os.environ, PYTHONPATH=str(REPO)), tmp_path, "/ready", cwd=REPO)
    try:
        srv.wait_ready(240)
        yield srv
    finally:
        srv.stop()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(server: Server) -> None:
    def body(stream: bool) -> dict[str, Any]:
        return long_request(stream, max_tokens=MAX_TOKENS)

    load = RequestLoad(server.url, streams=4, unstreamed=2, timeout=60, body=body)
    load.wait_streaming(timeout=120)
    os.kill(server.proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    refused_after = eventually(
        lambda: _refused(server.port), 5, 0.05, what="the server to refuse new connections after SIGTERM"
    )
    outcomes = load.join(timeout=GRACEFUL_SHUTDOWN_S + 10)
    for o in outcomes:
        assert o.client_error is None and o.status == 200 and o.error is None, (o.status, o.body, o.client_error)
        assert o.finish_reasons in (["stop"], ["length"]), o.finish_reasons
        assert not o.stream or o.done
    assert refused_after < 5
    server.proc.wait(GRACEFUL_SHUTDOWN_S + 20)
    elapsed = time.monotonic() - t0
    assert server.proc.returncode in (0, -signal.SIGTERM), server.proc.returncode
    assert elapsed <= GRACEFUL_SHUTDOWN_S + 20, elapsed
    print(f"\nSIGTERM: refused after {refused_after:.2f} s, exit {server.proc.returncode} after {elapsed:.2f} s")
