"""The weights dtype when `--dtype auto` (the default): what vLLM's own server would pick on this machine.

Why: a float32 default gave a user of an AMX Xeon twice the memory and a fraction of the speed that stock vLLM
gives them for the same checkpoint (vLLM downcasts to bfloat16 on CPU). So, as vLLM does: bfloat16 on CPUs with
native bfloat16 (AVX512_BF16 or AMX), float32 on the others (bfloat16 without native support is emulated and
slow there); on a GPU the checkpoint's 16-bit dtype, bfloat16 for float32 checkpoints (float16 where the GPU has
no bfloat16). An explicit `--dtype` is always kept.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("sevi.engine")

DTYPES = ("float32", "bfloat16", "float16")


def cpu_has_native_bfloat16() -> bool:
    """AVX512_BF16 or AMX tiles (x86), as torch reports them."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def checkpoint_dtype(model_dir: Path) -> str | None:
    """The dtype the checkpoint was saved in (config.json's `torch_dtype` / `dtype`, or its text config's)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for cfg in (config, config.get("text_config") or {}):
        value = cfg.get("torch_dtype") or cfg.get("dtype")
        if isinstance(value, str) and value in DTYPES:
            return value
    return None


def resolve_dtype(requested: str, model_dir: Path, on_gpu: bool) -> str:
    """`requested` unless it is "auto"; then the machine's choice (module docstring), logged with why."""
    if requested != "auto":
        return requested
    if on_gpu:
        saved = checkpoint_dtype(model_dir)
        if saved in ("bfloat16", "float16"):
            chosen, why = saved, "the checkpoint's dtype"
        elif torch.cuda.is_bf16_supported():
            chosen, why = "bfloat16", f"GPU, {saved or 'unknown'} checkpoint"
        else:
            chosen, why = "float16", f"GPU without bfloat16, {saved or 'unknown'} checkpoint"
    elif cpu_has_native_bfloat16():
        chosen, why = "bfloat16", "the CPU has native bfloat16 (AVX512_BF16 or AMX)"
    else:
        chosen, why = "float32", "the CPU has no native bfloat16 (bfloat16 would be emulated)"
    log.info("dtype auto: %s (%s); --dtype overrides", chosen, why, extra={"fields": {"dtype": chosen}})
    return chosen
