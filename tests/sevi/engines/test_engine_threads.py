"""Engine CPU thread counts and the vLLM log line kept out of the server log (no model loaded)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from server.settings import Settings
from sevi.engines.api import default_cpu_threads
from sevi.engines.reference.transformers_engine import TransformersEngine
from sevi.engines.vllm import vllm_engine
from sevi.engines.vllm.vllm_engine import _THREAD_WARNING_FILTER, VllmEngine
from tests.support.waiting import eventually


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (16, 15)])
def test_default_threads_leave_one_core_to_the_server(cores: int, threads: int) -> None:
    assert default_cpu_threads(cores) == threads


def test_torch_threads_setting_reaches_the_vllm_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At load the engine sets torch's threads to the setting (on CPU); the load is stopped right after."""
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the thread count is set on CPU only")
    set_to: list[int] = []

    def record(n: int) -> None:
        set_to.append(n)
        raise RuntimeError("stop here")

    monkeypatch.setattr(vllm_engine, "set_torch_threads", record)
    engine = VllmEngine.from_settings(Settings(model=str(tmp_path), engine="vllm", torch_threads=3))
    environ = os.environ.copy()  # the load exports vLLM's and the kernels' variables: put them back after
    try:
        asyncio.run(engine.start())
        try:
            eventually(lambda: engine.load_error is not None, 120, what="the engine's load to stop at the thread count")
        finally:
            asyncio.run(engine.stop())
    finally:
        os.environ.clear()
        os.environ.update(environ)
    assert set_to == [3] and "stop here" in (engine.load_error or "")


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("vllm.v1.worker.cpu_worker", logging.WARNING, __file__, 1, message, None, None)


def test_the_per_request_thread_warning_is_dropped_and_nothing_else() -> None:
    stub = "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it."
    assert not _THREAD_WARNING_FILTER.filter(_record(stub))
    assert _THREAD_WARNING_FILTER.filter(_record("libtcmalloc is not found in LD_PRELOAD."))


@pytest.mark.parametrize("setting", [None, 3])
def test_reference_engine_sets_its_threads_on_load(
    setting: int | None, tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 99)  # so that a change is due; no global change
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    TransformersEngine(str(tiny_model_dir("llava")), model_name="t", torch_threads=setting)._load()
    assert calls == [setting or default_cpu_threads()]
