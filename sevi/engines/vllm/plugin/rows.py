"""SEVI's aligned attention in one layer of a vLLM batch: the one place its kernel is chosen and called.

Backend-agnostic: a backend runs its stock kernel (or skips it when every row is aligned), then calls
:func:`align_layer` with the step's plan (built by its metadata builder: step.py, plan.py) and per-block views of
its paged cache (:class:`PagedKV`). :func:`layer_kernel` decides, once per row set and cache layout, which kernel
computes the rows, from the process's choice (sevi/kernels/choice.py: `SEVI_ALIGNED_KERNEL` or the machine's
default) and what applies to these rows and this cache:

- `c` (:class:`~sevi.engines.vllm.plugin.bound_layer.BoundLayer`): the C kernel (sevi/kernels/paged_kv.py) reading
  the blocks in place around the compiled operator, arguments bound once; where the C kernel reads this cache,
  the operator compiled for these rows, and one worker holds every head;
- `triton` (:class:`TritonLayer`): the Triton kernels of sevi/kernels/sevi_decode.py, for caches that are a
  strided view;
- otherwise :class:`TorchLayer`: q.K and p.V by the C kernel where it reads the cache (choice `c`), else gather +
  bmm (paged_read.py), and the operator as sevi/kernels/alignment_dispatch.py runs it (compiled where it applies, else
  sevi/method/alignment.py as it is: the operator the reference engine runs too).

The path is then one way: backend -> this module -> the chosen kernel -> the operator. Everything is vectorised
over the aligned rows (no Python loop over rows, heads or blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sevi.engines.vllm.plugin import paged_read
from sevi.engines.vllm.plugin.bound_layer import BoundLayer
from sevi.engines.vllm.plugin.paged_read import PagedKV, f32
from sevi.engines.vllm.plugin.plan import RowSet, StepPlan
from sevi.engines.vllm.plugin.state import WorkerState
from sevi.kernels import choice
from sevi.kernels.alignment_dispatch import align_prepared, align_sharded, compiled_for
from sevi.kernels.paged_kv import PagedKernel
from sevi.method.alignment import ShardGather

# (heads stage 1 moved [R, H], heads stage 2 moved [R, H], per row whether each stage moved any head of any
# shard [R, 2] where the layer's heads are sharded, else None)
Moved = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class LayerKernel(Protocol):
    """A kernel chosen for a row set: aligned attention of the rows' queries into `new` (float32 `[R, H, D]`)."""

    @property
    def name(self) -> str:
        """c, triton or torch (tests, logs)."""
        ...

    def __call__(self, picked: torch.Tensor, cache: PagedKV, new: torch.Tensor, shards: ShardGather | None) -> Moved:
        """picked: the rows' queries `[R, H, D]` in the query's dtype."""
        ...


def align_layer(
    plan: StepPlan,
    layer: int,
    query: torch.Tensor,
    output: torch.Tensor,
    cache: PagedKV,
    scale: float,
    num_kv_heads: int,
    state: WorkerState | None,
    rows: RowSet | None = None,
    shards: ShardGather | None = None,
) -> None:
    """Overwrite `output` rows of this layer's aligned rows with SEVI-aligned attention.

    query: [T, H, D]; output: [T, H * D] or [T, H, D] (written in place); state: where the layer's
    telemetry is recorded (:meth:`WorkerState.record`, counted once per step; the step's metadata carries it);
    rows: `plan.rows_at(layer)` where the caller has it already; shards: with tensor parallelism, the gather over
    the workers that hold the layer's other heads (`query` holds this worker's): the operator then exchanges its
    cross-head quantities (:func:`sevi.method.alignment.align_sharded`), one collective per aligned layer.
    """
    rows = rows if rows is not None else plan.rows_at(layer)
    if rows is None:
        return
    n_tokens, n_heads, head_dim = query.shape
    r = rows.token_index.shape[0]
    picked = query[:r] if rows.identity else query.index_select(0, rows.token_index)
    out = output.view(n_tokens, n_heads, head_dim)
    direct = rows.identity and out.dtype == torch.float32 and out.is_contiguous()
    new = out[:r] if direct else torch.empty(r, n_heads, head_dim, dtype=torch.float32, device=query.device)
    kernel = layer_kernel(rows, cache, scale, num_kv_heads, n_heads, head_dim, shards)
    stage1, stage2, moved = kernel(picked, cache, new, shards)
    if not direct:
        out.index_copy_(0, rows.token_index, new.to(out.dtype))
    if state is not None:
        state.record(rows.batch_row, stage1, stage2, moved)


