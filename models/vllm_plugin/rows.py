"""SEVI on the rows of a vLLM batch: which flattened query rows to align, and the aligned attention.

Backend-agnostic: a backend runs its stock kernel, then calls :func:`align_layer` with a function that
reads K/V for whole sequences out of its own paged cache layout. Everything is vectorised over the
aligned rows (no Python loop over rows or heads).

Which rows (spec section 2): for each sequence with alignment on, the query positions at or past its
last prompt row. At prefill that is the last prompt row; in decode, the one new row; after a
preemption vLLM recomputes prompt and outputs in one prefill, and every row from the last prompt row on
is aligned again over its own causal keys, which the spec says equals the cached run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.alignment import align_scores, span_masks
from models.vllm_plugin.state import WorkerState

# (blocks [S, nb] long) -> (K, V), each [S, kv_heads, nb * block_size, head_size]
KVReader = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepPlan:
    """Layer-independent parts of one step's alignment work, built once at the first layer."""

    token_index: torch.Tensor  # long [R]: row in the flattened query / output
    batch_row: torch.Tensor  # long [R]: batch index of each aligned row
    seq_slot: torch.Tensor  # long [R]: index into `blocks` (one slot per distinct sequence)
    blocks: torch.Tensor  # long [S, nb]: block ids covering every key of each sequence
    num_keys: int  # K: keys gathered per sequence (max seq_len over them)
    valid: torch.Tensor  # bool [R, K]: causal keys of each row
    semantic: torch.Tensor  # bool [R, K]
    other: torch.Tensor  # bool [R, K]
    omega: torch.Tensor  # float32 [R]
    kappa: torch.Tensor  # float32 [R]
    start_layer: torch.Tensor  # long [R]
    min_start: int
    uniform_start: bool
    one_row_per_seq: bool  # decode-only steps: row r reads sequence slot r, no gather copy needed


def build_plan(state: WorkerState, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
               block_size: int, device: torch.device) -> StepPlan | None:
    """The rows of this step that need alignment, or None when there are none (stock path only)."""
    t = state.tensors()
    n = state.batch_size
    if not t.any_enabled or n == 0 or seq_lens.shape[0] < n:
        return None
    seq = seq_lens[:n].to(torch.long).cpu()
    qsl = query_start_loc[: n + 1].to(torch.long).cpu()
    q_len = qsl[1:] - qsl[:-1]
    # Rows at positions >= align_from are the last `count` rows of each sequence's chunk.
    count = torch.where(t.enabled, (seq - t.align_from).clamp(min=0), torch.zeros_like(seq))
    count = torch.minimum(count, q_len)
    total = int(count.sum())
    if total == 0:
        return None
    batch_row = torch.repeat_interleave(torch.arange(n), count)  # [R]
    first = torch.cumsum(count, 0) - count  # first aligned row of each sequence, within R
    k = torch.arange(total) - first[batch_row]
    token_index = qsl[batch_row + 1] - count[batch_row] + k
    position = seq[batch_row] - count[batch_row] + k  # 0-based position of each aligned row

    seqs = torch.nonzero(count > 0).squeeze(1)  # [S]
    slot_of = torch.full((n,), -1, dtype=torch.long)
    slot_of[seqs] = torch.arange(seqs.shape[0])
    num_keys = int(seq[seqs].max())
    nb = -(-num_keys // block_size)
    blocks = block_table[seqs.to(block_table.device), :nb].to(torch.long)

    keys = torch.arange(num_keys)
    valid = keys[None, :] <= position[:, None]
    width = t.image_keys.shape[1]
    image_keys = torch.zeros(total, num_keys, dtype=torch.bool)
    image_keys[:, : min(width, num_keys)] = t.image_keys[batch_row, : min(width, num_keys)]
    other_only = torch.full((total,), state.other_is_image_only, dtype=torch.bool)
    semantic, other = span_masks(keys, position, t.last_image[batch_row], image_keys, other_only)
    start = t.start_layer[batch_row]
    return StepPlan(
        token_index=token_index.to(device), batch_row=batch_row.to(device), seq_slot=slot_of[batch_row].to(device),
        blocks=blocks, num_keys=num_keys, valid=valid.to(device), semantic=(semantic & valid).to(device),
        other=(other & valid).to(device), omega=t.omega[batch_row].to(device), kappa=t.kappa[batch_row].to(device),
        start_layer=start.to(device), min_start=int(start.min()), uniform_start=bool((start == start[0]).all()),
        one_row_per_seq=total == int(seqs.shape[0]),
    )


def align_layer(plan: StepPlan, layer: int, query: torch.Tensor, output: torch.Tensor, read_kv: KVReader,
                scale: float, num_kv_heads: int, counts: torch.Tensor | None) -> None:
    """Overwrite `output` rows of this layer's aligned rows with SEVI-aligned attention.

    query: [T, H, D]; output: [T, H * D] or [T, H, D] (written in place); counts: long [B, 4] telemetry.
    """
    if layer < plan.min_start:
        return
    rows = None if plan.uniform_start else torch.nonzero(plan.start_layer <= layer).squeeze(1)
    if rows is not None and rows.numel() == 0:
        return

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x if rows is None else x[rows]

    n_tokens, n_heads, head_dim = query.shape
    rep = n_heads // num_kv_heads
    k_all, v_all = read_kv(plan.blocks)
    n_keys = plan.num_keys
    if rows is None and plan.one_row_per_seq:
        k, v = k_all[:, :, :n_keys].float(), v_all[:, :, :n_keys].float()  # [R, G, K, D]
    else:
        slot = pick(plan.seq_slot)
        k = k_all[:, :, :n_keys][slot].float()
        v = v_all[:, :, :n_keys][slot].float()
    tok = pick(plan.token_index)
    q = query[tok].float().view(-1, num_kv_heads, rep, head_dim)  # [R, G, rep, D]
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).view(-1, n_heads, n_keys)  # [R, H, K]
    valid = pick(plan.valid)
    aligned, groups = align_scores(scores, valid, pick(plan.semantic), pick(plan.other), pick(plan.omega),
                                   pick(plan.kappa))
    probs = torch.softmax(aligned.masked_fill_(~valid[:, None, :], float("-inf")), dim=-1)
    new = torch.matmul(probs.view(-1, num_kv_heads, rep, n_keys), v)  # [R, G, rep, D]
    out = output.view(n_tokens, n_heads, head_dim)
    out[tok] = new.view(-1, n_heads, head_dim).to(out.dtype)
    if counts is not None:
        has_global = groups.global_.any(-1)
        stage1 = groups.other.any(-1) & has_global
        stage2 = has_global & groups.core.any(-1)
        heads = groups.other.sum(-1) * stage1 + groups.global_.sum(-1) * stage2
        per_row = torch.stack([torch.ones_like(heads), stage1.long(), stage2.long(), heads], dim=1)
        counts.index_add_(0, pick(plan.batch_row), per_row)
