"""Shared fixtures: tiny random models of each family, built once per test session (about a second each).

Shared helpers that are not fixtures (images, engines, live servers, waiting, REPO) are in tests/support/, by topic.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton's interpreter (the Triton kernels' tests, and the engine on SEVI_ALIGNED_KERNEL=triton) is chosen when
# triton decorates kernels, including its own library's at import, which transformers and vLLM trigger: set it
# before any of them is imported. Without CUDA nothing else here uses triton (vLLM's CPU build disables it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# vLLM engines in tests start eager (seconds instead of a torch.compile); the compiled path, the serving
# default, has its own tests (tests/sevi/engines/test_vllm_qwen.py, test_compiled_engine_equals_reference_engine).
os.environ.setdefault("SEVI_VLLM_ENFORCE_EAGER", "true")

# Servers built from Settings in tests compare their tokens with the float32 reference engine: they serve float32
# on every machine, not `auto` (bfloat16 where the CPU has native bfloat16, as on AMX and AVX512_BF16 machines).
# The auto choice itself is tested in tests/sevi/engines/test_dtype.py.
os.environ.setdefault("SEVI_DTYPE", "float32")

from sevi.engines.reference.generation import ReferenceModel  # noqa: E402
from sevi.testing.tiny import build  # noqa: E402
from tests.support.tiny_models import TINY_KWARGS  # noqa: E402


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
