"""The vLLM engine on two workers (vLLM's `mp` executor, one core each) against the reference engine.

Tensor parallelism gives each worker half of a layer's query heads; SEVI's cross-head quantities are then
exchanged between the workers (sevi/engines/vllm/plugin/tensor_parallel.py). Pipeline parallelism gives each
worker half of the layers. Either way a mixed batch (alignment off, on, with contrastive decoding greedy and
sampled) must give the reference engine's tokens, and the telemetry read from both workers must be the
reference engine's, i.e. what one worker reports (heads summed over the shards, rows counted once).
Without the exchange the tensor-parallel batch gave other tokens from the fourth aligned one on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from sevi.engines.reference.generation import ReferenceModel  # noqa: E402
from sevi.engines.vllm.options import VllmOptions  # noqa: E402
from sevi.engines.vllm.vllm_engine import VllmEngine  # noqa: E402
from tests.support.engines import check_mixed_batch, start_engine  # noqa: E402

pytestmark = pytest.mark.integration


def _engine(model_dir: Path, **options: int) -> Iterator[VllmEngine]:
    with pytest.MonkeyPatch.context() as mp:
        # One core per worker: vLLM's CPU workers refuse to share cores without a binding.
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        engine = VllmEngine(
            str(model_dir),
            model_name="tiny",
            max_batch_size=16,
            options=VllmOptions(distributed_executor_backend="mp", **options),
        )  # type: ignore[arg-type]
        start_engine(engine, timeout=300)
        try:
            yield engine
        finally:
            asyncio.run(engine.stop())


@pytest.fixture(scope="module")
def ref(tiny_model: Callable[[str], ReferenceModel]) -> ReferenceModel:
    return tiny_model("llava")


@pytest.fixture(scope="module")
def tp2(tiny_model_dir: Callable[[str], Path]) -> Iterator[VllmEngine]:
    yield from _engine(tiny_model_dir("llava"), tensor_parallel_size=2)


@pytest.fixture(scope="module")
def pp2(tiny_model_dir: Callable[[str], Path]) -> Iterator[VllmEngine]:
    yield from _engine(tiny_model_dir("llava"), pipeline_parallel_size=2)


def test_tensor_parallel_mixed_batch_equals_reference_engine(tp2: VllmEngine, ref: ReferenceModel) -> None:
    check_mixed_batch(tp2, ref)


def test_pipeline_parallel_mixed_batch_equals_reference_engine(pp2: VllmEngine, ref: ReferenceModel) -> None:
    check_mixed_batch(pp2, ref)
