"""Whether a vLLM engine is dead: the one place that knows how vLLM shows it (used by sevi/engines/vllm/vllm_engine.py).

vLLM 0.32 shows a death in three ways, each checked here without blocking (the server's watchdog calls this about
twice a second on the event loop, and the engine's worker after a step raised):

- the `mp` / `ray` executor's monitor saw a worker process exit (a killed TP/PP worker): it sets `is_failed`,
  shuts the executor down, and every later step raises `RuntimeError("Executor failed.")`;
- a worker process is no longer alive (the same, read from the processes themselves, in case the monitor has
  not run yet);
- an engine core in its own process died (`AsyncLLM` / the multiprocess engine client): `EngineDeadError`
  from a call, and the client's `errored` flag.

To re-attach this to another way of running vLLM (e.g. `AsyncLLM` with the engine core out of process), pass
that engine object: the checks read attributes where they exist and skip those that do not.
"""

from __future__ import annotations

from typing import Any


def vllm_engine_failure(engine: Any, exc: BaseException | None = None) -> str | None:
    """Why `engine` (a vLLM `LLMEngine` or `AsyncLLM`) can no longer serve, naming what died; None while it can.
    `exc`: what a step just raised, if anything (an `EngineDeadError` is fatal by itself)."""
    if engine is None:
        return None
    if exc is not None and _is_engine_dead_error(exc):
        return f"vLLM's engine core died ({type(exc).__name__}: {exc})"
    if getattr(engine, "errored", False) is True:  # AsyncLLM / the engine core client: its core process is gone
        return "vLLM's engine core died (the engine reports errored)"
    executor = _executor(engine)
    if executor is None:
        return None
    procs = [getattr(worker, "proc", None) for worker in getattr(executor, "workers", None) or ()]
    # Every exited one is named: once one dies the executor stops the others, and which went first is a race.
    exited = [
        f"{p.name} (pid {p.pid}, exit code {p.exitcode})" for p in procs if p is not None and p.exitcode is not None
    ]
    if exited:
        return "vLLM worker process exited: " + ", ".join(exited)
    if getattr(executor, "is_failed", False) is True:
        return f"vLLM's executor failed ({type(executor).__name__}: a worker died)"
    return None


def _executor(engine: Any) -> Any:
    """The model executor of an in-process engine core: `LLMEngine.model_executor` (set when the core runs in this
    process), else through the client (`engine_core.engine_core.model_executor`); None when the core is elsewhere."""
    executor = getattr(engine, "model_executor", None)
    if executor is None:
        core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
        executor = getattr(core, "model_executor", None)
    return executor


def _is_engine_dead_error(exc: BaseException) -> bool:
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # vLLM moved or renamed it: fall back to the name
        return type(exc).__name__ == "EngineDeadError"
    return isinstance(exc, EngineDeadError)
