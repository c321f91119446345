"""The vLLM engine as served (torch.compile on; the other LLaVA tests run eager for a quick start): the
SEVI backend is an opaque attention op inside the compiled graph, so alignment and contrast must give the
reference engine's tokens and telemetry there too."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from sevi.engines.reference.generation import ReferenceModel  # noqa: E402
from sevi.engines.vllm.options import VllmOptions  # noqa: E402
from sevi.engines.vllm.vllm_engine import VllmEngine  # noqa: E402
from tests.support.engines import check_mixed_batch, start_engine  # noqa: E402

pytestmark = pytest.mark.integration


def test_compiled_engine_equals_reference_engine(
    tiny_model_dir: Callable[[str], Path], tiny_model: Callable[[str], ReferenceModel]
) -> None:
    engine = VllmEngine(
        str(tiny_model_dir("llava")), model_name="tiny", max_batch_size=16, options=VllmOptions(enforce_eager=False)
    )
    try:
        start_engine(engine)
        assert engine._engine.vllm_config.compilation_config.mode != 0  # really compiled (0 = NONE)
        check_mixed_batch(engine, tiny_model("llava"))
    finally:
        asyncio.run(engine.stop())
