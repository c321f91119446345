"""FLASH_ATTN with SEVI, the GPU sibling of :mod:`sevi.engines.vllm.plugin.cpu_backend`. NOT YET RUN ON A GPU.

Same design: the aligned rows recomputed from the paged cache (by the kernel sevi/kernels/choice.py names:
the Triton kernels where triton imports) and written into the output. FlashAttention is skipped when every
row of the step is aligned, and in mixed steps (contrast pairs, streams of requests) it reads no keys for the
sequences whose whole query is aligned (:func:`unaligned_metadata`). vLLM 0.32's FlashAttention cache is
`[num_blocks, kv_heads, block_size, 2 * head_size]` with K in the first `head_size` channels and V in the
rest (`kv_cache.transpose(1, 2).split(head_size, -1)` in its forward), both row-major.

Requirements on GPU: the attention op must run eagerly each step, so CUDA graphs may only be
PIECEWISE (attention is a splitting op there); FULL graphs would replay the captured stock kernel and skip
the alignment. The metadata builder declares no full-graph support, so vLLM itself drops FULL_AND_PIECEWISE
(its GPU default) to PIECEWISE and refuses an explicit FULL, under sevi-serve's engine and `vllm serve`
alike. Model Runner V1 (`VLLM_USE_V2_MODEL_RUNNER=0`, set by the plugin) because V2's logits-processor API
differs. An fp8 KV cache is refused when the layers are built: the aligned rows read K and V as stored.
Only this module imports FlashAttention, and only on CUDA platforms.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from sevi.engines.vllm.plugin.aligned_impl import AlignedImpl
from sevi.engines.vllm.plugin.paged_read import PagedKV
from sevi.engines.vllm.plugin.plan import RowSet, StepMetadata
from sevi.engines.vllm.plugin.rows import align_layer
from sevi.engines.vllm.plugin.step import SeviStep, StepBuilder
from sevi.engines.vllm.plugin.tensor_parallel import head_shards
from sevi.kernels.choice import aligned_kernel


def _engine_cache() -> tuple[torch.dtype, int] | None:
    """(KV cache dtype, block size) of the engine being built (vLLM's current config), None outside one."""
    from vllm.config import get_current_vllm_config

    config = get_current_vllm_config()
    dtype = None if config.model_config is None else config.model_config.dtype
    if not isinstance(dtype, torch.dtype):  # outside an engine, or not yet resolved from "auto"
        return None
    return dtype, config.cache_config.block_size


@functools.cache
def _warm(heads: int, kv_heads: int, head_size: int, dtype: torch.dtype, block_size: int) -> None:
    from sevi.kernels.sevi_decode import warm_up

    warm_up(heads, kv_heads, head_size, dtype, block_size, torch.device("cuda", torch.cuda.current_device()))


def warm_triton_kernels(heads: int, kv_heads: int, head_size: int) -> bool:
    """Compile the Triton kernels for this layer's shape and the engine's cache while the engine loads (once per
    shape): a first compile inside a decode step took about a second each (six took 4.9 s). Whether it ran."""
    if not torch.cuda.is_available() or aligned_kernel() != "triton":
        return False
    found = _engine_cache()
    if found is None:
        return False
    _warm(heads, kv_heads, head_size, *found)
    return True


def paged_flash_kv(kv_cache: torch.Tensor) -> PagedKV:
    """Per-block views of the FlashAttention cache, no copy: K and V `[num_blocks, kv_heads, block_size,
    head_size]`, both row-major (the first and the last `head_size` channels of each slot)."""
    head_size = kv_cache.shape[-1] // 2
    return PagedKV(kv_cache[..., :head_size], kv_cache[..., head_size:], False, False)


class SeviFlashAttentionImpl(AlignedImpl, FlashAttentionImpl):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # FlashAttentionImpl(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype)
        kv_cache_dtype = str(kwargs["kv_cache_dtype"] if "kv_cache_dtype" in kwargs else args[6])
        if kv_cache_dtype.startswith("fp8"):
            raise ValueError(
                f"SEVI recomputes aligned rows from the KV cache and does not read an fp8 cache "
                f"(kv_cache_dtype={kv_cache_dtype!r}): use kv_cache_dtype='auto'"
            )
        super().__init__(*args, **kwargs)
        self._shards = head_shards()  # None with one GPU: no collective
        warm_triton_kernels(self.num_heads, self.num_kv_heads, self.head_size)

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,  # type: ignore[no-untyped-def]
        output_scale=None,
        output_block_scale=None,
    ) -> torch.Tensor:
        step = getattr(attn_metadata, "sevi", None)  # None: no metadata (profiling), or no SEVI row in the batch
        plan, rows = self._plan_rows(layer, step)
        # FlashAttention for the rows that are not aligned here: skipped when every row is (a decode step with
        # SEVI on for the whole batch: the cache write is vLLM's separate do_kv_cache_update), told to read no
        # keys for the wholly aligned sequences in mixed steps, on every row where the layer is not plain.
        if rows is None or not self._plain:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        elif not rows.identity:
            super().forward(
                layer,
                query,
                key,
                value,
                kv_cache,
                self._unaligned(attn_metadata, rows),
                output,
                output_scale,
                output_block_scale,
            )
        else:  # FlashAttention skipped (every scheduled row aligned): vLLM's padding rows get zeros, not stale values
            assert plan is not None
            output[plan.num_tokens :].zero_()
        if rows is None:
            return output
        assert plan is not None and step is not None and self._layer is not None
        if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * self.head_size:
            raise RuntimeError(f"SEVI: unexpected FlashAttention cache shape {tuple(kv_cache.shape)}")
        align_layer(
            plan,
            self._layer,
            query,
            output,
            paged_flash_kv(kv_cache),
            self.scale,
            self.num_kv_heads,
            step.table,
            rows,
            self._shards,
        )
        return output

    def _unaligned(self, md: Any, rows: RowSet) -> Any:
        """FlashAttention's metadata for this step and row set, built by the first layer that asks."""
        if "flash" not in rows.derived:
            subset = (
                getattr(self, "dcp_world_size", 1) == 1
                and md.causal is True
                and getattr(md, "mm_prefix_query_range_tensor", None) is None
            )
            rows.derived["flash"] = unaligned_metadata(md, rows.batch_row) if subset else md
        return rows.derived["flash"]


