"""Under load and faults: concurrent requests batched and all answered, disconnects and deadlines free their
slot, a full queue answers 503, and a failing batch neither kills the worker nor other requests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.images import LONG_PROMPT, data_uri, image_message, long_png, png_bytes
from tests.support.live_server import LiveServer
from tests.support.waiting import eventually, eventually_async

pytestmark = pytest.mark.integration


def long_chat(**extra: Any) -> dict[str, Any]:
    """~750 greedy tokens before EOS on the test model (over 7 s under `slow_model`): cancelled long before its end."""
    return {"messages": image_message(LONG_PROMPT, long_png()), "max_tokens": 900, "conservativeness": 0, **extra}


def short_chat() -> dict[str, Any]:
    return {"messages": image_message("describe", png_bytes(20)), "max_tokens": 4, "conservativeness": 0}


def until_idle(live: LiveServer) -> None:
    def idle() -> bool:
        s = live.engine.stats()
        return s.running == 0 and s.queue_depth == 0

    eventually(idle, timeout_s=10, interval_s=0.01, what="the engine to be idle (nothing running or queued)")


def until_cancelled(live: LiveServer, total: int) -> None:
    eventually(
        lambda: live.engine.stats().cancelled_total == total,
        timeout_s=10,
        interval_s=0.01,
        what=f"the engine's cancelled_total to reach {total}",
    )


class SteppedBatch:
    """A real DecodeBatch whose step() first runs `before` (a sleep, a fault): timing and faults on demand."""

    def __init__(self, batch: Any, before: Any) -> None:
        self.batch = batch
        self.before = before
        self.steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.batch, name)

    def step(self) -> Any:
        self.steps += 1
        self.before(self.steps)
        return self.batch.step()


@pytest.fixture
def slow_model(small_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> LiveServer:
    """The small server with 10 ms added to every decode step: the long request then lasts over 7 s on any
    machine, so the cancellation and deadline tests cannot race a fast CPU."""
    model = small_server.engine._model
    real_start = model.start
    monkeypatch.setattr(model, "start", lambda requests: SteppedBatch(real_start(requests), lambda _: time.sleep(0.01)))
    return small_server


@pytest.fixture
def watch_batch(server: LiveServer) -> Iterator[list[int]]:
    """Samples the engine's running count while a test runs: the largest batch it saw."""
    seen = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen[0] = max(seen[0], server.engine.stats().running)
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    yield seen
    stop.set()
    t.join()


def test_32_concurrent_requests_all_answered_correctly(server: LiveServer, watch_batch: list[int]) -> None:
    variants: list[tuple[str, dict[str, Any]]] = [
        (
            "/v1/chat/completions",
            {"messages": image_message("what do you see", png_bytes(30)), "max_tokens": 8, "conservativeness": 0},
        ),
        (
            "/v1/chat/completions",
            {"messages": image_message("describe", png_bytes(31)), "max_tokens": 8, "conservativeness": 1},
        ),
        ("/caption", {"image": data_uri(png_bytes(32)), "max_tokens": 8, "conservativeness": "balanced"}),
        ("/caption", {"image": data_uri(png_bytes(33)), "max_tokens": 8, "conservativeness": 0.8, "contrast": False}),
    ]

    def text(path: str, body: dict[str, Any]) -> str:
        return str(body["caption"] if path == "/caption" else body["choices"][0]["message"]["content"])

    with server.client() as c:  # each variant alone first: the reference answers
        expected = [text(p, c.post(p, json=b).json()) for p, b in variants]
    before = server.metric("sevi_requests_total", {"endpoint": "/caption", "status": "200"})

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            return list(await asyncio.gather(*(c.post(variants[i % 4][0], json=variants[i % 4][1]) for i in range(32))))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 32, [r.text for r in responses if r.status_code != 200]
    for i, r in enumerate(responses):
        assert text(variants[i % 4][0], r.json()) == expected[i % 4], f"request {i} differs from its reference"
    assert len({r.json()["id"] for r in responses}) == 32
    assert server.metric("sevi_requests_total", {"endpoint": "/caption", "status": "200"}) == before + 16
    assert watch_batch[0] > 1, "requests were not batched together"
    assert watch_batch[0] <= server.settings.max_batch_size
    until_idle(server)


