"""Let PyPI's torchvision wheel import beside the CPU torch build.

The torchvision wheels on PyPI are CUDA builds whose compiled ops do not load against torch's CPU
wheel; importing torchvision then fails in `_meta_registrations.py` because the `torchvision::nms` and
`torchvision::qnms` schemas were never defined. Defining those two schemas first is enough for the
pure-Python transforms that transformers' and vLLM's image and video processors use. Box ops stay
unavailable (nothing here needs them).
"""

from __future__ import annotations

import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None


def ensure_torchvision_importable() -> None:
    """Define the missing op schemas once, before torchvision is first imported. Idempotent."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - present when a matching torchvision build is installed
        return
    except (AttributeError, RuntimeError):
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        _library.define(schema)
