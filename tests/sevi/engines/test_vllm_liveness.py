"""vLLM's signs of death as sevi/engines/vllm/vllm_liveness.py reads them, on stand-ins for vLLM's objects (the kill
itself is tests/sevi/engines/test_vllm_death.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sevi.engines.vllm.vllm_liveness import vllm_engine_failure


def _proc(name: str, exitcode: int | None) -> SimpleNamespace:
    return SimpleNamespace(name=name, pid=100 + len(name), exitcode=exitcode)


def _engine(*exitcodes: int | None, is_failed: bool = False) -> SimpleNamespace:
    workers = [SimpleNamespace(proc=_proc(f"VllmWorker-{i}", code)) for i, code in enumerate(exitcodes)]
    return SimpleNamespace(model_executor=SimpleNamespace(workers=workers, is_failed=is_failed))


def test_alive_engines_and_engines_without_workers() -> None:
    assert vllm_engine_failure(None) is None
    assert vllm_engine_failure(_engine(None, None)) is None
    assert vllm_engine_failure(SimpleNamespace(model_executor=SimpleNamespace())) is None  # uni executor
    assert vllm_engine_failure(SimpleNamespace()) is None  # engine core elsewhere, not errored
    assert vllm_engine_failure(_engine(None), RuntimeError("a request's own failure")) is None


def test_an_exited_worker_is_named() -> None:
    reason = vllm_engine_failure(_engine(None, -9))
    assert reason is not None and "VllmWorker-1" in reason and "-9" in reason and "VllmWorker-0" not in reason


def test_the_executor_s_failed_flag() -> None:
    reason = vllm_engine_failure(_engine(None, None, is_failed=True))
    assert reason is not None and "executor failed" in reason


def test_through_the_in_process_client_and_an_errored_core() -> None:
    inner = _engine(0)
    assert vllm_engine_failure(SimpleNamespace(engine_core=SimpleNamespace(engine_core=inner))) is not None
    assert vllm_engine_failure(SimpleNamespace(errored=True)) == "vLLM's engine core died (the engine reports errored)"


def test_engine_dead_error_is_fatal() -> None:
    exceptions = pytest.importorskip("vllm.v1.engine.exceptions")
    reason = vllm_engine_failure(_engine(None), exceptions.EngineDeadError())
    assert reason is not None and reason.startswith("vLLM's engine core died (EngineDeadError")