def test_streaming_disconnect_cancels_and_frees_the_slot(slow_model: LiveServer) -> None:
    live = slow_model
    cancelled = live.engine.stats().cancelled_total
    tokens = live.metric("sevi_completion_tokens_total")
    with live.client() as c:
        with c.stream("POST", "/v1/chat/completions", json={**long_chat(), "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few chunks in: the generation is running
            assert any('"content"' in line for line in got)
        # Leaving the block closed the connection mid-stream. The only batch slot must come free.
        t0 = time.monotonic()
        short = c.post("/v1/chat/completions", json=short_chat())
        waited = time.monotonic() - t0
    assert short.status_code == 200
    until_cancelled(live, cancelled + 1)
    until_idle(live)
    # The long request never finished: only the short one's tokens were counted.
    assert live.metric("sevi_completion_tokens_total") == tokens + short.json()["usage"]["completion_tokens"]
    assert live.metric("sevi_cancelled_requests_total", {"reason": "disconnect"}) >= 1
    assert float(short.headers["x-queue-time-ms"]) < 1000 * waited + 1


def test_non_streaming_disconnect_cancels(slow_model: LiveServer) -> None:
    live = slow_model
    cancelled = live.engine.stats().cancelled_total
    tokens = live.metric("sevi_completion_tokens_total")
    with live.client(timeout=httpx.Timeout(60, read=0.5)) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json=long_chat())  # the client gives up and hangs up
    until_cancelled(live, cancelled + 1)
    until_idle(live)
    with live.client() as c:
        short = c.post("/v1/chat/completions", json=short_chat())
    assert short.status_code == 200
    assert live.metric("sevi_completion_tokens_total") == tokens + short.json()["usage"]["completion_tokens"]


def test_full_queue_answers_503_with_retry_after(slow_model: LiveServer) -> None:
    live = slow_model

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:

            async def stream_forever() -> None:
                async with c.stream("POST", "/v1/chat/completions", json={**long_chat(), "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        pass

            running = asyncio.create_task(stream_forever())  # takes the one batch slot
            await eventually_async(
                lambda: live.engine.stats().running == 1, 10, 0.01, what="the streamed request to take the batch slot"
            )
            queued = asyncio.create_task(c.post("/v1/chat/completions", json=long_chat()))  # the one queue slot
            await eventually_async(
                lambda: live.engine.stats().queue_depth == 1, 10, 0.01, what="the second request to take the queue slot"
            )
            refused = await c.post("/v1/chat/completions", json=short_chat())
            for task in (queued, running):
                task.cancel()
            await asyncio.gather(queued, running, return_exceptions=True)
            return refused

    refused = asyncio.run(scenario())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == str(live.settings.retry_after_s)
    assert refused.json()["error"]["code"] == "server_overloaded"
    until_idle(live)
    with live.client() as c:
        assert c.post("/v1/chat/completions", json=short_chat()).status_code == 200


def test_deadline_gives_504_and_cancels(slow_model: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    live = slow_model
    monkeypatch.setattr(live.settings, "request_timeout_s", 0.3)
    cancelled = live.engine.stats().cancelled_total
    timeouts = live.metric("sevi_cancelled_requests_total", {"reason": "timeout"})
    disconnects = live.metric("sevi_cancelled_requests_total", {"reason": "disconnect"})
    with live.client() as c:
        r = c.post("/v1/chat/completions", json=long_chat())
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with c.stream("POST", "/v1/chat/completions", json={**long_chat(), "stream": True}) as s:
            assert s.status_code == 200  # the headers went out with the first token
            lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"code":"timeout"' in lines[-2]
    until_cancelled(live, cancelled + 2)
    until_idle(live)
    assert live.metric("sevi_cancelled_requests_total", {"reason": "timeout"}) == timeouts + 2
    assert live.metric("sevi_cancelled_requests_total", {"reason": "disconnect"}) == disconnects  # not both


def test_a_failing_batch_fails_only_its_requests(small_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server = small_server  # not the shared server: its 500 count must stay zero
    model = server.engine._model
    real_start = model.start
    calls = {"n": 0}

    def explode(step: int) -> None:
        if step > 1:  # one real step, then a fault in the middle of the batch
            raise RuntimeError("boom in step")

    def flaky_start(requests: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom in prefill")
        if calls["n"] == 2:
            return SteppedBatch(real_start(requests), explode)
        return real_start(requests)

    failed = server.metric("sevi_engine_failed_batches_total")
    monkeypatch.setattr(model, "start", flaky_start)
    with server.client() as c:
        for _ in range(2):
            r = c.post("/v1/chat/completions", json=short_chat())
            assert r.status_code == 500
            assert r.json()["error"]["code"] == "engine_error" and "boom" in r.json()["error"]["message"]
        ok = c.post("/v1/chat/completions", json=short_chat())
    assert ok.status_code == 200  # the worker lived on
    assert server.metric("sevi_engine_failed_batches_total") == failed + 2
    until_idle(server)
