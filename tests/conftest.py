"""Shared fixtures: tiny random models of each family, built once per test session (about a second each)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

# Triton's interpreter (the Triton kernels' tests, and the engine on SEVI_ALIGNED_KERNEL=triton) is chosen when
# triton decorates kernels, including its own library's at import, which transformers and vLLM trigger: set it
# before any of them is imported. Without CUDA nothing else here uses triton (vLLM's CPU build disables it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from PIL import Image  # noqa: E402

from models.generation import ReferenceModel  # noqa: E402
from models.tiny import build  # noqa: E402
from server.engines.base import Engine  # noqa: E402

# vLLM engines in tests start eager (seconds instead of a torch.compile); the compiled path, the serving
# default, has its own tests (test_vllm_qwen.py, test_compiled_engine_equals_reference_engine).
os.environ.setdefault("SEVI_VLLM_ENFORCE_EAGER", "true")

# GQA everywhere (8 query heads over 4 KV heads for LLaVA; Qwen2-VL 4 over 2), head_dim 32.
TINY_KWARGS = {
    "llava": {"layers": 4, "heads": 8, "kv_heads": 4},
    "llava_next": {"layers": 4, "heads": 8, "kv_heads": 4},
    "qwen2_vl": {"layers": 4, "heads": 4, "kv_heads": 2},
    "qwen2_5_vl": {"layers": 4, "heads": 4, "kv_heads": 2},
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family -> folder of a saved tiny model (built on first use)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            build(family, out, seed=0, **TINY_KWARGS[family])
            built[family] = out
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Callable[[str], Path]) -> Callable[[str], ReferenceModel]:
    """family -> a loaded ReferenceModel (shared; tests must not mutate it without restoring)."""
    loaded: dict[str, ReferenceModel] = {}

    def get(family: str) -> ReferenceModel:
        if family not in loaded:
            loaded[family] = ReferenceModel.load(tiny_model_dir(family))
        return loaded[family]

    return get


def random_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def start_engine(engine: Engine, timeout: float = 300) -> Engine:
    """Start an engine and wait until its model is loaded (fails with the engine's load error)."""
    asyncio.run(engine.start())
    deadline = time.monotonic() + timeout
    while not engine.ready and time.monotonic() < deadline:
        assert engine.load_error is None, engine.load_error
        time.sleep(0.1)
    assert engine.ready, f"the engine did not load within {timeout} s"
    return engine
