"""The reference engine's worker survives a turn that raises past its own error handling (sevi/engines/api.py):
the requests that turn held get a 500 in the API's error format at once, and the next request is served."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import png_bytes
from tests.support.live_server import LiveServer, base_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(tiny_model_dir: Callable[[str], Path]) -> Iterator[LiveServer]:
    server = LiveServer(base_settings(tiny_model_dir("llava"))).start()
    yield server
    server.stop()


def test_a_failing_turn_fails_its_requests_and_the_engine_serves_on(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"image": base64.b64encode(png_bytes(3)).decode(), "max_tokens": 6}

    def broken(cohort: Any) -> None:
        raise RuntimeError("a bug in the worker")

    with monkeypatch.context() as m:
        m.setattr(live.engine, "_step", broken)
        with live.client(timeout=30) as c:
            r = c.post("/caption", json=body)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["message"].endswith("a bug in the worker")
    assert live.engine.stats().failed_batches_total == 1
    assert live.engine.stats().running == 0
    with live.client(timeout=60) as c:
        assert c.post("/caption", json=body).status_code == 200
        assert c.get("/ready").status_code == 200
