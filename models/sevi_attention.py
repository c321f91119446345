"""SEVI inside transformers' attention: a registered attention function named "sevi".

Every layer runs the stock SDPA kernel first. Then, only for rows that need it (sequences whose omega > 0,
layers at or past their start layer, query positions at or past their align-from position), the
pre-softmax scores are recomputed, aligned with :func:`models.alignment.align_scores`, and those rows'
outputs are overwritten. Everything else keeps SDPA's result bit for bit.

Per-batch knobs reach the attention through a context variable holding an :class:`AlignmentBatch`
(set by the generator around each forward), so the model code stays untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from models.alignment import HeadGroups, align_scores, span_masks

ATTN_NAME = "sevi"


@dataclass
class AlignmentTelemetry:
    """Per-row counters, accumulated over every aligned (row, layer). Tensors of shape `[B]`."""

    aligned: torch.Tensor
    stage1: torch.Tensor
    stage2: torch.Tensor
    heads_reweighted: torch.Tensor

    @classmethod
    def zeros(cls, batch: int) -> AlignmentTelemetry:
        z = torch.zeros(batch, dtype=torch.long)
        return cls(z.clone(), z.clone(), z.clone(), z.clone())

    def select(self, keep: torch.Tensor) -> AlignmentTelemetry:
        return AlignmentTelemetry(self.aligned[keep], self.stage1[keep], self.stage2[keep],
                                  self.heads_reweighted[keep])


@dataclass
class AlignmentBatch:
    """Per-sequence SEVI inputs, indexed by batch row; key indices are columns of the (padded) KV cache.

    omega, kappa: float `[B]`; start_layer, last_image, align_from: long `[B]` (last_image = -1 when the
    sequence has no image); image_keys: bool `[B, K]`, grows as tokens are appended (new keys are text);
    other_is_image_only: bool `[B]` (Qwen family).
    """

    omega: torch.Tensor
    kappa: torch.Tensor
    start_layer: torch.Tensor
    last_image: torch.Tensor
    align_from: torch.Tensor
    image_keys: torch.Tensor
    other_is_image_only: torch.Tensor
    telemetry: AlignmentTelemetry = field(init=False)

    def __post_init__(self) -> None:
        self.telemetry = AlignmentTelemetry.zeros(self.omega.shape[0])
        # Rows without an image, or with omega == 0, are never aligned.
        self.enabled = (self.omega > 0) & (self.last_image >= 0)

    def rows_for_layer(self, layer: int) -> torch.Tensor:
        return self.enabled & (self.start_layer <= layer)

    def extend_keys(self, n: int) -> None:
        """Append n text (non-image) key columns after a decode step."""
        pad = torch.zeros(self.image_keys.shape[0], n, dtype=torch.bool, device=self.image_keys.device)
        self.image_keys = torch.cat([self.image_keys, pad], dim=1)

    def select(self, keep: torch.Tensor) -> AlignmentBatch:
        """Keep only the batch rows in `keep` (a long index tensor), telemetry included."""
        out = AlignmentBatch(self.omega[keep], self.kappa[keep], self.start_layer[keep], self.last_image[keep],
                             self.align_from[keep], self.image_keys[keep], self.other_is_image_only[keep])
        out.telemetry = self.telemetry.select(keep)
        return out


_current: contextvars.ContextVar[AlignmentBatch | None] = contextvars.ContextVar("sevi_batch", default=None)


@contextlib.contextmanager
def alignment_context(batch: AlignmentBatch | None) -> Iterator[None]:
    token = _current.set(batch)
    try:
        yield
    finally:
        _current.reset(token)


def _valid_keys(mask: torch.Tensor | None, n_seq: int, q0: int, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
    """Bool `[S, R, K]`: which keys each selected query row may attend to (no mask means plain causal)."""
    if mask is None:
        keys = torch.arange(k_len, device=q_pos.device)
        return (keys[None, :] <= q_pos[:, None])[None].expand(n_seq, -1, -1)
    m = mask[:, 0, q0:, :k_len]  # the mask is shared across heads
    return m if m.dtype == torch.bool else m == 0  # additive masks hold 0 where attention is allowed


def sevi_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                    scaling=scaling, **kwargs)  # type: ignore[arg-type]
    batch = _current.get()
    layer = getattr(module, "layer_idx", None)
    if batch is None or layer is None:
        return out, None
    rows = batch.rows_for_layer(layer)
    if not bool(rows.any()):
        return out, None

    bsz, n_heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    # Key index of each query row; only rows from the earliest align_from on can need alignment.
    first = int(batch.align_from[rows].min().item()) - (k_len - q_len)
    q0 = max(first, 0)
    if q0 >= q_len:
        return out, None
    q_pos = torch.arange(k_len - q_len + q0, k_len, device=query.device)  # [R]
    seq = rows.nonzero().squeeze(1)  # sequences with alignment on in this layer
    needed = q_pos[None, :] >= batch.align_from[seq][:, None]  # [S, R]

    scale = scaling if scaling is not None else head_dim**-0.5
    q = query[seq, :, q0:].float()  # [S, H, R, D]
    n_rep = n_heads // key.shape[1]
    k = repeat_kv(key[seq], n_rep).float()
    v = repeat_kv(value[seq], n_rep).float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [S, H, R, K]
    n_seq, _, n_rows, _ = scores.shape

    mask = attention_mask
    if mask is not None:
        mask = mask.expand(bsz, -1, -1, -1)[seq]
    valid = _valid_keys(mask, n_seq, q0, q_pos, k_len)
    semantic, other = span_masks(
        torch.arange(k_len, device=query.device),
        q_pos.repeat(n_seq),
        batch.last_image[seq].repeat_interleave(n_rows),
        batch.image_keys[seq, :k_len].repeat_interleave(n_rows, dim=0),
        batch.other_is_image_only[seq].repeat_interleave(n_rows),
    )
    flat = scores.permute(0, 2, 1, 3).reshape(n_seq * n_rows, n_heads, k_len)  # rows x heads x keys
    flat_valid = valid.reshape(n_seq * n_rows, k_len)
    semantic &= flat_valid
    other &= flat_valid
    aligned, groups = align_scores(
        flat, flat_valid, semantic, other,
        batch.omega[seq].repeat_interleave(n_rows), batch.kappa[seq].repeat_interleave(n_rows),
    )
    probs = torch.softmax(aligned.masked_fill(~flat_valid[:, None, :], float("-inf")), dim=-1)
    probs = probs.reshape(n_seq, n_rows, n_heads, k_len).permute(0, 2, 1, 3)
    new = torch.matmul(probs, v).transpose(1, 2).to(out.dtype)  # [S, R, H, D]

    region = out[seq, q0:]
    out[seq, q0:] = torch.where(needed[..., None, None], new, region)
    _record(batch, seq, needed.reshape(-1), groups)
    return out, None


def _record(batch: AlignmentBatch, seq: torch.Tensor, needed: torch.Tensor, groups: HeadGroups) -> None:
    """Count aligned rows, rows where each stage fired, and heads whose scores were moved."""
    has_global = groups.global_.any(-1)
    stage1 = groups.other.any(-1) & has_global & needed
    stage2 = has_global & groups.core.any(-1) & needed
    heads = (groups.other.sum(-1) * stage1 + groups.global_.sum(-1) * stage2)
    n_rows = needed.shape[0] // seq.shape[0]
    t = batch.telemetry
    t.aligned.index_add_(0, seq, needed.view(-1, n_rows).sum(-1))
    t.stage1.index_add_(0, seq, stage1.view(-1, n_rows).sum(-1))
    t.stage2.index_add_(0, seq, stage2.view(-1, n_rows).sum(-1))
    t.heads_reweighted.index_add_(0, seq, heads.view(-1, n_rows).sum(-1))


_registered = False


def register() -> str:
    """Register the "sevi" attention (and its mask builder, SDPA's) with transformers. Idempotent."""
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_NAME, sevi_attention_forward)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        _registered = True
    return ATTN_NAME


def use_sevi_attention(model: Any) -> None:
    """Route the language model's attention through "sevi"; the vision tower keeps its own."""
    register()
    text_config = model.config.get_text_config(decoder=True)
    text_config._attn_implementation = ATTN_NAME
