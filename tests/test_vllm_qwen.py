"""The vLLM engine against the reference engine on the tiny Qwen2-VL (GQA, M-RoPE, image-only "other" span),
compiled as when serving (torch.compile; the other vLLM tests run eager)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from models.generation import ReferenceModel  # noqa: E402
from server.engines.vllm_engine import VllmEngine, VllmOptions  # noqa: E402
from tests.test_vllm_engine import check_mixed_batch  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Iterator[VllmEngine]:
    eng = VllmEngine(str(tiny_model_dir("qwen2_vl")), model_name="tiny-qwen", max_batch_size=16,
                     options=VllmOptions(enforce_eager=False))
    asyncio.run(eng.start())
    deadline = time.monotonic() + 300
    while not eng.ready and time.monotonic() < deadline:
        assert eng.load_error is None, eng.load_error
        time.sleep(0.1)
    assert eng.ready
    yield eng
    asyncio.run(eng.stop())


def test_mixed_batch_equals_reference_engine(engine: VllmEngine,
                                             tiny_model: Callable[[str], ReferenceModel]) -> None:
    check_mixed_batch(engine, tiny_model("qwen2_vl"))
