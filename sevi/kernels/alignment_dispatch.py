"""The alignment operator as the engines run it: compiled ahead of time where it can be, eager elsewhere.

sevi/method/alignment.py is the method, pure torch; sevi/kernels/alignment_compiled.py builds and loads that same code
compiled by torch (a package per function). This module picks, per call, which of the two runs: the
compiled one for float32, contiguous rows in CPU memory (its C++ assumes the dtypes and strides it was
traced with), the eager one for everything else (GPU tensors, bfloat16, strided views). Both give the
same result (tests/sevi/kernels/test_alignment_compiled.py).
"""

from __future__ import annotations

from typing import Any

import torch

from sevi.kernels import alignment_compiled
from sevi.method.alignment import HeadGroups, PreparedRows, ShardGather, operator_inputs
from sevi.method.alignment import align_prepared as align_prepared_eager
from sevi.method.alignment import align_sharded as align_sharded_eager

# Compiled packages once loaded, by name; False where one cannot be (or is turned off).
_COMPILED: dict[str, Any] = {}


def _compiled(name: str) -> Any:
    if name not in _COMPILED:
        _COMPILED[name] = alignment_compiled.load(name) or False
    return _COMPILED[name] or None


def compiled_operator() -> Any:
    """The compiled :func:`sevi.method.alignment.align_tensors`, built (or loaded from its cache) on the first call,
    or None where it is unavailable. Engines call it at load so that no request waits for it."""
    return _compiled("operator")


def compiled_sharded() -> tuple[Any, Any] | None:
    """The compiled :func:`sevi.method.alignment.shard_partials` and :func:`sevi.method.alignment.shard_finish` (tensor
    parallelism), or None."""
    first, second = _compiled("shard_partials"), _compiled("shard_finish")
    return (first, second) if first is not None and second is not None else None


def compiled_for(rows: PreparedRows, sharded: bool = False) -> Any:
    """The compiled operator where it runs these rows (float32 knobs in CPU memory, contiguous: its code
    assumes the strides it was traced with), else None. The scores must be float32 and contiguous too.
    sharded: the two halves of :func:`align_sharded` instead (a pair)."""
    if (
        rows.blend.dtype != torch.float32
        or rows.key_bias.device.type != "cpu"
        or not all(
            t.is_contiguous()
            for t in (rows.key_bias, rows.semantic_keys, rows.other_keys, rows.kappa, rows.blend, rows.on)
        )
    ):
        return None
    return compiled_sharded() if sharded else compiled_operator()


def _compiled_for_scores(scores: torch.Tensor, rows: PreparedRows, sharded: bool = False) -> Any:
    return compiled_for(rows, sharded) if scores.dtype == torch.float32 and scores.is_contiguous() else None


def align_prepared(scores: torch.Tensor, rows: PreparedRows) -> tuple[torch.Tensor, HeadGroups]:
    """:func:`sevi.method.alignment.align_prepared`, compiled where it applies."""
    compiled = _compiled_for_scores(scores, rows)
    if compiled is None:
        return align_prepared_eager(scores, rows)
    out, semantic, core, glob, stage1, stage2 = compiled.run(operator_inputs(scores, rows))
    return out, HeadGroups(semantic=semantic, core=core, global_=glob, stage1=stage1, stage2=stage2)


def align_sharded(
    scores: torch.Tensor,
    rows: PreparedRows,
    gather: ShardGather,
) -> tuple[torch.Tensor, HeadGroups, torch.Tensor]:
    """:func:`sevi.method.alignment.align_sharded` (one shard of a layer's heads under tensor parallelism), both halves
    compiled where they apply."""
    compiled = _compiled_for_scores(scores, rows, sharded=True)
    if compiled is None:
        return align_sharded_eager(scores, rows, gather)
    s, semantic, core, glob, packed = compiled[0].run([scores, *operator_inputs(scores, rows)[1:5]])
    out, stage1, stage2, moved = compiled[1].run([s, semantic, glob, gather(packed), rows.blend, rows.on])
    return out, HeadGroups(semantic=semantic, core=core, global_=glob, stage1=stage1, stage2=stage2), moved
