"""An aligned layer on the CPU as three calls with their arguments bound once per step plan.

q.K by the C kernel reading the blocks in place, the compiled operator, softmax and p.V by the C kernel
(:class:`BoundLayer`), built where sevi/engines/vllm/plugin/rows.py chooses this kernel (by the first layer of a step
that reads a cache of a given shape and layout) and kept on the row set for the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sevi.engines.vllm.plugin.paged_read import PagedKV, f32
from sevi.engines.vllm.plugin.plan import RowSet
from sevi.kernels.paged_kv import PagedKernel
from sevi.method.alignment import ShardGather, operator_inputs


@dataclass
class BoundLayer:
    """An aligned layer as three calls (q.K by the C kernel, the compiled operator, softmax and p.V by the C
    kernel) with everything bound that the step's layers share: kernel shapes, strides, block indices and
    key counts, the operator's masks, and the scores buffer (each layer's q.K writes it, and its operator
    call reads it before the next layer runs). A layer passes only its query, its cache and its output.

    Why: at one row the three calls compute for about 3 us and their argument handling cost 12 more (24.7
    -> 12.3 us per layer cache-hot); every decoder layer past the start layer pays it every step. The
    bound tensors are the plan's: moved on in place (key counts, masks), the calls read the next step's.
    """

    kernel: PagedKernel
    operator: Any  # sevi.kernels.alignment_compiled.CompiledOperator
    scores_args: tuple[Any, ...]
    values_args: tuple[Any, ...]
    operator_args: list[torch.Tensor]  # the scores buffer [R, H, K] float32 first
    keep: tuple[torch.Tensor, ...]  # tensors whose pointers are in the args
    name: str = "c"

    @staticmethod
    def build(
        rows: RowSet,
        cache: PagedKV,
        kern: PagedKernel,
        operator: Any,
        scale: float,
        num_kv_heads: int,
        n_heads: int,
        head_dim: int,
    ) -> BoundLayer:
        """The calls for `rows` against caches of `cache`'s shape and layout, by the C kernel `kern` (which reads
        it in place) and the compiled operator `operator` (which runs these rows), as rows.py chose them."""
        # K: the width of the masks the operator takes, which the scores buffer must match
        r, rep, num_keys = rows.token_index.shape[0], n_heads // num_kv_heads, rows.prepared.key_bias.shape[-1]
        blocks, counts = rows.block_index.contiguous(), rows.key_count.contiguous()
        scores = torch.empty(r, n_heads, num_keys, dtype=torch.float32)
        return BoundLayer(
            kern,
            operator,
            kern.scores_args(
                cache.key,
                cache.key_transposed,
                blocks,
                counts,
                num_keys,
                scale,
                r,
                num_kv_heads,
                rep,
                head_dim,
                cache.amx,
            ),
            kern.values_args(
                cache.value,
                cache.value_transposed,
                blocks,
                counts,
                num_keys,
                r,
                num_kv_heads,
                rep,
                cache.amx_head_dim,
            ),
            operator_inputs(scores, rows.prepared),
            (blocks, counts),
        )

    def __call__(
        self, picked: torch.Tensor, cache: PagedKV, new: torch.Tensor, shards: ShardGather | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Aligned attention of the rows' queries (`[R, H, D]`) into `new` (float32, likewise, contiguous); returns
        the heads each stage moved (`[R, H]`, for telemetry). One worker holds every head (`shards` None)."""
        assert shards is None
        q = f32(picked).contiguous()
        scores = self.operator_args[0]
        self.kernel.run_scores(q.data_ptr(), cache.key.data_ptr(), self.scores_args, scores.data_ptr())
        aligned, _, _, _, stage1, stage2 = self.operator.run(self.operator_args)
        assert aligned.is_contiguous() and aligned.dtype == torch.float32  # the kernel's softmax runs in place
        self.kernel.run_values(aligned.data_ptr(), cache.value.data_ptr(), self.values_args, new.data_ptr(), True)
        return stage1, stage2, None
