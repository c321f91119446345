"""What /caption and /v1/chat/completions share: knob resolution, one run through the engine with its deadline,
disconnect watch, metrics and log fields.

A run first awaits the engine's first event before any response byte is sent, so that a full queue
(503), a request the model refuses (400) or a deadline (504) still get their proper status even when
streaming.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from models.conservativeness import AlignmentParamError, AlignmentParams, resolve_alignment
from models.generation import GenerationRequest, SamplingParams, TokenEvent
from server.engines.base import Engine, GenerationStats
from server.errors import APIError, from_exception
from server.metrics import Metrics
from server.settings import Settings


@dataclass
class Knobs:
    conservativeness: float | int | str | None
    omega: float | None = None
    start_layer: int | None = None
    kappa: float | None = None
    contrast: bool | None = None
    param_prefix: str = ""  # "alignment." when the explicit values came nested


def resolve_knobs(knobs: Knobs, engine: Engine, settings: Settings) -> AlignmentParams:
    try:
        return resolve_alignment(knobs.conservativeness, engine.num_layers, omega=knobs.omega,
                                 start_layer=knobs.start_layer, kappa=knobs.kappa, contrast=knobs.contrast,
                                 default_conservativeness=settings.default_conservativeness)
    except AlignmentParamError as exc:
        param = exc.param if exc.param == "conservativeness" else knobs.param_prefix + exc.param
        raise APIError(400, str(exc), param=param, code="invalid_alignment") from None


def sampling_params(settings: Settings, max_tokens: int | None, temperature: float | None, top_p: float | None,
                    seed: int | None, stop: tuple[str, ...] = (),
                    max_tokens_param: str = "max_tokens") -> SamplingParams:
    if max_tokens is None:
        n = min(settings.default_max_tokens, settings.max_tokens_limit)
    elif max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"{max_tokens_param} must be at most {settings.max_tokens_limit}, got {max_tokens}",
                       param=max_tokens_param, code="invalid_value")
    else:
        n = max_tokens
    return SamplingParams(max_tokens=n, temperature=temperature or 0.0,
                          top_p=1.0 if top_p is None else top_p, seed=seed, stop=stop)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Outcome:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    telemetry: dict[str, int]


@dataclass
class Run:
    """One request through the engine. Use `start()`, then either `collect()` or `events()`."""

    http: Request
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
        arrived = self.http.state.t0 if hasattr(self.http.state, "t0") else time.perf_counter()
        self._deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s - (
            time.perf_counter() - arrived)
        c = self.request.alignment.conservativeness
        self.metrics.conservativeness.observe(c)
        self._log(conservativeness=c, omega=self.request.alignment.omega, engine_request_id=self.request.request_id)

    def _log(self, **fields: Any) -> None:
        log = getattr(self.http.state, "log", None)
        if log is None:
            log = {}
            self.http.state.log = log
        log.update(fields)

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
            raise APIError(504, f"the request ran past its deadline of {self.settings.request_timeout_s:g} s",
                           code="timeout") from None
        except StopAsyncIteration:
            self.failed = True
            raise APIError(500, "the engine ended the request without a result", code="engine_error",
                           type="server_error") from None
        except Exception as exc:  # engine and model errors -> their API status (400/503/500)
            self.failed = True
            raise from_exception(exc, self.settings.retry_after_s) from None
        self._observe(ev)
        return ev

    def _observe(self, ev: TokenEvent) -> None:
        now = time.perf_counter()
        if self._last_t == 0.0:
            arrived = getattr(self.http.state, "t0", now)
            self.metrics.ttft.labels(self.endpoint).observe(now - arrived)
        else:
            self.metrics.itl.observe(now - self._last_t)
        self._last_t = now
        if ev.finish_reason is not None:
            self.finished = True
            self.metrics.prompt_tokens.inc(ev.prompt_tokens)
            self.metrics.completion_tokens.inc(ev.completion_tokens)
            heads = (ev.telemetry or {}).get("heads_reweighted", 0)
            if heads:
                self.metrics.heads_reweighted.inc(heads)
            dissolved = bool((ev.telemetry or {}).get("contrast_dissolved"))
            if dissolved:
                self.metrics.contrast_dissolved.inc()
            self._log(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                      finish_reason=ev.finish_reason, engine_ms=round(self.stats.engine_s * 1000, 3),
                      queue_ms=round(self.stats.queue_s * 1000, 3), heads_reweighted=heads,
                      **({"contrast_dissolved": True} if dissolved else {}))

    def _cancelled(self, reason: str) -> None:
        self.metrics.cancelled.labels(reason).inc()
        self._log(cancelled=reason)

    def timing_headers(self) -> dict[str, str]:
        """Where the time went, so clients (bench/load.py) can tell the server's overhead from the engine's time:
        `x-engine-time-ms` (submission to final token, queueing included), `x-queue-time-ms`, and
        `x-server-time-ms` (arrival to response, i.e. everything but the network and the client)."""
        arrived = getattr(self.http.state, "t0", None)
        server = (time.perf_counter() - arrived) * 1000 if arrived is not None else 0.0
        return {"x-engine-time-ms": f"{self.stats.engine_s * 1000:.3f}",
                "x-queue-time-ms": f"{self.stats.queue_s * 1000:.3f}", "x-server-time-ms": f"{server:.3f}"}

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
        gone = asyncio.ensure_future(_client_gone(self.http))
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
        return Outcome("".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens,
                       dict(last.telemetry or {}))


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
