"""The reference engine's worker thread dies past its own recovery (a turn raises, and so does the recovery): the
engine is dead, and says so at once. Requests in flight end with `engine_dead` (a stream in-band, then [DONE]),
/health and /ready answer 503 naming the cause, new requests get a 503, `sevi_engine_up` is 0, and the exit a
dead engine asks for comes after the configured grace (recorded here: the app runs in the test process).

Before: the thread died, /health and /ready stayed 200, and every request waited out its deadline (504)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.watchdog import ENGINE_DEAD_EXIT_CODE
from tests.support.live_server import LiveServer, base_settings
from tests.support.request_load import RequestLoad, assert_ended_by_engine_death
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

GRACE_S = 2.0


@pytest.fixture
def live(tiny_model_dir: Callable[[str], Path]) -> Iterator[tuple[LiveServer, list[tuple[int, float]]]]:
    exits: list[tuple[int, float]] = []
    settings = base_settings(tiny_model_dir("llava"), max_tokens_limit=1000, engine_dead_exit_after_s=GRACE_S)
    server = LiveServer(settings, exit_process=lambda code: exits.append((code, time.monotonic()))).start()
    yield server, exits
    server.stop()


def test_the_worker_thread_dying_ends_requests_and_the_process(
    live: tuple[LiveServer, list[tuple[int, float]]],
) -> None:
    server, exits = live
    load = RequestLoad(server.url, streams=3, unstreamed=2, timeout=60)
    load.wait_streaming(timeout=60)  # then break the worker at once: waiting for all 5 to run (the reference
    # engine admits arrivals by cohort) once timed out on a quiet machine; any that end first are left out below

    def broken(*args: Any) -> None:
        raise RuntimeError("a bug in the worker")

    engine = server.engine
    engine._step = broken  # the turn raises ...
    engine._turn_failed = broken  # ... and so does the recovery: the thread dies
    t0 = time.monotonic()
    outcomes = load.join(timeout=20)
    assert_ended_by_engine_death(outcomes, fault_at=t0)
    assert "worker thread" in next(o.error for o in outcomes if o.error is not None)["message"]

    with httpx.Client(base_url=server.url, timeout=10) as c:
        health, ready = c.get("/health"), c.get("/ready")
        assert health.status_code == 503 and health.json()["status"] == "dead"
        assert "RuntimeError: a bug in the worker" in health.json()["detail"]
        assert ready.status_code == 503 and ready.json()["detail"] == health.json()["detail"]
        new = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert new.status_code == 503 and new.json()["error"]["code"] == "engine_dead"
        assert new.headers.get("retry-after") is not None
    assert server.metric("sevi_engine_up") == 0
    eventually(lambda: bool(exits), timeout_s=GRACE_S + 5, what="the watchdog to ask for the process's exit")
    code, at = exits[0]
    assert code == ENGINE_DEAD_EXIT_CODE and at - t0 >= GRACE_S - 0.1 and len(exits) == 1
