"""SEVI's aligned attention in one layer of a vLLM batch, whichever kernel computes it.

Backend-agnostic: a backend runs its stock kernel (or skips it when every row is aligned), then calls
:func:`align_layer` with the step's plan (plan.py) and per-block views of its paged cache (:class:`PagedKV`).
The kernel is the one models/kernels/choice.py names: `c` (bound_layer.py: the C kernel and the compiled
operator), `triton` (models/kernels/sevi_decode.py), or `torch` (paged_read.py and the torch operator).
Everything is vectorised over the aligned rows (no Python loop over rows, heads or blocks).
"""

from __future__ import annotations

import torch

from models.alignment import ShardGather
from models.alignment_dispatch import align_prepared, align_sharded
from models.kernels.choice import aligned_kernel
from models.vllm_plugin.bound_layer import bound_layer
from models.vllm_plugin.paged_read import PagedKV, block_scores, block_values, f32
from models.vllm_plugin.plan import RowSet, StepPlan
from models.vllm_plugin.state import WorkerState


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
    telemetry is recorded (:meth:`WorkerState.record`, counted once per step); rows: `plan.rows_at(layer)`
    where the caller has it already; shards: with tensor parallelism, the gather over the workers that
    hold the layer's other heads (`query` holds this worker's): the operator then exchanges its
    cross-head quantities (:func:`models.alignment.align_sharded`), one collective per aligned layer.
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
    choice = aligned_kernel()
    triton = choice == "triton" and cache.key_order is None
    # The Triton kernels read q in the cache's dtype (vLLM's query is in it): no float32 round trip there.
    q = picked if triton else f32(picked).contiguous()
    bound = None
    if shards is None and choice == "c":
        bound = bound_layer(rows, cache, scale, num_kv_heads, n_heads, head_dim)
    moved = None
    if bound is not None:  # the C kernel and the compiled operator, arguments bound once per plan
        stage1, stage2 = bound.run(q, cache, new)
    elif triton:  # the Triton kernels, reading the blocks in place
        from models.kernels.sevi_decode import aligned_decode

        _, groups, moved = aligned_decode(
            q,
            cache.key,
            cache.value,
            cache.key_transposed,
            cache.value_transposed,
            rows.block_index,
            rows.key_count,
            rows.prepared,
            scale,
            num_kv_heads,
            new,
            shards=shards,
        )
        assert groups is not None and groups.stage1 is not None and groups.stage2 is not None
        stage1, stage2 = groups.stage1, groups.stage2
    else:
        c_kernel = choice == "c"  # "torch": gather + bmm even where the C kernel is built
        scores = block_scores(
            q.view(r, num_kv_heads, n_heads // num_kv_heads, head_dim),
            cache,
            rows.block_index,
            plan.num_keys,
            scale,
            use_kernel=c_kernel,
            key_counts=rows.key_count,
        )  # [R, H, K]
        if shards is None:
            aligned, groups = align_prepared(scores, rows.prepared)  # masked keys already at MASKED
        else:
            aligned, groups, moved = align_sharded(scores, rows.prepared, shards)
        block_values(
            aligned,
            cache,
            rows.block_index,
            num_kv_heads,
            new,
            use_kernel=c_kernel,
            key_counts=rows.key_count,
            softmax=True,
        )
        assert groups.stage1 is not None and groups.stage2 is not None
        stage1, stage2 = groups.stage1, groups.stage2
    if not direct:
        out.index_copy_(0, rows.token_index, new.to(out.dtype))
    if state is not None:
        state.record(rows.batch_row, stage1, stage2, moved)