def unaligned_metadata(md: Any, batch_row: torch.Tensor) -> Any:
    """`md` with no keys for the sequences whose every scheduled row is aligned (`batch_row`: the batch index of
    each aligned row, on the device): FlashAttention's varlen kernels read `seqused_k` keys per sequence and
    write zeros for a row with none, so those rows cost it almost nothing and are then overwritten. The query
    layout stays as it is (no gather or scatter of rows). Device ops only, no read-back (`bincount` would wait
    for the device to size its output; `index_add_` does not). The ahead-of-time split schedule (FA3) was
    planned for the full lengths and is dropped: FlashAttention then plans its own."""
    qsl = md.query_start_loc
    q_len = qsl[1:] - qsl[:-1]
    if q_len.shape != md.seq_lens.shape:  # not a layout this knows: FlashAttention on every row
        return md
    aligned = torch.zeros_like(q_len).index_add_(0, batch_row, torch.ones_like(batch_row, dtype=q_len.dtype))
    seq_lens = md.seq_lens.masked_fill(aligned == q_len, 0)
    return dataclasses.replace(md, seq_lens=seq_lens, scheduler_metadata=None)


@dataclasses.dataclass
class SeviFlashAttentionMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata with SEVI's part of the step (None: no SEVI row in the batch)."""

    sevi: SeviStep | None = None


class SeviFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    """vLLM's builder, then SEVI's step plan from the same step (once per step, for every layer of the group)."""

    # vLLM reuses one group's metadata for another group of the same spec with only the block table swapped
    # (hybrid models): the step plan holds block ids of its own group, so every group builds its own.
    supports_update_block_table = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> AttentionCGSupport:
        # A full graph would replay the stock kernel captured at start-up and skip SEVI's rows: none.
        return AttentionCGSupport.NEVER

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sevi = StepBuilder()

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return with_step(md, self._sevi, common_attn_metadata, self.kv_cache_spec.block_size, self.device)


def with_step(md: Any, builder: StepBuilder, common: Any, block_size: int, device: torch.device) -> Any:
    """FlashAttention's metadata `md` as :class:`SeviFlashAttentionMetadata`, with this step's SEVI part (built
    from vLLM's host copies of the row counts: :func:`host_step_metadata`)."""
    step = builder.build(host_step_metadata(md, common), block_size, device)
    fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(FlashAttentionMetadata)}
    return SeviFlashAttentionMetadata(**fields, sevi=step)


def host_step_metadata(md: Any, common: Any) -> StepMetadata:
    """The step plan's view of this step: vLLM's host copies of query_start_loc and seq_lens (exact without
    speculative decoding, which the engine does not run), the device's block table. Built once per step, so
    the plan reads no device tensor back in the steady state."""
    seq_lens = common.seq_lens_cpu_upper_bound
    if seq_lens is None:  # not filled in by this vLLM: one copy back per step
        seq_lens = common.seq_lens.cpu()
    return StepMetadata(common.query_start_loc_cpu, seq_lens, md.block_table, md.num_actual_tokens)


class SeviFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "FLASH_ATTN"

    @staticmethod
    def get_builder_cls() -> type[SeviFlashAttentionMetadataBuilder]:
        return SeviFlashAttentionMetadataBuilder

    @staticmethod
    def get_impl_cls() -> type[SeviFlashAttentionImpl]:
        return SeviFlashAttentionImpl
