"""The vLLM engine against the reference engine on the tiny Qwen2-VL (GQA, M-RoPE, image-only "other" span),
compiled as when serving (torch.compile; the other vLLM tests run eager)."""

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


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Iterator[VllmEngine]:
    eng = VllmEngine(
        str(tiny_model_dir("qwen2_vl")),
        model_name="tiny-qwen",
        max_batch_size=16,
        options=VllmOptions(enforce_eager=False),
    )
    start_engine(eng)
    yield eng
    asyncio.run(eng.stop())


def test_mixed_batch_equals_reference_engine(engine: VllmEngine, tiny_model: Callable[[str], ReferenceModel]) -> None:
    check_mixed_batch(engine, tiny_model("qwen2_vl"))
