"""The engine API: the request contract every engine and the server share (:class:`GenerationRequest`,
:class:`SamplingParams`, :class:`TokenEvent`, :class:`RequestError`) and the engine interface the routes talk to.
An engine owns a model and turns requests into token events; it reads the server's settings by shape
(:class:`EngineSettings`) and never imports the server.

Contract of `generate`: an async iterator of :class:`TokenEvent` for one request, ending after the event
with a `finish_reason`. Errors surface from the iterator: :class:`EngineOverloaded` (queue full) and
:class:`EngineNotReady` before the first event, `RequestError` for a request the
model refuses, :class:`EngineError` when the engine failed while running it, :class:`EngineDead` (at any
point) once the engine can no longer serve at all. Closing the iterator early (client gone, deadline)
cancels the request and frees its batch slot.

Liveness: `health()` says whether the engine can still serve; the server's watchdog (server/watchdog.py)
polls it, turns the probes and `sevi_engine_up` to "dead", and exits the process after a grace period so
that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from sevi.engines.detokenizer import TextStream
from sevi.method.knob import PAPER_MAP, AlignmentParams, KnobMap, load_knob_map
from sevi.method.telemetry import Telemetry
from sevi.runtime import runtime_env

# Requests decoding at once where max_batch_size is unset: the reference engine everywhere, the vLLM engine on
# CPU (a few cores: a larger batch makes every step slower). On a GPU the vLLM engine follows vLLM's own
# defaults instead (sevi/engines/vllm/vllm_engine.py: vllm_batch_args).
DEFAULT_MAX_BATCH_SIZE = 8

# Fields of vLLM's sampling parameters that an engine may honour (`SamplingParams` below has them all); the chat
# schema (server/schemas/vllm_extensions.py) declares them and refuses those an engine does not list.
SAMPLING_EXTENSIONS: tuple[str, ...] = (
    "ignore_eos",
    "min_tokens",
    "top_k",
    "min_p",
    "repetition_penalty",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
)


class RequestError(ValueError):
    """A request the model cannot run (too long, too many images...). `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # OpenAI's: subtracted from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: times how often each token was generated so far
    ignore_eos: bool = False  # run to max_tokens (benchmarks compare equal work, as vLLM's --ignore-eos)
    # vLLM's sampling extensions (its chat API's documented fields), with vLLM's meaning and defaults.
    top_k: int = 0  # keep the k likeliest tokens; 0 (or -1) = all
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0  # prompt and generated tokens: logit / p if positive, else logit x p
    min_tokens: int = 0  # no EOS, stop token or stop string before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # end with "stop" on any of these (not in the text), as on EOS
    skip_special_tokens: bool = True  # leave special tokens out of the text
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text


def stop_ids(sampling: SamplingParams, eos_ids: set[int] | frozenset[int]) -> list[int]:
    """The tokens that end a request with "stop": EOS (unless ignore_eos) and the request's stop_token_ids."""
    return sorted(set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(eos_ids)))


def is_stop_token(token: int, sampling: SamplingParams, eos_ids: set[int] | frozenset[int], generated: int) -> bool:
    """Whether `token`, after `generated` tokens, ends the request with "stop" (vLLM's rules: EOS unless
    ignore_eos, any stop_token_ids; neither before min_tokens)."""
    if generated < sampling.min_tokens:
        return False
    return token in sampling.stop_token_ids or (token in eos_ids and not sampling.ignore_eos)


def text_stream(tokenizer: Any, sampling: SamplingParams) -> TextStream:
    """A request's output text with its stop strings and vLLM's text options."""
    return TextStream(
        tokenizer,
        sampling.stop,
        sampling.max_tokens,
        min_tokens=sampling.min_tokens,
        skip_special_tokens=sampling.skip_special_tokens,
        include_stop=sampling.include_stop_str_in_output,
    )


@dataclass
class GenerationRequest:
    """One request as the engine sees it. `messages` use content parts {"type": "image"|"text"}; the
    images fill the image parts in order. `contrast_images` pins the contrast images (else drawn)."""

    request_id: str
    messages: list[dict[str, Any]]
    images: list[Image.Image]
    alignment: AlignmentParams
    sampling: SamplingParams = field(default_factory=SamplingParams)
    contrast_images: list[Image.Image] | None = None


@dataclass
class TokenEvent:
    """One generated token (or the end) of one request. `text` is the new text since the last event."""

    request_id: str
    token_id: int | None
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    telemetry: Telemetry | None = None  # on the final event


def user_message(prompt: str, n_images: int = 1) -> list[dict[str, Any]]:
    """The chat for a captioning request: the image(s), then the prompt text."""
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    parts.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": parts}]


class EngineSettings(Protocol):
    """What an engine reads of the server's settings tree (`server.settings.Settings` has it all): engines take
    it by shape, so that they never import the server. `vllm` is the vLLM engine's group (its `VllmSettings`)."""

    @property
    def engine(self) -> str: ...
    @property
    def model(self) -> Path: ...
    @property
    def model_id(self) -> str: ...
    @property
    def max_batch_size(self) -> int | None: ...
    @property
    def max_queue(self) -> int: ...
    @property
    def max_cohorts(self) -> int: ...
    @property
    def max_images_per_request(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def torch_threads(self) -> int | None: ...
    @property
    def contrast_pool(self) -> Path | None: ...
    @property
    def vllm(self) -> Any: ...
    def runtime_options(self) -> runtime_env.RuntimeOptions: ...


def default_cpu_threads(cores: int | None = None) -> int:
    """torch threads for an engine computing on the CPU: every core this process may use but one.

    The one left is for the HTTP loop, the tokenizer and the scheduler, as vLLM's own CPU executor
    reserves a core for its scheduler process. Measured on 2 cores (bench/engines.py, bundled model):
    with 1 thread vLLM decodes ~2.5x faster than with 2, whose OpenMP workers spin against the Python
    threads, and the reference engine ~15% faster.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def set_torch_threads(n: int) -> None:
    """Set the calling thread's torch threads, before the model loads. A no-op when already `n`: once
    vLLM's CPU worker has started in this process it forbids the call (and logs a warning)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


class EngineError(RuntimeError):
    """The engine failed while running a request (not the request's fault)."""


class EngineOverloaded(RuntimeError):
    """The wait queue is full: try again later (HTTP 503 + Retry-After)."""


class EngineNotReady(RuntimeError):
    """The model is still loading, failed to load, or the engine is stopping (HTTP 503)."""


class EngineDead(EngineNotReady):
    """The engine died (a worker process or thread is gone): nothing more can run in this process (HTTP 503).
    Requests in flight end with it, new ones are refused with it, until the process exits and is restarted."""


@dataclass(frozen=True)
class EngineHealth:
    """What `Engine.health()` reports: alive, or dead and why (the cause names what died)."""

    alive: bool
    reason: str | None = None


@dataclass
class GenerationStats:
    """Timings the engine fills in for one request (seconds, monotonic clock)."""

    queue_s: float = 0.0  # submitted -> admitted into a batch
    engine_s: float = 0.0  # submitted -> final event produced (queue included)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics."""

    queue_depth: int
    running: int
    cancelled_total: int
    failed_batches_total: int


class Engine(ABC):
    """One model behind one engine. `start()` may return before the model is loaded: see `ready`."""

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: EngineSettings) -> Engine: ...

    @abstractmethod
    async def start(self) -> None:
        """Begin loading the model and serving; returns quickly (loading goes on in the background)."""

    @abstractmethod
    async def stop(self) -> None:
        """Fail queued and running requests with EngineNotReady and release the model."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True once the model is loaded and requests can run."""

    # Set by subclasses: the served model id, its folder, and why loading failed if it did.
    _model_name: str = ""
    _model_dir: str = ""
    _load_error: str | None = None
    _knob_map: KnobMap | None = None
    _dead_reason: str | None = None  # set once, when the engine is found dead (never cleared)

    def health(self) -> EngineHealth:
        """Alive, or dead with the cause. Polled by the server's watchdog about twice a second on the event loop:
        cheap and non-blocking. An engine that can die in ways its requests do not reveal (a worker process
        killed while idle) looks here; see `QueuedEngine._liveness_failure`."""
        if self._dead_reason is not None:
            return EngineHealth(False, self._dead_reason)
        return EngineHealth(True)

    # vLLM's sampling extensions this engine honours (`sevi.engines.api.SAMPLING_EXTENSIONS`); the chat
    # route refuses the others by name when a request sets them.
    sampling_extensions: frozenset[str] = frozenset()

    @property
    def knob_map(self) -> KnobMap:
        """How `conservativeness` maps to SEVI's parameters for this model: the folder's `sevi_presets.json`,
        else the paper's map (sevi.method.knob). Read once; `create_engine` reads it before the model loads, so
        that a bad file stops start-up instead of failing every request."""
        if self._knob_map is None:
            self._knob_map = load_knob_map(self._model_dir) if self._model_dir else PAPER_MAP
        return self._knob_map

    @property
    def aligned_kernel(self) -> str:
        """The kernel that computes SEVI's aligned rows ("triton" | "c" | "torch"): the torch operator unless an
        engine says otherwise."""
        return "torch"

    _dtype_name: str = "float32"

    @property
    def serving_details(self) -> dict[str, str]:
        """What this machine runs, for /ready and the start-up log: the weights dtype and the aligned kernel
        (engines add what they know, such as vLLM's cache layout)."""
        return {"dtype": self._dtype_name, "aligned_kernel": self.aligned_kernel}

    @property
    def batch_limit(self) -> int | None:
        """Requests the engine decodes at once once loaded (None: it does not say). The batch command keeps this many
        running and as many more decoded and waiting, so the engine never waits for its input."""
        return None

    @property
    def load_error(self) -> str | None:
        """Why loading failed, if it did (the process is then alive but useless)."""
        return self._load_error

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    @abstractmethod
    def num_layers(self) -> int:
        """Decoder layers, which the conservativeness knob maps start_layer onto. Valid once ready."""

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @abstractmethod
    def generate(self, request: GenerationRequest, stats: GenerationStats | None = None) -> AsyncIterator[TokenEvent]:
        """Token events for one request; see the module docstring for the contract."""


async def stream_events(
    queue: asyncio.Queue[Any], finished: Callable[[], bool], cancel: Callable[[], None]
) -> AsyncGenerator[TokenEvent, None]:
    """One request's events as its engine posts them to `queue`, up to the final one; an exception posted
    there is raised. Leaving early (consumer closed, deadline, disconnect) calls `cancel` unless the
    request already finished. Consumers must close it promptly (`contextlib.aclosing`)."""
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        if not finished():
            cancel()


class QueuedJob(Protocol):
    """What :class:`QueuedEngine` needs of a job; each engine's job dataclass adds its own fields."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    finished: bool


class QueuedEngine(Engine):
    """An engine whose one worker thread takes requests from a bounded queue and steps its batch.

    Shared here: the thread's life (start, stop, load, wait for work, take cancellations and
    admissions under the lock, fail everything at shutdown), admission in `generate` (ready, shutting
    down, queue full -> 503) and the event stream with cancel-on-leave. Each subclass loads its model,
    makes its jobs, counts its queue depth, admits, cancels, and runs one turn of its batch.
    """

    _max_queue: int
    _model_dir: str
    _thread_name = "sevi-engine"
    _join_timeout_s = 30.0
    _load_context = ""  # appended to the load error ("failed to load DIR<context>: ...")
    _log = logging.getLogger("sevi.engine")

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: deque[Any] = deque()  # admitted to the queue, not yet to a batch; guarded by _cond
        self._cancels: list[Any] = []  # running jobs whose consumer left; guarded by _cond
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Every job between submission and its consumer leaving (guarded by _cond): what a death must end, wherever
        # the job is (waiting, in a batch, or inside a worker step that will never return).
        self._live: set[Any] = set()
        # torch threads of the worker thread, where the model runs (set once loaded; the count is per thread).
        self.compute_threads: int | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name=self._thread_name, daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            # A dead engine's thread may be stuck in a step that never returns: do not hold the exit for it.
            timeout = 5.0 if self._dead_reason is not None else self._join_timeout_s
            await asyncio.to_thread(self._thread.join, timeout)

    # ---- liveness ----------------------------------------------------------------------------------
    def health(self) -> EngineHealth:
        if self._dead_reason is None and not self._stopping and self._load_error is None:
            reason = self._liveness_failure()
            if reason is not None:
                self._declare_dead(reason)
        return super().health()

    def _liveness_failure(self) -> str | None:
        """Why this engine can no longer serve, found by looking rather than by a failing request; None while it
        can. Here: the worker thread has exited (it only does at stop or after a failed load, both excluded).
        Engines with processes of their own add their checks (vLLM: sevi/engines/vllm/vllm_liveness.py)."""
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._stopping and self._load_error is None:
            return f"the engine's worker thread {thread.name!r} exited"
        return None

    def _fatal_failure(self, exc: BaseException) -> str | None:
        """After a turn raised `exc`: why the engine is dead, or None when only that turn failed (a 500 for the
        requests it held, and the worker serves on). By default: whatever `_liveness_failure` now finds."""
        return self._liveness_failure()

    def _declare_dead(self, reason: str) -> None:
        """The engine is dead (any thread): refuse new requests, end every request in flight with EngineDead at once
        (a step stuck on a dead worker would otherwise hold them to their deadline), stop the worker loop, log it."""
        with self._cond:
            if self._dead_reason is not None:
                return
            self._dead_reason = reason
            jobs = list(self._live)
            self._pending.clear()
            self._cond.notify_all()
        self._log.error("engine dead", extra={"fields": {"cause": reason, "requests_in_flight": len(jobs)}})
        err = EngineDead(reason)
        for job in jobs:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                job.loop.call_soon_threadsafe(job.queue.put_nowait, err)

    def _worker(self) -> None:
        try:
            self._load()
            self.compute_threads = torch.get_num_threads()
            self._log.info("torch threads", extra={"fields": {"threads": self.compute_threads}})
        except Exception as exc:  # noqa: BLE001 - any load failure is reported through /health and /ready
            self._load_error = f"failed to load {self._model_dir}{self._load_context}: {exc}"
            self._log.exception(f"model load failed{self._load_context}")
            return
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - past the turn guard (a bug in the recovery itself): dead
            self._log.error("engine worker thread died", exc_info=exc)
            self._declare_dead(f"the engine's worker thread {self._thread_name!r} died: {type(exc).__name__}: {exc}")
            return
        if self._dead_reason is not None:
            self._fail_all(EngineDead(self._dead_reason))
        else:
            self._fail_all(EngineNotReady("the server is shutting down"))

    def _serve(self) -> None:
        """The worker's loop: wait for work, take cancellations and admissions under the lock, run a turn."""
        while True:
            with self._cond:
                while not (self._stopping or self._dead_reason or self._pending or self._cancels or self._busy()):
                    self._cond.wait()
                if self._stopping or self._dead_reason is not None:
                    break
                cancels, self._cancels = self._cancels, []
                admitted = self._admit()
            try:
                self._turn(cancels, admitted)
            except Exception as exc:  # noqa: BLE001 - a bug in one turn fails the requests it held, not the worker
                fatal = self._fatal_failure(exc)
                if fatal is not None:
                    self._log.error("engine turn failed on a dead engine", exc_info=exc)
                    self._declare_dead(fatal)
                    break
                self._log.exception("engine turn failed")
                self._turn_failed(EngineError(f"{type(exc).__name__}: {exc}"), admitted)

    @abstractmethod
    def _load(self) -> None:
        """Load the model (in the worker thread); an exception becomes `load_error`."""

    @abstractmethod
    def _busy(self) -> bool:
        """Whether anything is running (the worker then keeps turning without new work)."""

    @abstractmethod
    def _admit(self) -> list[Any]:
        """Waiting jobs to take into the batch now (called under `_cond`)."""

    @abstractmethod
    def _turn(self, cancels: list[Any], admitted: list[Any]) -> None:
        """One turn of the worker: drop the cancelled jobs, start the admitted ones, step the batch."""

    @abstractmethod
    def _turn_failed(self, err: EngineError, admitted: list[Any]) -> None:
        """A turn raised past the engine's own error handling: end every running job and this turn's admitted
        ones with `err` (a 500 to their clients) and leave the batch empty, so the worker serves on. Without
        it the worker thread died and every request then waited out its deadline."""

    @abstractmethod
    def _fail_all(self, exc: BaseException) -> None:
        """End every waiting and running job with `exc` (shutdown)."""

    @abstractmethod
    def _new_job(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[Any],
        stats: GenerationStats,
    ) -> QueuedJob: ...

    @abstractmethod
    def _cancel(self, job: Any) -> None:
        """Called by the consumer when it leaves before the final event."""

    @property
    def batch_limit(self) -> int | None:
        # Each queued engine keeps its batch limit in `_max_batch` (the vLLM engine sets it from vLLM's own at load).
        limit = getattr(self, "_max_batch", None)
        return int(limit) if isinstance(limit, int) else None

    def _queue_depth(self) -> int:
        """Requests counted against `max_queue` (under `_cond`): by default those waiting."""
        return len(self._pending)

    async def generate(
        self, request: GenerationRequest, stats: GenerationStats | None = None
    ) -> AsyncIterator[TokenEvent]:
        if self._dead_reason is not None:
            raise EngineDead(self._dead_reason)
        if not self.ready:
            raise EngineNotReady(self._load_error or "the model is still loading")
        job = self._new_job(request, asyncio.get_running_loop(), asyncio.Queue(), stats or GenerationStats())
        with self._cond:
            if self._dead_reason is not None:
                raise EngineDead(self._dead_reason)
            if self._stopping:
                raise EngineNotReady("the server is shutting down")
            if self._queue_depth() >= self._max_queue:
                raise EngineOverloaded(f"the request queue is full ({self._max_queue} waiting); retry later")
            self._pending.append(job)
            self._live.add(job)
            self._cond.notify()
        try:
            async with contextlib.aclosing(
                stream_events(job.queue, lambda: job.finished, lambda: self._cancel(job))
            ) as events:
                async for event in events:
                    yield event
        finally:
            with self._cond:
                self._live.discard(job)
