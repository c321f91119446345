"""The vLLM engine (`--engine vllm`): vLLM's engine in-process behind the server's engine interface.

Why `LLMEngine` in one thread and not `AsyncLLM`: in vLLM 0.32 `AsyncLLM` always runs its engine core
in a child process and talks to it over ZMQ. Then (1) the two rows of a contrastive-decoding pair,
added one after the other, may land in different scheduler steps and fall out of lockstep at once,
(2) the per-request alignment telemetry stays in the child, and (3) start-up costs ~20 s more. The
in-process `LLMEngine` (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) adds both rows of a pair before the next
`step()`, so they are admitted together. One worker thread owns the engine (it is not thread-safe) and
hands each step's tokens to the requests' asyncio queues; the event loop stays free for HTTP.
Tensor/pipeline parallelism keep this shape: the engine core stays here, the workers are vLLM's
(`mp` or `ray` executor), and the SEVI plugin loads in each of them through its entry point.

Token events mirror the reference engine's (`sevi.engines.reference.generation.DecodeBatch._advance`): EOS ends with
"stop" and is not part of the text; text is the full decode of the generated ids; stop strings are
cut by this engine (vLLM does not detokenize here), which then aborts the request.

Settings arrive as objects: `settings.vllm` (:class:`sevi.engines.vllm.options.VllmSettings`: `--vllm.*` or
`SEVI_VLLM_*`) and the kernel switches (`settings.runtime_options()`), which `_load` exports into the
environment before vLLM starts, since vLLM's worker processes get nothing else (sevi/runtime/runtime_env.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    is_stop_token,
    set_torch_threads,
    stop_ids,
    text_stream,
)
from sevi.engines.api import SamplingParams as RequestSampling
from sevi.engines.contrast_pool import ContrastPool
from sevi.engines.detokenizer import TextStream
from sevi.engines.dtype import resolve_dtype
from sevi.engines.vllm.options import VllmSettings
from sevi.engines.vllm.vllm_liveness import vllm_engine_failure
from sevi.families import eos_token_ids, find_spec, image_parts, render_prompt
from sevi.method.telemetry import Telemetry
from sevi.runtime import runtime_env

log = logging.getLogger("sevi.engine.vllm")
SCHEDULER_CLS = "sevi.engines.vllm.plugin.scheduler.SeviScheduler"


class _DropRepeatedThreadWarning(logging.Filter):
    """vLLM's CPU worker replaces `torch.set_num_threads` by a stub that logs a warning, and vLLM's own
    multimodal renderer calls it twice per request: two lines per request that say nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads` after the thread binding" not in record.getMessage()


_THREAD_WARNING_FILTER = _DropRepeatedThreadWarning()


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent | BaseException]
    stats: GenerationStats
    output: TextStream  # the generated ids and text
    submitted: float = field(default_factory=time.perf_counter)
    main_id: str = ""
    contrast_id: str | None = None
    prompt_len: int = 0
    admitted: bool = False
    cancelled: bool = False
    finished: bool = False


class VllmEngine(QueuedEngine):
    sampling_extensions = frozenset(SAMPLING_EXTENSIONS)  # sevi.engines.api.SamplingParams has them all
    _thread_name = "sevi-vllm"
    _join_timeout_s = 60.0
    _load_context = " with vLLM"
    _log = log

    def __init__(
        self,
        model_dir: str,
        *,
        model_name: str,
        max_batch_size: int | None = None,
        max_queue: int = 64,
        dtype: str = "float32",
        contrast_pool_dir: str | None = None,
        max_images_per_request: int = 4,
        torch_threads: int | None = None,
        options: VllmSettings | None = None,
        runtime: runtime_env.RuntimeOptions | None = None,
    ) -> None:
        super().__init__()
        self._torch_threads = torch_threads
        self._model_dir = model_dir
        self._model_name = model_name
        # None: the device's default, resolved at load (vllm_batch_args); until then the CPU's, for the stats.
        self._batch_setting = max_batch_size
        self._max_batch = max_batch_size if max_batch_size is not None else DEFAULT_MAX_BATCH_SIZE
        self._max_queue = max_queue
        self._dtype = dtype
        self._dtype_name = dtype
        self._cache_details: dict[str, str] = {}  # vLLM's CPU cache layout and how aligned rows read it
        self._pool_dir = contrast_pool_dir
        self._max_images = max_images_per_request
        env_only: dict[str, Any] = {}  # built alone (tests, bench/): every field from SEVI_VLLM_* or its default
        self.options = options or VllmSettings(**env_only)
        # Exported at load for vLLM's processes; None (built alone): the environment is left as it is.
        self.runtime = runtime
        self._engine: Any = None
        self._processor: Any = None
        self._tokenizer: Any = None
        self._pool: ContrastPool | None = None
        self._eos: set[int] = set()
        self._num_layers = 0
        self._load_error: str | None = None
        self._jobs: dict[str, _Job] = {}  # vLLM request id (main) -> job; worker thread only
        self._contrast_of: dict[str, str] = {}  # main id -> contrast id; worker thread only
        self._inflight = 0  # admitted, not finished
        self._cancelled = 0
        self._failed = 0
        self._counter = 0

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> VllmEngine:
        return cls(
            str(settings.model),
            model_name=settings.model_id,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            dtype=resolve_dtype(settings.dtype, settings.model, _on_gpu()),
            contrast_pool_dir=str(settings.contrast_pool) if settings.contrast_pool else None,
            max_images_per_request=settings.max_images_per_request,
            torch_threads=settings.torch_threads,
            options=settings.vllm,
            runtime=settings.runtime_options(),
        )

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def stop(self) -> None:
        await super().stop()
        engine, self._engine = self._engine, None
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.engine_core.shutdown()

    @property
    def ready(self) -> bool:
        return self._engine is not None and not self._stopping

    # ---- liveness (vLLM's signs of death: sevi/engines/vllm/vllm_liveness.py) ----------------------------
    def _liveness_failure(self) -> str | None:
        return super()._liveness_failure() or vllm_engine_failure(self._engine)

    def _fatal_failure(self, exc: BaseException) -> str | None:
        return super()._fatal_failure(exc) or vllm_engine_failure(self._engine, exc)

    @property
    def aligned_kernel(self) -> str:
        # The plugin's choice (SEVI_ALIGNED_KERNEL or the machine's default); the uni executor's worker runs here
        from sevi.kernels.choice import aligned_kernel

        return aligned_kernel()

    @property
    def serving_details(self) -> dict[str, str]:
        return {**super().serving_details, **self._cache_details}

    @property
    def num_layers(self) -> int:
        if self._engine is None:
            raise EngineNotReady("the model is not loaded yet")
        return self._num_layers

    def stats(self) -> EngineStats:
        running = min(self._inflight, self._max_batch)
        return EngineStats(
            queue_depth=len(self._pending) + self._inflight - running,
            running=running,
            cancelled_total=self._cancelled,
            failed_batches_total=self._failed,
        )

    # ---- the async side -------------------------------------------------------------------------------
    def _new_job(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[Any],
        stats: GenerationStats,
    ) -> _Job:
        # generate() makes jobs only once loaded, so the tokenizer is there
        return _Job(request, loop, queue, stats, text_stream(self._tokenizer, request.sampling))

    def _queue_depth(self) -> int:
        # Requests vLLM holds past the batch wait too: count them against the queue bound.
        return len(self._pending) + max(0, self._inflight - self._max_batch)

    def _cancel(self, job: _Job) -> None:
        with self._cond:
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                self._cancelled += 1
            else:
                self._cancels.append(job)
                self._cond.notify()

    # ---- the worker thread ----------------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self._jobs)

    def _admit(self) -> list[_Job]:
        room = max(0, self._max_batch + self._max_queue - self._inflight)
        return [self._pending.popleft() for _ in range(min(room, len(self._pending)))]

    def _turn(self, cancels: list[_Job], admitted: list[_Job]) -> None:
        for job in cancels:
            if job.admitted and not job.finished:
                job.finished = True
                self._release(job, vllm_done=False)
                self._cancelled += 1
        for job in admitted:
            self._add(job)
        if self._jobs:
            # A step that raises fails what was running and the worker serves on (QueuedEngine._turn_failed).
            self._dispatch(self._engine.step())

    def _load(self) -> None:
        # Before vLLM is imported and starts workers: they inherit the environment, not this object.
        runtime_env.prepare_vllm_engine(self.options.cpu_kv_cache_gib)  # the engine core in this process
        kwargs, usage_context = self._prepare()
        from vllm import EngineArgs, LLMEngine

        t0 = time.perf_counter()
        self._engine = LLMEngine.from_engine_args(EngineArgs(**kwargs), usage_context=usage_context)
        # The queue bound and the stats count requests: two sequences each at most (a contrast row).
        self._max_batch = max(1, int(self._engine.vllm_config.scheduler_config.max_num_seqs) // 2)
        self._loaded(self._engine.vllm_config, t0)

    def _loaded(self, vllm_config: Any, t0: float) -> None:
        """After vLLM's engine is built: the cache details /ready reports, and the log line."""
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            self._cache_details = _cpu_cache_details(vllm_config)
        log.info(
            "vLLM model loaded",
            extra={
                "fields": {
                    "model": self._model_dir,
                    "layers": self._num_layers,
                    "seconds": round(time.perf_counter() - t0, 3),
                    **self.serving_details,
                }
            },
        )

    def _prepare(self) -> tuple[dict[str, Any], Any]:
        """Everything before vLLM's engine is built, in the server's process: the environment, the plugin, the
        processor, the contrast pool, EOS; returns the EngineArgs fields and the usage context."""
        if self.runtime is not None:
            runtime_env.export(self.runtime)
        from transformers import AutoProcessor
        from vllm.platforms import current_platform

        from sevi.engines.vllm.plugin import register
        from sevi.engines.vllm.plugin.telemetry import EXTENSION

        register()  # vLLM calls it too; explicit so a source checkout without entry points still works
        if current_platform.is_cpu():
            logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_THREAD_WARNING_FILTER)  # once per process
            set_torch_threads(self._torch_threads or default_cpu_threads())
        path = Path(self._model_dir)
        config = json.loads((path / "config.json").read_text())
        kwargs, usage_context = self._engine_kwargs(config)
        # The telemetry's one channel, `collective_rpc` by name, whether the workers share this process or not.
        kwargs.setdefault("worker_extension_cls", EXTENSION)
        self._processor = AutoProcessor.from_pretrained(path)
        self._tokenizer = self._processor.tokenizer
        self._pool = ContrastPool.from_folder(self._pool_dir) if self._pool_dir else ContrastPool.default()
        generation = path / "generation_config.json"
        self._eos = set(
            eos_token_ids(config, json.loads(generation.read_text()) if generation.exists() else None, self._tokenizer)
        )
        return kwargs, usage_context

    def _engine_kwargs(self, config: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        from vllm.platforms import current_platform

        opts = self.options
        text_cfg = config.get("text_config", config)
        self._num_layers = int(text_cfg["num_hidden_layers"])
        batch_args, usage_context = vllm_batch_args(self._batch_setting, _on_gpu())
        kwargs: dict[str, Any] = dict(
            model=str(Path(self._model_dir)),
            dtype=self._dtype,
            seed=opts.seed,
            max_model_len=opts.max_model_len,
            **batch_args,
            tensor_parallel_size=opts.tensor_parallel_size,
            pipeline_parallel_size=opts.pipeline_parallel_size,
            distributed_executor_backend=opts.distributed_executor_backend
            or default_executor(opts.tensor_parallel_size * opts.pipeline_parallel_size, _on_gpu()),
            limit_mm_per_prompt={"image": self._max_images},
            enable_prefix_caching=opts.prefix_caching,
            enforce_eager=opts.enforce_eager,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            disable_log_stats=False,
        )
        # Contrast pairs scheduled in lockstep, and no aligned row in the prefix cache (scheduler.py). Synchronous
        # scheduling: the pairs' lockstep is decided from each step's outputs before the next step is planned.
        kwargs.update(scheduler_cls=SCHEDULER_CLS, async_scheduling=False)
        kwargs.update(opts.engine_args)
        spec = find_spec(config.get("model_type"))
        if not config.get("architectures") and spec is not None:
            # vLLM reads the architecture from config.json; folders saved from a bare config may lack it.
            kwargs["hf_overrides"] = {"architectures": [spec.architecture]}
        if current_platform.is_cpu() and opts.pipeline_parallel_size > 1 and opts.enforce_eager:
            # vLLM's CPU workers allocate the buffers a later pipeline stage receives into only in their compile
            # warm-up, which eager mode skips: the first step would fail (vLLM 0.32).
            log.warning("enforce_eager ignored: vLLM's CPU pipeline stages need the compiled model's warm-up")
            kwargs["enforce_eager"] = False
        if current_platform.is_cuda():
            # FULL CUDA graphs would replay the stock attention and skip the alignment (gpu_backend.py).
            kwargs["compilation_config"] = {"cudagraph_mode": "PIECEWISE"}
        if not _has_entry_point("vllm.logits_processors", "sevi"):
            from sevi.engines.vllm.plugin import LOGITS_PROCESSOR

            kwargs["logits_processors"] = [LOGITS_PROCESSOR]
        return kwargs, usage_context

    # ---- requests in ----------------------------------------------------------------------------------
    def _add(self, job: _Job) -> None:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        from sevi.engines.vllm.plugin.params import to_extra_args

        req = job.request
        self._counter += 1
        job.main_id = f"{req.request_id}:{self._counter}"
        params = req.alignment
        sp = req.sampling
        contrast = params.contrast and bool(req.images)
        pair = job.main_id if contrast else None
        try:
            text = self._prompt_text(req)
            base: dict[str, Any] = dict(
                max_tokens=sp.max_tokens,
                temperature=sp.temperature,
                top_p=sp.top_p,
                seed=sp.seed,
                presence_penalty=sp.presence_penalty,
                frequency_penalty=sp.frequency_penalty,
                stop_token_ids=stop_ids(sp, self._eos),
                ignore_eos=sp.ignore_eos,
                **vllm_sampling_extensions(sp),
                detokenize=False,
                output_kind=RequestOutputKind.DELTA,
            )
            if contrast:  # the logits processor samples a pair with this seed (params.py: sevi_seed)
                base["seed"] = None
            seed = sp.seed if contrast else None
            main_sp = SamplingParams(
                **base,
                extra_args=to_extra_args(
                    params, role="main" if contrast else None, pair=pair, key=job.main_id, seed=seed
                ),
            )
            prompt = self._prompt(text, req.images)
            if contrast:
                assert self._pool is not None
                images = req.contrast_images or self._pool.draw(sp.seed, req.images[0], k=len(req.images))
                job.contrast_id = job.main_id + ":contrast"
                c_sp = SamplingParams(**base, extra_args=to_extra_args(params, role="contrast", pair=pair, seed=seed))
                # Contrast first, main second, both before the next step(): admitted in the same step.
                self._engine.add_request(job.contrast_id, self._prompt(text, images), c_sp)
            self._engine.add_request(job.main_id, prompt, main_sp)
        except (ValueError, TypeError, VLLMValidationError) as exc:  # vLLM's validation (incl. SEVI's): a 400
            if job.contrast_id is not None:
                with contextlib.suppress(Exception):
                    self._engine.abort_request([job.contrast_id])
            self._post(job, RequestError(str(exc), _param_of(exc)))
            job.finished = True
            return
        except Exception as exc:  # noqa: BLE001
            self._failed += 1
            self._post(job, EngineError(f"{type(exc).__name__}: {exc}"))
            job.finished = True
            return
        job.admitted = True
        job.stats.queue_s = time.perf_counter() - job.submitted
        self._inflight += 1
        self._jobs[job.main_id] = job
        if job.contrast_id is not None:
            self._contrast_of[job.main_id] = job.contrast_id

    def _prompt_text(self, req: GenerationRequest) -> str:
        n_parts = image_parts(req.messages)
        if n_parts != len(req.images):
            raise ValueError(f"{n_parts} image parts but {len(req.images)} images")
        return render_prompt(self._processor, req.messages)

    @staticmethod
    def _prompt(text: str, images: list[Any]) -> dict[str, Any]:
        # No cache salt: the scheduler keeps aligned rows out of the prefix cache, so every cached block is the
        # unmodified model's and is exact for any request (scheduler.py).
        prompt: dict[str, Any] = {"prompt": text}
        if images:
            rgb = [im.convert("RGB") for im in images]
            prompt["multi_modal_data"] = {"image": rgb[0] if len(rgb) == 1 else rgb}
        return prompt

    # ---- tokens out -----------------------------------------------------------------------------------
    def _dispatch(self, outputs: list[Any]) -> None:
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if job is None or job.finished:
                continue  # a contrast row, or a request already ended here
            job.prompt_len = len(out.prompt_token_ids or []) or job.prompt_len
            events: list[TokenEvent | BaseException] = []
            for token in out.outputs[0].token_ids if out.outputs else []:
                events.append(self._advance(job, int(token)))
                if job.finished:
                    break
            if not job.finished and out.finished:
                # vLLM ended it for a reason the token rules above did not see (e.g. context full).
                reason = (out.outputs[0].finish_reason if out.outputs else None) or "length"
                events.append(self._event(job, None, job.output.flush(), reason))
            if job.finished:
                self._release(job, vllm_done=bool(out.finished))
            if events:
                self._post_many(job, events)

    def _advance(self, job: _Job, token: int) -> TokenEvent:
        if is_stop_token(token, job.request.sampling, self._eos, len(job.output.token_ids)):
            return self._event(job, token, job.output.flush(), "stop")
        new_text, finish = job.output.append(token)
        return self._event(job, token, new_text, finish)

    def _event(self, job: _Job, token: int | None, text: str, finish: str | None) -> TokenEvent:
        telemetry = None
        if finish is not None:
            job.finished = True
            job.stats.engine_s = time.perf_counter() - job.submitted
            telemetry = self._collect_telemetry(job)
        return TokenEvent(
            job.request.request_id, token, text, finish, job.prompt_len, len(job.output.token_ids), telemetry
        )

    def _collect_telemetry(self, job: _Job) -> Telemetry:
        """The request's telemetry from every vLLM worker (one `collective_rpc` by name, the plugin's one channel:
        in-process with the `uni` executor, a message round trip with `mp` / `ray`), merged over shards and stages."""
        if not self._has_telemetry(job.request, job.contrast_id):
            return Telemetry()
        from sevi.engines.vllm.plugin.telemetry import TELEMETRY_RPC, request_telemetry

        replies = self._engine.collective_rpc(TELEMETRY_RPC, args=([job.main_id],))
        return Telemetry.from_mapping(request_telemetry(replies, job.main_id))

    @staticmethod
    def _has_telemetry(request: GenerationRequest, contrast_id: str | None) -> bool:
        """Whether the workers can have counted anything for the request: none is asked for (no round trip) when
        nothing was aligned or contrasted."""
        return request.alignment.active or contrast_id is not None

    def _release(self, job: _Job, vllm_done: bool) -> None:
        """Bookkeeping for a job that ended here; stop its rows in vLLM unless vLLM finished the main one."""
        contrast = self._contrast_of.pop(job.main_id, None)
        ids = ([] if vllm_done else [job.main_id]) + ([contrast] if contrast is not None else [])
        if ids:
            with contextlib.suppress(Exception):  # unknown ids (already finished) are fine
                self._engine.abort_request(ids)
        if self._jobs.pop(job.main_id, None) is not None:
            self._inflight -= 1

    def _turn_failed(self, err: EngineError, admitted: list[_Job]) -> None:
        self._failed += 1
        # A job still held here has not had its final event posted, even where `finished` is already set (the
        # turn may have raised while making that event); an admitted job not held never reached vLLM.
        running = list(self._jobs.values())
        held = {id(job) for job in running}
        for job in running + [j for j in admitted if id(j) not in held and not j.finished]:
            job.finished = True
            self._release(job, vllm_done=False)  # stops its rows in vLLM (and its contrast row)
            self._post(job, err)

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            waiting = list(self._pending)
            self._pending.clear()
        for job in waiting + list(self._jobs.values()):
            job.finished = True
            self._post(job, exc)
        self._jobs.clear()

    def _post(self, job: _Job, item: TokenEvent | BaseException) -> None:
        self._post_many(job, [item])

    @staticmethod
    def _post_many(job: _Job, items: list[TokenEvent | BaseException]) -> None:
        def deliver() -> None:
            for item in items:
                job.queue.put_nowait(item)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            job.loop.call_soon_threadsafe(deliver)


def vllm_sampling_extensions(sp: RequestSampling) -> dict[str, Any]:
    """vLLM's own sampling extensions of a request, as `vllm.SamplingParams` fields (the stop tokens and ignore_eos
    are set by the engine with the model's EOS)."""
    return dict(
        top_k=sp.top_k,
        min_p=sp.min_p,
        repetition_penalty=sp.repetition_penalty,
        min_tokens=sp.min_tokens,
        skip_special_tokens=sp.skip_special_tokens,
        include_stop_str_in_output=sp.include_stop_str_in_output,
    )


def vllm_batch_args(max_batch_size: int | None, on_gpu: bool) -> tuple[dict[str, Any], Any]:
    """vLLM's batch limits (EngineArgs fields) and the usage context (a vLLM `UsageContext`) that picks the
    defaults of those left out.

    A max_batch_size the user set holds on any device: two sequences per request (a contrast row at most).
    Unset, on a GPU: vLLM's own defaults, the ones `vllm serve` picks for the device (its server usage context:
    max_num_seqs 256, 1024 on GPUs of 70 GB and more other than the A100), since a GPU batches hundreds of
    sequences at little cost per row. On CPU: 8 requests (16 sequences), as before; a larger batch only makes
    each step slower on a few cores (vLLM's own server would take 128 sequences there).
    """
    from vllm.usage.usage_lib import UsageContext

    # On GPU the server context also sizes max_num_batched_tokens by device; on CPU it stays vLLM's default.
    context = UsageContext.OPENAI_API_SERVER if on_gpu else UsageContext.ENGINE_CONTEXT
    if max_batch_size is None and on_gpu:
        return {}, context
    batch = max_batch_size if max_batch_size is not None else DEFAULT_MAX_BATCH_SIZE
    return {"max_num_seqs": 2 * batch}, context


def _cpu_cache_details(vllm_config: Any) -> dict[str, str]:
    """vLLM's CPU cache layout on this machine and how the aligned rows read it
    (sevi/engines/vllm/plugin/cpu_backend.py)."""
    from sevi.engines.vllm.plugin.cpu_backend import describe_cache

    model = vllm_config.model_config
    return describe_cache(model.dtype, int(vllm_config.cache_config.block_size), int(model.get_head_size()))


def default_executor(world_size: int, on_gpu: bool, shm_free: int | None = None) -> str | None:
    """vLLM's executor when the settings name none. On a CPU `mp`, as vLLM's own CPU platform does when its engine
    core runs in a child process ("OMP requires the MP executor"): with `uni` the model's forward runs in this
    process with unbound OpenMP threads, which cost the server 9-12% of stock vLLM's rate at c = 0 on the bundled
    model (bench/vs_vllm.py; the forward's native ops took 2.8x as long under py-spy). But `mp` talks to its worker
    through ring buffers in /dev/shm (about 400 MiB with vLLM's defaults), and a container's /dev/shm is 64 MB
    unless it is started with `--shm-size` or `--ipc=host`: there a one-process CPU engine takes `uni` and says why
    rather than fail to load. On one GPU `uni`: the forward there is the device's, and the worker in this process
    lets telemetry skip a message round trip; several GPUs: vLLM's choice."""
    if on_gpu:
        return "uni" if world_size == 1 else None
    if world_size == 1:
        free = shm_free_bytes() if shm_free is None else shm_free
        needed = mp_shm_bytes()
        if free is not None and free < needed:
            log.warning(
                "vLLM executor: uni (the forward in this process), not mp: /dev/shm has %d MiB free and vLLM's "
                "worker queues need %d MiB; start the container with --shm-size 1g (or --ipc=host) for mp, which "
                "decodes about 10%% faster on CPUs",
                free >> 20,
                needed >> 20,
                extra={"fields": {"shm_free_mib": free >> 20, "shm_needed_mib": needed >> 20}},
            )
            return "uni"
    return "mp"


def shm_free_bytes(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory mount; None where there is none (vLLM then skips its own check too)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def mp_shm_bytes() -> int:
    """What vLLM's `mp` executor puts in /dev/shm for one worker: its request broadcast queue
    (VLLM_MQ_MAX_CHUNK_BYTES_MB per chunk) and the worker's response queue (the queue's default chunk size), each
    of `max_chunks` chunks; read from vLLM so that a new release's sizes are the ones checked."""
    import inspect

    import vllm.envs as envs
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    params = inspect.signature(MessageQueue.__init__).parameters
    chunks = int(params["max_chunks"].default)
    response_chunk = int(params["max_chunk_bytes"].default)
    request_chunk = int(envs.VLLM_MQ_MAX_CHUNK_BYTES_MB) * (1 << 20)
    return chunks * (request_chunk + response_chunk) + (16 << 20)  # + room for the queues' metadata


def _on_gpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda_alike())


def _has_entry_point(group: str, name: str) -> bool:
    return any(ep.name == name for ep in importlib.metadata.entry_points(group=group))


def _param_of(exc: BaseException) -> str | None:
    text = str(exc)
    for name in ("conservativeness", "omega", "start_layer", "kappa", "max_tokens", "messages"):
        if name in text:
            return name
    return None
