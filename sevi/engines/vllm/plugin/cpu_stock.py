"""The rows of a step that vLLM's stock CPU kernel still has to compute, and its metadata for only those.

Why: a request with contrastive decoding is a pair of rows, the main one aligned and the contrast one
not, and a stream of requests mixes aligned and unaligned requests, so most steps hold both kinds; the
stock kernel's work on the aligned rows would be overwritten by their recomputation. A sequence whose
every scheduled row is aligned in a layer (the decode row of a request with alignment on) is dropped
from the stock call here: its query rows, its seq_len, its block-table row; the kernel's scheduler
metadata (how it splits the work) is rebuilt for the sequences left, once per step and row set.
Prefill chunks keep their sequence in the stock call (only their last rows are aligned).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from vllm import _custom_ops as ops
from vllm import envs


@dataclass(frozen=True)
class StockRows:
    """The stock kernel's share of a step: its query rows and their sequences' metadata."""

    tokens: torch.Tensor  # long [T']: rows of the flattened query the stock kernel computes (empty: none)
    metadata: Any  # CPUAttentionMetadata of those rows' sequences only; None when `tokens` is empty
    # (first, end) when the rows are one contiguous range (a request's prefill chunk beside aligned decode
    # rows, the usual case in a stream of requests): the kernel then reads and writes them in place, where
    # gathering a 650-row prompt and scattering its outputs back would copy about 1.3 MB each way per layer
    # at 16 heads x 32.
    span: tuple[int, int] | None = None


# The stock kernel has no rows left (every row of the step is aligned): it is skipped.
NO_STOCK_ROWS = StockRows(torch.empty(0, dtype=torch.long), None)


def stock_rows(
    md: Any,
    batch_row: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    isa: str,
    kv_cache_dtype: str,
) -> StockRows | None:
    """The rows left to the stock kernel when the aligned rows (`batch_row`: the batch index of each, long
    `[R]`) are some sequences' whole query; None when every sequence keeps a row (the stock call as is) or
    the metadata is of a kind this does not rebuild (encoder, non-causal or dynamic-causal attention)."""
    if (
        not isinstance(md.causal, bool)
        or not md.causal
        or md.dynamic_causal is not None
        or md.encoder_cache is not None
        or md.use_sdpa_prefill
    ):
        return None
    qsl = md.query_start_loc.cpu()
    n = qsl.shape[0] - 1
    q_len = (qsl[1:] - qsl[:-1]).long()
    aligned = torch.bincount(batch_row.cpu(), minlength=n)[:n]
    keep = torch.nonzero((aligned < q_len) & (q_len > 0)).squeeze(1)
    if keep.shape[0] == n:
        return None
    if keep.shape[0] == 0:
        return NO_STOCK_ROWS
    q_keep = q_len[keep]
    start = torch.zeros(keep.shape[0] + 1, dtype=qsl.dtype)
    start[1:] = torch.cumsum(q_keep, 0)
    total = int(start[-1])
    # Each kept sequence's rows, in order: its first row in the full query plus 0, 1, ... q_len - 1.
    tokens = torch.repeat_interleave(qsl[keep].long() - start[:-1].long(), q_keep) + torch.arange(total)
    seq_lens = md.seq_lens[keep.to(md.seq_lens.device)]
    query_start_loc = start.to(md.query_start_loc.device)
    metadata = dataclasses.replace(
        md,
        num_actual_tokens=total,
        max_query_len=int(q_keep.max()),
        query_start_loc=query_start_loc,
        max_seq_len=int(seq_lens.max()),
        seq_lens=seq_lens,
        block_table=md.block_table[keep.to(md.block_table.device)],
        slot_mapping=md.slot_mapping[tokens.to(md.slot_mapping.device)],
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=int(keep.shape[0]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            seq_lens=seq_lens,
            dtype=dtype,
            query_start_loc=query_start_loc,
            causal=True,
            sliding_window_size=-1,
            isa=isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=kv_cache_dtype,
        ),
    )
    first, last = int(tokens[0]), int(tokens[-1])
    return StockRows(tokens, metadata, (first, last + 1) if last - first + 1 == total else None)
