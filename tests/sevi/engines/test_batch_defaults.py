"""Batch limits that fit the device: `max_batch_size` unset means 8 requests on CPU (and in the reference
engine everywhere), and vLLM's own defaults for the device on a GPU (hundreds of sequences).

No GPU here: its presence is faked at the engine's platform check (`vllm_engine._on_gpu`), and vLLM's
engine constructor is replaced by a stub that records its arguments and answers with the limit vLLM
would resolve (1024 sequences on an H100), so the engine's own wiring (`_load`) runs for real.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from server.settings import Settings
from sevi.engines.api import DEFAULT_MAX_BATCH_SIZE
from sevi.engines.reference.transformers_engine import TransformersEngine


def settings(**values: Any) -> Settings:
    values.setdefault("model", Path("models/bundled"))
    return Settings(**values)


def test_settings_leave_the_batch_size_to_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEVI_MAX_BATCH_SIZE", raising=False)
    assert settings().max_batch_size is None
    monkeypatch.setenv("SEVI_MAX_BATCH_SIZE", "3")
    assert settings().max_batch_size == 3
    with pytest.raises(ValueError):
        settings(max_batch_size=0)


def test_reference_engine_keeps_eight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEVI_MAX_BATCH_SIZE", raising=False)
    assert TransformersEngine.from_settings(settings())._max_batch == DEFAULT_MAX_BATCH_SIZE == 8
    assert TransformersEngine.from_settings(settings(max_batch_size=3))._max_batch == 3


class TestVllm:
    @pytest.fixture(autouse=True)
    def _vllm(self) -> None:
        pytest.importorskip("vllm")

    @pytest.mark.parametrize(
        ("batch", "gpu", "args", "context"),
        [
            (None, False, {"max_num_seqs": 16}, "ENGINE_CONTEXT"),  # CPU: 8 requests, a contrast row each
            (None, True, {}, "OPENAI_API_SERVER"),  # GPU: what `vllm serve` picks for the device
            (4, False, {"max_num_seqs": 8}, "ENGINE_CONTEXT"),
            (4, True, {"max_num_seqs": 8}, "OPENAI_API_SERVER"),  # set by the user: holds on a GPU too
        ],
    )
    def test_batch_args(self, batch: int | None, gpu: bool, args: dict[str, int], context: str) -> None:
        from sevi.engines.vllm.vllm_engine import vllm_batch_args

        got, usage = vllm_batch_args(batch, gpu)
        assert got == args and usage.name == context

    @pytest.mark.parametrize(
        ("batch", "gpu", "vllm_seqs", "seqs_asked", "requests"),
        [
            (None, True, 1024, None, 512),  # vLLM's default on an H100, read back after the load
            (None, False, 16, 16, 8),
            (20, True, 40, 40, 20),
        ],
    )
    def test_load_resolves_and_the_queue_follows(
        self,
        monkeypatch: pytest.MonkeyPatch,
        tiny_model_dir: Callable[[str], Path],
        batch: int | None,
        gpu: bool,
        vllm_seqs: int,
        seqs_asked: int | None,
        requests: int,
    ) -> None:
        from vllm import LLMEngine

        import sevi.engines.vllm.vllm_engine as vllm_engine

        calls: list[tuple[Any, Any]] = []

        def from_engine_args(engine_args: Any, usage_context: Any = None) -> Any:
            calls.append((engine_args, usage_context))
            parallel = SimpleNamespace(distributed_executor_backend=engine_args.distributed_executor_backend)
            return SimpleNamespace(
                vllm_config=SimpleNamespace(
                    scheduler_config=SimpleNamespace(max_num_seqs=vllm_seqs), parallel_config=parallel
                )
            )

        monkeypatch.setattr(LLMEngine, "from_engine_args", from_engine_args)
        monkeypatch.setattr(vllm_engine, "_on_gpu", lambda: gpu)
        monkeypatch.setattr(vllm_engine, "shm_free_bytes", lambda: 1 << 40)  # room for mp, whatever this machine has
        monkeypatch.setattr(vllm_engine, "set_torch_threads", lambda n: None)  # leave this process's threads
        monkeypatch.setattr(vllm_engine, "_cpu_cache_details", lambda config: {})  # the stand-in has no cache
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        monkeypatch.delenv("SEVI_MAX_BATCH_SIZE", raising=False)
        engine = vllm_engine.VllmEngine.from_settings(
            settings(model=tiny_model_dir("llava"), max_batch_size=batch, max_queue=64)
        )
        assert engine._max_batch == (batch or DEFAULT_MAX_BATCH_SIZE)  # before the load: for the stats only
        engine._load()

        ((args, usage),) = calls
        assert args.max_num_seqs == seqs_asked
        assert usage.name == ("OPENAI_API_SERVER" if gpu else "ENGINE_CONTEXT")
        # One device: the worker in this process on a GPU; on a CPU vLLM's mp executor (its OpenMP binding).
        assert args.distributed_executor_backend == ("uni" if gpu else "mp")
        assert engine._max_batch == requests
        # The queue bound and the stats count against the resolved limit: `requests` run, 64 more wait.
        engine._inflight = requests + 10
        stats = engine.stats()
        assert stats.running == requests and stats.queue_depth == 10
        engine._pending.extend(object() for _ in range(100))
        assert len(engine._admit()) == 54 and engine._queue_depth() == 46 + 10