def layer_kernel(
    rows: RowSet,
    cache: PagedKV,
    scale: float,
    num_kv_heads: int,
    n_heads: int,
    head_dim: int,
    shards: ShardGather | None,
) -> LayerKernel:
    """The kernel that computes these rows against this cache: chosen by the first layer of a step that reads a
    cache of this shape and layout, and kept on the row set for the others (and for the decode steps that move
    the plan on, until the row set is built again)."""
    k, v = cache.key, cache.value
    key = (
        k.device,
        k.shape,
        k.stride(),
        v.stride(),
        k.dtype,
        v.dtype,
        cache.key_transposed,
        cache.value_transposed,
        cache.key_order is None,
        cache.amx,
        scale,
        num_kv_heads,
        n_heads,
        head_dim,
        shards is None,
    )
    found: LayerKernel | None = rows.kernels.get(key)
    if found is not None:
        return found
    reader, kern = cache_reader(cache)
    if reader == "triton":
        found = TritonLayer(rows, scale, num_kv_heads)
    elif kern is not None and shards is None and (operator := compiled_for(rows.prepared)) is not None:
        found = BoundLayer.build(rows, cache, kern, operator, scale, num_kv_heads, n_heads, head_dim)
    else:  # the torch operator with the C kernel's reads (no compiled operator, or sharded heads) or gather + bmm
        found = TorchLayer(rows, kern, scale, num_kv_heads)
    rows.kernels[key] = found
    return found


def cache_reader(cache: PagedKV) -> tuple[str, PagedKernel | None]:
    """Who reads this cache's blocks for the aligned rows: "triton" (the Triton kernels, for caches that are a
    strided view), "c" with the C kernel (where it reads this cache in place), else "torch" (gather + bmm; also
    under the choice `torch` where the C kernel is built). /ready reports it (cpu_backend.describe_cache)."""
    chosen = choice.aligned_kernel()
    if chosen == "triton" and cache.key_order is None:
        return "triton", None
    kern = paged_read.c_kernel_for(cache) if chosen == "c" else None
    return ("c", kern) if kern is not None else ("torch", None)


@dataclass(frozen=True)
class TritonLayer:
    """The Triton kernels, reading the blocks in place; q in the cache's dtype (vLLM's query is in it: no float32
    round trip)."""

    rows: RowSet
    scale: float
    num_kv_heads: int
    name: str = "triton"

    def __call__(self, picked: torch.Tensor, cache: PagedKV, new: torch.Tensor, shards: ShardGather | None) -> Moved:
        from sevi.kernels.sevi_decode import aligned_decode

        rows = self.rows
        _, groups, moved = aligned_decode(
            picked,
            cache.key,
            cache.value,
            cache.key_transposed,
            cache.value_transposed,
            rows.block_index,
            rows.key_count,
            rows.prepared,
            self.scale,
            self.num_kv_heads,
            new,
            shards=shards,
        )
        assert groups is not None and groups.stage1 is not None and groups.stage2 is not None
        return groups.stage1, groups.stage2, moved


@dataclass(frozen=True)
class TorchLayer:
    """q.K, the operator, softmax and p.V as separate calls: the C kernel `kern` for the reads where it applies,
    else gather + bmm; the operator compiled where it applies (float32 contiguous rows in CPU memory), else eager."""

    rows: RowSet
    kern: PagedKernel | None
    scale: float
    num_kv_heads: int
    name: str = "torch"

    def __call__(self, picked: torch.Tensor, cache: PagedKV, new: torch.Tensor, shards: ShardGather | None) -> Moved:
        rows, g = self.rows, self.num_kv_heads
        r, n_heads, head_dim = picked.shape
        q = f32(picked).contiguous()
        scores = paged_read.scores_by(
            self.kern,
            q.view(r, g, n_heads // g, head_dim),
            cache,
            rows.block_index,
            rows.prepared.key_bias.shape[-1],
            self.scale,
            rows.key_count,
        )  # [R, H, K]
        moved = None
        if shards is None:
            aligned, groups = align_prepared(scores, rows.prepared)  # masked keys already at MASKED
        else:
            aligned, groups, moved = align_sharded(scores, rows.prepared, shards)
        paged_read.values_by(self.kern, aligned, cache, rows.block_index, g, new, rows.key_count, softmax=True)
        assert groups.stage1 is not None and groups.stage2 is not None
        return groups.stage1, groups.stage2, moved
