"""The vLLM engine with its engine core in its own process, as `vllm serve` runs it (`--vllm.engine-core process`).

vLLM's `AsyncLLM` runs the engine core (scheduler, SEVI's scheduler and logits processor, the model workers with
the SEVI attention backend) in a child process and talks to it over ZMQ; this process keeps HTTP, validation,
image loading, prompt rendering and vLLM's own output processing (incremental detokenization, stop strings). Then
the interpreter lock of the server no longer serialises the engine's scheduling with HTTP, streaming and
detokenization (sevi/engines/vllm/vllm_engine.py runs `LLMEngine` in a thread of the server instead).

What changes against the in-thread engine, and why it still holds:
- contrast pairs: the two rows reach the engine core one message each, so a step may run between them; the SEVI
  scheduler holds the first row until its partner has arrived (sevi/engines/vllm/plugin/scheduler.py), and the pair is
  then admitted together as before;
- telemetry: read per finished request through the plugin's one channel, `collective_rpc` by name to its worker
  extension (sevi/engines/vllm/plugin/telemetry.py; the in-thread engine reads it the same way), only for requests
  that aligned or contrasted anything (a request at conservativeness 0 pays no round trip);
- stop strings and detokenization are vLLM's (`detokenize=True`); EOS and `stop_token_ids` end a request with
  "stop" and, as in the other engines, are neither in the text nor counted in `completion_tokens`;
- the queue bound and the stats count requests in vLLM past its batch (`max_num_seqs` / 2 requests), as before;
- cancellation (the consumer closes the iterator: client gone, deadline) aborts both rows in the engine core;
- health (issue 27's contract): the engine core process dead (`AsyncLLM.errored`, or `EngineDeadError` from a
  request) declares the engine dead: /health and /ready 503, requests in flight and new ones `EngineDead`.

Synchronous scheduling still: the SEVI scheduler decides a pair's lockstep from each step's outputs before the next
step is planned, which vLLM's async scheduling (one step planned ahead, outputs as placeholders) does not allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from sevi.engines.api import (
    EngineDead,
    EngineError,
    EngineNotReady,
    EngineOverloaded,
    EngineStats,
    GenerationRequest,
    GenerationStats,
    RequestError,
    TokenEvent,
    stop_ids,
    stream_events,
)
from sevi.engines.vllm.vllm_engine import VllmEngine, _param_of, log, vllm_sampling_extensions
from sevi.engines.vllm.vllm_liveness import vllm_engine_failure
from sevi.method.telemetry import Telemetry
from sevi.runtime import runtime_env


class VllmProcessEngine(VllmEngine):
    """`VllmEngine`'s settings, prompt rendering and contrast draw; vLLM's `AsyncLLM` instead of its worker thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._llm: Any = None
        # AsyncLLM lives on one event loop (its output handler is a task there): a loop of its own in a thread, so
        # that any caller's loop (uvicorn's, a test's asyncio.run) can use it; events cross by call_soon_threadsafe.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._closing = False

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._loop_thread is None:
            self._loop_thread = threading.Thread(target=self._serve_loop, name="sevi-vllm-async", daemon=True)
            self._loop_thread.start()

    def _serve_loop(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._load_process()
        except Exception as exc:  # noqa: BLE001 - any load failure is reported through /health and /ready
            self._load_error = f"failed to load {self._model_dir}{self._load_context}: {exc}"
            log.exception(f"model load failed{self._load_context}")
            loop.close()
            return
        self._loop = loop
        loop.run_forever()
        loop.close()

    def _load_process(self) -> None:
        # vLLM's own default: the engine core in a child process (it inherits this environment).
        runtime_env.prepare_vllm_engine_process(self.options.cpu_kv_cache_gib)
        kwargs, usage_context = self._prepare()
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.perf_counter()
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), usage_context=usage_context)
        self._max_batch = max(1, int(llm.vllm_config.scheduler_config.max_num_seqs) // 2)
        self._llm = llm
        self._loaded(llm.vllm_config, t0)

    async def stop(self) -> None:
        self._closing = True
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        if self._loop_thread is not None:
            await asyncio.to_thread(self._loop_thread.join, 30.0)

    @property
    def ready(self) -> bool:
        return (
            self._llm is not None
            and self._loop is not None
            and not self._closing
            and self._dead_reason is None
            and not self._llm.errored
        )

    def _liveness_failure(self) -> str | None:
        """The engine's loop thread gone, or vLLM's engine core process dead (`AsyncLLM.errored`; vllm_liveness)."""
        thread = self._loop_thread
        if (
            thread is not None
            and self._llm is not None
            and not thread.is_alive()
            and not self._closing
            and self._load_error is None
        ):
            return f"the engine's loop thread {thread.name!r} exited"
        return vllm_engine_failure(self._llm)

    @property
    def num_layers(self) -> int:
        if self._llm is None:
            raise EngineNotReady("the model is not loaded yet")
        return self._num_layers

    def stats(self) -> EngineStats:
        inflight = self._inflight
        running = min(inflight, self._max_batch)
        return EngineStats(
            queue_depth=inflight - running,
            running=running,
            cancelled_total=self._cancelled,
            failed_batches_total=self._failed,
        )

    # ---- requests -------------------------------------------------------------------------------------
    async def generate(
        self, request: GenerationRequest, stats: GenerationStats | None = None
    ) -> AsyncIterator[TokenEvent]:
        if self._dead_reason is not None:
            raise EngineDead(self._dead_reason)
        if not self.ready:
            raise EngineNotReady(self._load_error or "the model is still loading")
        with self._cond:  # the counters are shared with the engine's loop thread
            if self._inflight - self._max_batch >= self._max_queue:
                raise EngineOverloaded(f"the request queue is full ({self._max_queue} waiting); retry later")
            self._counter += 1
            main_id = f"{request.request_id}:{self._counter}"
        try:
            rows = self._requests(request, main_id)
        except (ValueError, TypeError) as exc:
            raise RequestError(str(exc), _param_of(exc)) from None
        stats = stats or GenerationStats()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        caller = asyncio.get_running_loop()
        state = {"finished": False}

        def post(items: list[Any]) -> None:
            last = items[-1]
            if isinstance(last, BaseException) or last.finish_reason is not None:
                state["finished"] = True

            def deliver() -> None:
                for item in items:
                    queue.put_nowait(item)

            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                caller.call_soon_threadsafe(deliver)

        with self._cond:
            self._inflight += 1
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._run(request, main_id, rows, stats, post), self._loop)
        future.add_done_callback(self._left)  # also when cancelled before it started (its finally never runs)

        def cancel() -> None:
            with self._cond:
                self._cancelled += 1
            future.cancel()  # CancelledError inside vLLM's generate: it aborts the row in the engine core

        async with contextlib.aclosing(stream_events(queue, lambda: state["finished"], cancel)) as events:
            async for event in events:
                yield event

    def _left(self, _: object) -> None:
        with self._cond:
            self._inflight -= 1

    async def _run(
        self,
        request: GenerationRequest,
        main_id: str,
        rows: tuple[dict[str, Any], Any, tuple[Any, Any] | None],
        stats: GenerationStats,
        post: Callable[[list[Any]], None],
    ) -> None:
        """One request on the engine's loop: its rows added, vLLM's outputs posted to the caller as token events."""
        main_prompt, main_sp, contrast = rows
        contrast_id = main_id + ":contrast" if contrast is not None else None
        submitted = time.perf_counter()
        try:
            if contrast is not None:
                # Contrast first, main second: the engine core holds the first until the second is there.
                await self._llm.add_request(contrast_id, *contrast)
            outputs = self._llm.generate(main_prompt, main_sp, main_id)
            async with contextlib.aclosing(outputs):
                async for batch in self._events(outputs, request, main_id, contrast_id, submitted, stats):
                    post(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM validation: a 400; a dead engine core: EngineDead, a 503
            post([self._translate(exc)])
        finally:
            if contrast_id is not None and self._llm is not None:
                with contextlib.suppress(Exception):
                    await self._llm.abort(contrast_id, internal=True)

    def _requests(self, req: GenerationRequest, main_id: str) -> tuple[dict[str, Any], Any, tuple[Any, Any] | None]:
        """The main row's prompt and vLLM sampling params, and the contrast row's (None without contrast)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from sevi.engines.vllm.plugin.params import to_extra_args

        params = req.alignment
        sp = req.sampling
        contrast = params.contrast and bool(req.images)
        pair = main_id if contrast else None
        text = self._prompt_text(req)
        base: dict[str, Any] = dict(
            max_tokens=sp.max_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p,
            seed=None if contrast else sp.seed,  # a pair samples in the logits processor with sevi_seed
            presence_penalty=sp.presence_penalty,
            frequency_penalty=sp.frequency_penalty,
            stop_token_ids=stop_ids(sp, self._eos),
            ignore_eos=sp.ignore_eos,
            **vllm_sampling_extensions(sp),
        )
        seed = sp.seed if contrast else None
        main_sp = SamplingParams(
            **base,
            stop=list(sp.stop),
            output_kind=RequestOutputKind.DELTA,
            extra_args=to_extra_args(params, role="main" if contrast else None, pair=pair, key=main_id, seed=seed),
        )
        if not contrast:
            return self._prompt(text, req.images), main_sp, None
        assert self._pool is not None
        images = req.contrast_images or self._pool.draw(sp.seed, req.images[0], k=len(req.images))
        # The contrast row's text is never read: no detokenization, one output at the end.
        c_sp = SamplingParams(
            **base,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            extra_args=to_extra_args(params, role="contrast", pair=pair, seed=seed),
        )
        return self._prompt(text, req.images), main_sp, (self._prompt(text, images), c_sp)

    async def _events(
        self,
        outputs: AsyncIterator[Any],
        req: GenerationRequest,
        main_id: str,
        contrast_id: str | None,
        submitted: float,
        stats: GenerationStats,
    ) -> AsyncIterator[list[TokenEvent]]:
        """vLLM's delta outputs as the engines' token events, one list per output (they cross to the caller's loop
        in one wake-up): one event per token, the new text on the last of each delta; a stop token (EOS,
        stop_token_ids) ends with "stop" and is not counted."""
        stops = set(stop_ids(req.sampling, self._eos))
        generated = 0
        prompt_len = 0
        first = True
        async for out in outputs:
            if first:
                stats.queue_s = time.perf_counter() - submitted
                first = False
            prompt_len = len(out.prompt_token_ids or []) or prompt_len
            comp = out.outputs[0] if out.outputs else None
            tokens = list(comp.token_ids) if comp is not None else []
            text = comp.text if comp is not None else ""
            reason = (comp.finish_reason if comp is not None else None) if out.finished else None
            stopped_by_token = comp is not None and reason == "stop" and not isinstance(comp.stop_reason, str)
            if stopped_by_token and tokens and tokens[-1] in stops:
                tokens = tokens[:-1]  # the stop token: not part of the output, as in the other engines
            batch: list[TokenEvent] = []
            for i, token in enumerate(tokens):
                generated += 1
                last = i == len(tokens) - 1
                if last and reason is not None:
                    break
                batch.append(TokenEvent(req.request_id, token, text if last else "", None, prompt_len, generated))
            if reason is not None:
                stats.engine_s = time.perf_counter() - submitted
                telemetry = await self._telemetry(req, main_id, contrast_id)
                token = tokens[-1] if tokens else None
                batch.append(TokenEvent(req.request_id, token, text, reason, prompt_len, generated, telemetry))
                yield batch
                return
            if batch:
                yield batch
        raise EngineError("vLLM ended the request without a final output")

    async def _telemetry(self, req: GenerationRequest, main_id: str, contrast_id: str | None) -> Telemetry:
        if not self._has_telemetry(req, contrast_id):
            return Telemetry()
        from sevi.engines.vllm.plugin.telemetry import TELEMETRY_RPC, request_telemetry

        replies = await self._llm.collective_rpc(TELEMETRY_RPC, args=([main_id],))
        return Telemetry.from_mapping(request_telemetry(replies, main_id))

    def _translate(self, exc: BaseException) -> BaseException:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):  # every request in flight gets it; the first declares the engine dead
            reason = vllm_engine_failure(self._llm, exc) or f"vLLM's engine core died: {exc}"
            self._declare_dead(reason)
            return EngineDead(reason)
        if isinstance(exc, VLLMValidationError | ValueError | TypeError):
            return RequestError(str(exc), _param_of(exc))
        self._failed += 1
        log.error("vLLM request failed", exc_info=exc)
        return EngineError(f"{type(exc).__name__}: {exc}")
