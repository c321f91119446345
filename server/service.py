"""One run of a generation request through the engine, as both routes make it: the deadline, the disconnect watch,
metrics and the request's log fields. (`server.intake` builds the request it runs.)

A run first awaits the engine's first event before any response byte is sent, so that a full queue
(503), a request the model refuses (400) or a deadline (504) still get their proper status even when
streaming.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive

from server.errors import APIError, from_exception
from server.metrics import Metrics
from server.middleware import Arrival
from server.settings import Settings
from sevi.engines.api import Engine, GenerationRequest, GenerationStats, TokenEvent
from sevi.method.telemetry import Telemetry


@dataclass
class Outcome:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    telemetry: Telemetry


@dataclass
class Run:
    """One request through the engine. Use `start()`, then either `collect()` or `events()`. `receive` is the
    ASGI channel the client's disconnect arrives on."""

    arrival: Arrival
    receive: Receive
    engine: Engine
    metrics: Metrics
    settings: Settings
    endpoint: str
    request: GenerationRequest
    stats: GenerationStats = field(default_factory=GenerationStats)
    _it: AsyncIterator[TokenEvent] | None = None
    _first: TokenEvent | None = None
    _last_t: float = 0.0
    _deadline: float = 0.0
    finished: bool = False  # the final event arrived
    failed: bool = False  # ended by a deadline or an engine error (not by the client leaving)

    def __post_init__(self) -> None:
        # The deadline counts from arrival (set by the middleware), so time spent decoding images counts too.
        self._deadline = (
            asyncio.get_running_loop().time()
            + self.settings.request_timeout_s
            - (time.perf_counter() - self.arrival.t0)
        )
        c = self.request.alignment.conservativeness
        self.metrics.conservativeness.observe(c)
        self._log(conservativeness=c, omega=self.request.alignment.omega, engine_request_id=self.request.request_id)

    def _log(self, **fields: Any) -> None:
        self.arrival.log.update(fields)

    async def start(self) -> None:
        """Submit and wait for the first token: every refusal surfaces here, as an APIError."""
        self._it = self.engine.generate(self.request, self.stats)
        try:
            self._first = await self._next()
        except BaseException:
            await self.close()
            raise

    async def _next(self) -> TokenEvent:
        assert self._it is not None
        try:
            async with asyncio.timeout_at(self._deadline):
                ev = await anext(self._it)
        except TimeoutError:
            self.failed = True
            self._cancelled("timeout")
            raise APIError(
                504, f"the request ran past its deadline of {self.settings.request_timeout_s:g} s", code="timeout"
            ) from None
        except StopAsyncIteration:
            self.failed = True
            raise APIError(
                500, "the engine ended the request without a result", code="engine_error", type="server_error"
            ) from None
        except Exception as exc:  # engine and model errors -> their API status (400/503/500)
            self.failed = True
            raise from_exception(exc, self.settings.retry_after_s) from None
        self._observe(ev)
        return ev

    def _observe(self, ev: TokenEvent) -> None:
        now = time.perf_counter()
        if self._last_t == 0.0:
            self.metrics.ttft.labels(self.endpoint).observe(now - self.arrival.t0)
        else:
            self.metrics.itl.observe(now - self._last_t)
        self._last_t = now
        if ev.finish_reason is not None:
            self.finished = True
            self.metrics.prompt_tokens.inc(ev.prompt_tokens)
            self.metrics.completion_tokens.inc(ev.completion_tokens)
            telemetry = ev.telemetry or Telemetry()
            heads = telemetry.heads_reweighted
            if heads:
                self.metrics.heads_reweighted.inc(heads)
            dissolved = bool(telemetry.contrast_dissolved)
            if dissolved:
                self.metrics.contrast_dissolved.inc()
            self._log(
                prompt_tokens=ev.prompt_tokens,
                completion_tokens=ev.completion_tokens,
                finish_reason=ev.finish_reason,
                engine_ms=round(self.stats.engine_s * 1000, 3),
                queue_ms=round(self.stats.queue_s * 1000, 3),
                heads_reweighted=heads,
                **({"contrast_dissolved": True} if dissolved else {}),
            )

    def _cancelled(self, reason: str) -> None:
        self.metrics.cancelled.labels(reason).inc()
        self._log(cancelled=reason)

    def timing_headers(self) -> dict[str, str]:
        """Where the time went, so clients (bench/load.py) can tell the server's overhead from the engine's time:
        `x-engine-time-ms` (submission to final token, queueing included), `x-queue-time-ms`, and
        `x-server-time-ms` (arrival to response, i.e. everything but the network and the client)."""
        server = (time.perf_counter() - self.arrival.t0) * 1000
        return {
            "x-engine-time-ms": f"{self.stats.engine_s * 1000:.3f}",
            "x-queue-time-ms": f"{self.stats.queue_s * 1000:.3f}",
            "x-server-time-ms": f"{server:.3f}",
        }

    async def close(self) -> None:
        """Closing the engine's iterator before its end cancels the request there."""
        if self._it is not None:
            aclose = getattr(self._it, "aclose", None)
            if aclose is not None:
                await aclose()

    async def events(self) -> AsyncGenerator[TokenEvent, None]:
        """All events, the first included; cancelling the consumer cancels the generation."""
        assert self._first is not None, "call start() first"
        try:
            ev = self._first
            yield ev
            while ev.finish_reason is None:
                ev = await self._next()
                yield ev
        finally:
            if not (self.finished or self.failed):
                self._cancelled("disconnect")
            await self.close()

    async def collect(self) -> Outcome | None:
        """Run to the end; None when the client went away first (the generation is then cancelled)."""
        consume = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_client_gone(self.receive))
        try:
            await asyncio.wait({consume, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not consume.done():
                consume.cancel()
                await asyncio.gather(consume, return_exceptions=True)  # lets the engine's cancellation run
        if consume.cancelled():
            return None
        return consume.result()

    async def _collect(self) -> Outcome:
        parts: list[str] = []
        last: TokenEvent | None = None
        async for ev in self.events():
            parts.append(ev.text)
            last = ev
        assert last is not None
        return Outcome(
            "".join(parts),
            last.finish_reason,
            last.prompt_tokens,
            last.completion_tokens,
            last.telemetry or Telemetry(),
        )


async def _client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
