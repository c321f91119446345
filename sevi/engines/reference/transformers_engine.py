"""The reference engine: `sevi.engines.reference.generation.ReferenceModel` driven by one background worker thread.

Why one thread: the model is not thread-safe and a CPU has few cores; one thread keeps the batch full
while the event loop stays free for HTTP. The worker takes queued requests into a batch (a "cohort",
one `DecodeBatch`, knobs may differ per request), steps every running cohort once per turn and hands
each step's events to the requests' asyncio queues with one `call_soon_threadsafe` per loop. A new
cohort starts for newly arrived requests while others run (up to `max_cohorts`), so an arrival waits
for one step and its own prefill, not for a whole batch to finish. An exception in one cohort fails
only that cohort's requests; the worker logs it and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sevi.engines.api import (
    DEFAULT_MAX_BATCH_SIZE,
    SAMPLING_EXTENSIONS,
    EngineError,
    EngineNotReady,
    EngineSettings,
    EngineStats,
    GenerationRequest,
    GenerationStats,
    QueuedEngine,
    RequestError,
    TokenEvent,
    default_cpu_threads,
    set_torch_threads,
)
from sevi.engines.contrast_pool import ContrastPool
from sevi.engines.dtype import resolve_dtype
from sevi.engines.reference.generation import DecodeBatch, ReferenceModel
from sevi.kernels.alignment_dispatch import compiled_operator
from sevi.runtime import runtime_env

log = logging.getLogger("sevi.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent | BaseException]
    stats: GenerationStats
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by the consumer under the engine lock
    finished: bool = False  # the final event (or an error) was handed over


@dataclass(eq=False)
class _Cohort:
    batch: DecodeBatch
    jobs: dict[str, _Job]


class TransformersEngine(QueuedEngine):
    sampling_extensions = frozenset(SAMPLING_EXTENSIONS)  # sevi.engines.api.SamplingParams has them all

    def __init__(
        self,
        model_dir: str,
        *,
        model_name: str,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_cohorts: int = 2,
        dtype: str = "float32",
        device: str = "cpu",
        contrast_pool_dir: str | None = None,
        torch_threads: int | None = None,
        runtime: runtime_env.RuntimeOptions | None = None,
    ) -> None:
        super().__init__()
        self._model_dir = model_dir
        self._model_name = model_name
        self._max_batch = max_batch_size
        self._max_queue = max_queue
        self._max_cohorts = max_cohorts
        self._dtype = _DTYPES[dtype]
        self._dtype_name = dtype
        self._device = device
        self._pool_dir = contrast_pool_dir
        self._torch_threads = torch_threads
        # The kernel switches (settings.kernels), exported at load for the method's modules, which read them from
        # the environment in every process (sevi/runtime/runtime_env.py); None (built alone): left as they are.
        self.runtime = runtime
        self._model: ReferenceModel | None = None
        self._load_error: str | None = None
        # Touched by the worker only; read racily (ints) for stats.
        self._cohorts: list[_Cohort] = []
        self._running = 0
        self._cancelled_waiting = 0  # guarded by _cond (the consumer's side)
        self._cancelled_running = 0  # the worker's side
        self._failed_batches = 0

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> TransformersEngine:
        batch = settings.max_batch_size if settings.max_batch_size is not None else DEFAULT_MAX_BATCH_SIZE
        return cls(
            str(settings.model),
            model_name=settings.model_id,
            max_batch_size=batch,
            max_queue=settings.max_queue,
            max_cohorts=settings.max_cohorts,
            dtype=resolve_dtype(settings.dtype, settings.model, settings.device.startswith("cuda")),
            device=settings.device,
            torch_threads=settings.torch_threads,
            contrast_pool_dir=str(settings.contrast_pool) if settings.contrast_pool else None,
            runtime=settings.runtime_options(),
        )

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._model is not None and not self._stopping

    @property
    def num_layers(self) -> int:
        if self._model is None:
            raise EngineNotReady("the model is not loaded yet")
        return self._model.num_layers

    def stats(self) -> EngineStats:
        return EngineStats(
            queue_depth=len(self._pending),
            running=self._running,
            cancelled_total=self._cancelled_waiting + self._cancelled_running,
            failed_batches_total=self._failed_batches,
        )

    # ---- the async side ----------------------------------------------------------------------------
    def _new_job(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[Any],
        stats: GenerationStats,
    ) -> _Job:
        return _Job(request, loop, queue, stats)

    def _cancel(self, job: _Job) -> None:
        with self._cond:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            try:
                self._pending.remove(job)  # still waiting: just free its queue slot
                self._cancelled_waiting += 1
            except ValueError:
                self._cancels.append(job)  # running: the worker drops it from its batch
                self._cond.notify()

    # ---- the worker thread -------------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self._cohorts)

    def _turn(self, cancels: list[_Job], admitted: list[_Job]) -> None:
        for job in cancels:
            self._drop(job)
        if admitted:
            self._start_cohort(admitted)
        for cohort in list(self._cohorts):
            self._step(cohort)

    def _load(self) -> None:
        if self.runtime is not None:
            runtime_env.export(self.runtime)
        on_cpu = torch.device(self._device).type == "cpu"
        threads = self._torch_threads or (default_cpu_threads() if on_cpu else None)
        if threads:
            set_torch_threads(threads)
        if on_cpu:
            compiled_operator()  # built (or loaded) now, not in the first aligned request
        pool = ContrastPool.from_folder(self._pool_dir) if self._pool_dir else None
        t0 = time.perf_counter()
        self._model = ReferenceModel.load(self._model_dir, dtype=self._dtype, device=self._device, contrast_pool=pool)
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "model": self._model_dir,
                    "seconds": round(time.perf_counter() - t0, 3),
                    "layers": self._model.num_layers,
                }
            },
        )

    def _admit(self) -> list[_Job]:
        """Waiting jobs for one new cohort (called under the lock)."""
        free = self._max_batch - self._running
        if free <= 0 or not self._pending or len(self._cohorts) >= self._max_cohorts:
            return []
        jobs = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
        self._running += len(jobs)
        return jobs

    def _start_cohort(self, jobs: list[_Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.stats.queue_s = now - job.submitted
        if len(jobs) == 1:
            self._start_cohort_alone(jobs[0])
            return
        assert self._model is not None
        try:
            batch = self._model.start([j.request for j in jobs])
        except Exception:  # noqa: BLE001 - one request the model refuses must not sink the others
            for job in jobs:
                self._start_cohort_alone(job)
            return
        self._cohorts.append(_Cohort(batch, {j.request.request_id: j for j in jobs}))

    def _start_cohort_alone(self, job: _Job) -> None:
        assert self._model is not None
        try:
            self._cohorts.append(_Cohort(self._model.start([job.request]), {job.request.request_id: job}))
        except RequestError as exc:
            self._finish(job, exc)
        except ValueError as exc:
            # The processor's own input checks (e.g. Qwen2-VL's aspect-ratio bound) raise ValueError: the
            # request's fault, so a 400, logged in case it was ours after all.
            log.warning("model refused a request", exc_info=exc, extra={"fields": {"request": job.request.request_id}})
            self._finish(job, RequestError(f"the model cannot process this input: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a failing batch must not kill the worker
            self._batch_failed([job], exc)

    def _step(self, cohort: _Cohort) -> None:
        try:
            events = cohort.batch.step()
        except Exception as exc:  # noqa: BLE001
            self._cohorts.remove(cohort)
            self._batch_failed(list(cohort.jobs.values()), exc)
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, TokenEvent | BaseException]]] = {}
        now = time.perf_counter()
        for ev in events:
            job = cohort.jobs.get(ev.request_id)
            if job is None:
                continue
            if ev.finish_reason is not None:
                job.stats.engine_s = now - job.submitted
                self._release(cohort, job)
            by_loop.setdefault(job.loop, []).append((job, ev))
        if cohort.batch.done and cohort in self._cohorts:
            self._cohorts.remove(cohort)
        for loop, items in by_loop.items():
            self._post(loop, items)

    def _drop(self, job: _Job) -> None:
        """Cancel a running job: its rows leave the batch before the next forward."""
        for cohort in self._cohorts:
            if job.request.request_id in cohort.jobs and cohort.jobs[job.request.request_id] is job:
                cohort.batch.cancel(job.request.request_id)
                self._release(cohort, job)
                self._cancelled_running += 1
                if cohort.batch.done:
                    self._cohorts.remove(cohort)
                return

    def _release(self, cohort: _Cohort, job: _Job) -> None:
        del cohort.jobs[job.request.request_id]
        job.finished = True
        self._running -= 1

    def _batch_failed(self, jobs: list[_Job], exc: BaseException) -> None:
        self._failed_batches += 1
        log.error(
            "batch of %d failed",
            len(jobs),
            exc_info=exc,
            extra={"fields": {"requests": [j.request.request_id for j in jobs]}},
        )
        err = EngineError(f"{type(exc).__name__}: {exc}")
        for job in jobs:
            self._finish(job, err)

    def _turn_failed(self, err: EngineError, admitted: list[_Job]) -> None:
        self._failed_batches += 1
        running = [job for cohort in self._cohorts for job in cohort.jobs.values()]
        self._cohorts.clear()
        for job in running + admitted:
            if not job.finished:  # an admitted job may be in a cohort too, or already refused
                self._finish(job, err)

    def _finish(self, job: _Job, item: BaseException) -> None:
        """End a job that was admitted (counted as running) with an error."""
        if not job.finished:
            job.finished = True
            self._running -= 1
        self._post(job.loop, [(job, item)])

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            waiting = list(self._pending)
            self._pending.clear()
        for job in waiting:
            job.finished = True
            self._post(job.loop, [(job, exc)])
        for cohort in self._cohorts:
            for job in list(cohort.jobs.values()):
                self._finish(job, exc)
        self._cohorts.clear()

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[_Job, Any]]) -> None:
        def deliver() -> None:
            for job, item in items:
                job.queue.put_nowait(item)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            loop.call_soon_threadsafe(deliver)
