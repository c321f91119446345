"""Let PyPI's torchvision wheel import beside the CPU torch build, and stay out of the way everywhere else.

The torchvision wheels on PyPI are CUDA builds whose compiled ops (`torchvision/_C`) do not load against
torch's CPU wheel; importing torchvision then fails in `_meta_registrations.py` because the `torchvision::nms`
and `torchvision::qnms` schemas were never defined. Defining those two schemas is enough for the pure-Python
transforms that transformers' and vLLM's image and video processors use (box ops stay unavailable).

The schemas are defined only once torchvision's own library has been tried and failed to load: where it
loads (a matching torchvision), its C++ defines them, and a schema defined before it would make its load
raise "Tried to register an operator ... multiple times" (and the first `import torchvision` fail). Loading
it here first is what torchvision's own `extension.py` does a moment later (`torch.ops.load_library` of the
same file: the second load is a no-op). On a CUDA or ROCm build of torch (`VLLM=gpu` installs) nothing is
done at all: torchvision matches torch there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None
_checked = False


def _gpu_torch() -> bool:
    """A CUDA or ROCm build of torch (not whether a device is present): torchvision's ops are meant to load."""
    return torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None


def _extension_path() -> Path | None:
    """torchvision's compiled ops library, found without importing torchvision; None when there is none."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for found in sorted(Path(folder).glob("_C.*")):
            if found.suffix in (".so", ".pyd", ".dylib"):
                return found
    return None


def torchvision_ops_load() -> bool:
    """Load torchvision's own op library as its `extension.py` would; False where it cannot (the CPU-torch /
    CUDA-torchvision mismatch) or where there is none."""
    path = _extension_path()
    if path is None:
        return False
    try:
        torch.ops.load_library(str(path))
    except (ImportError, OSError, RuntimeError):
        return False
    return _has_nms()


def _has_nms() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - defined by torchvision's library (or by this shim)
    except (AttributeError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> None:
    """Before torchvision is first imported: define the missing op schemas where its library does not load.
    Idempotent; does nothing on GPU builds of torch or once torchvision is imported."""
    global _library, _checked
    if _checked or "torchvision" in sys.modules or _gpu_torch():
        return
    _checked = True
    if _has_nms() or torchvision_ops_load() or importlib.util.find_spec("torchvision") is None:
        return
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        _library.define(schema)


def shim_defined_schemas() -> bool:
    """Whether this process's schemas are the shim's (torchvision's library did not load), for tests and logs."""
    return _library is not None
