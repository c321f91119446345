"""SEVI inside transformers' attention: a registered attention function named "sevi".

Every layer runs the stock SDPA kernel first. Then, only for rows that need it (sequences whose omega > 0,
layers at or past their start layer, query positions at or past their align-from position), the
pre-softmax scores are recomputed, aligned with :func:`sevi.method.alignment.align_scores`, and those rows'
outputs are overwritten. Everything else keeps SDPA's result bit for bit.

Per-batch knobs reach the attention through a context variable holding an :class:`AlignmentBatch`
(set by the generator around each forward), so the model code stays untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sevi.kernels.alignment_dispatch import align_prepared
from sevi.method.alignment import HeadGroups, PreparedRows, prepare_rows, span_masks, with_new_key
from sevi.method.telemetry import COUNTERS

ATTN_NAME = "sevi"


@dataclass
class AlignmentTelemetry:
    """Per-sequence counters `[B, 4]` (:data:`sevi.method.telemetry.COUNTERS`), summed over every aligned (row,
    layer): rows aligned, rows where stage 1 fired, rows where stage 2 fired, and heads whose scores were moved."""

    counts: torch.Tensor

    @classmethod
    def zeros(cls, batch: int) -> AlignmentTelemetry:
        return cls(torch.zeros(batch, len(COUNTERS), dtype=torch.long))

    def select(self, keep: torch.Tensor) -> AlignmentTelemetry:
        return AlignmentTelemetry(self.counts[keep])

    def row(self, i: int) -> list[int]:
        """Sequence `i`'s counters, in :data:`sevi.method.telemetry.COUNTERS` order."""
        return [int(c) for c in self.counts[i].tolist()]


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

    def __post_init__(self) -> None:
        self._telemetry = AlignmentTelemetry.zeros(self.omega.shape[0])
        # Per-layer stage masks waiting to be counted: one reduction per forward instead of one per layer.
        self._pending: list[tuple[torch.Tensor, torch.Tensor, HeadGroups]] = []
        # Rows without an image, or with omega == 0, are never aligned.
        self.enabled = (self.omega > 0) & (self.last_image >= 0)
        self._plan_key: tuple[object, ...] | None = None
        self._plan: _Plan | None = None

    @property
    def telemetry(self) -> AlignmentTelemetry:
        self._count_pending()
        return self._telemetry

    def record(self, seq: torch.Tensor, needed: torch.Tensor, stages: HeadGroups) -> None:
        """Note one layer's aligned rows `[S, R]` and the heads each stage moved, to be counted later."""
        self._pending.append((seq, needed, stages))

    def _count_pending(self) -> None:
        """Add the pending layers' counts (rows aligned, stage 1 / stage 2 rows, heads moved) per sequence."""
        by_seq: dict[int, list[tuple[torch.Tensor, torch.Tensor, HeadGroups]]] = {}
        for item in self._pending:  # layers of one forward share their `seq` tensor unless start layers differ
            by_seq.setdefault(id(item[0]), []).append(item)
        self._pending = []
        for items in by_seq.values():
            seq, needed = items[0][0], items[0][1].reshape(-1)
            stage1 = torch.stack([s.stage1 for _, _, s in items if s.stage1 is not None])  # [L, S*R, H]
            stage2 = torch.stack([s.stage2 for _, _, s in items if s.stage2 is not None])
            rows = (
                torch.stack(
                    [
                        torch.full_like(needed, len(items), dtype=torch.long),
                        stage1.any(-1).sum(0),
                        stage2.any(-1).sum(0),
                        (stage1.sum(-1) + stage2.sum(-1)).sum(0),
                    ],
                    -1,
                )
                * needed[:, None]
            )
            self._telemetry.counts.index_add_(0, seq, rows.view(seq.shape[0], -1, 4).sum(1))

    def plan_for(self, mask: torch.Tensor | None, bsz: int, q_len: int, k_len: int) -> _Plan | None:
        """The rows and masks to align in this forward; built by its first layer, reused by the others."""
        key = (id(mask), bsz, q_len, k_len, self.image_keys.shape[1])
        if key != self._plan_key:
            self._count_pending()
            prev = self._plan
            # One decode step after another over the same rows: only the new token's key column is new.
            if (
                prev is not None
                and q_len == 1
                and prev.n_rows == 1
                and k_len == prev.k_len + 1
                and self._plan_key is not None
                and self._plan_key[1] == bsz
            ):
                self._plan = prev.next_step()
            else:
                self._plan = _build_plan(self, mask, bsz, q_len, k_len)
            self._plan_key = key
        return self._plan

    def extend_keys(self, n: int) -> None:
        """Append n text (non-image) key columns after a decode step."""
        pad = torch.zeros(self.image_keys.shape[0], n, dtype=torch.bool, device=self.image_keys.device)
        self.image_keys = torch.cat([self.image_keys, pad], dim=1)

    def select(self, keep: torch.Tensor) -> AlignmentBatch:
        """Keep only the batch rows in `keep` (a long index tensor), telemetry included."""
        out = AlignmentBatch(
            self.omega[keep],
            self.kappa[keep],
            self.start_layer[keep],
            self.last_image[keep],
            self.align_from[keep],
            self.image_keys[keep],
            self.other_is_image_only[keep],
        )
        out._telemetry = self.telemetry.select(keep)
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


@dataclass
class _Plan:
    """What one forward pass aligns, shared by all its layers: the enabled sequences' rows and key masks.

    Rows are flattened sequence-major: flat row `s * n_rows + r` is query row `q0 + r` of sequence `seq[s]`.
    """

    seq: torch.Tensor  # [S] batch index of each enabled sequence
    start_layer: list[int]  # per enabled sequence
    q0: int
    n_rows: int
    needed: torch.Tensor  # [S, R] rows at or past align_from
    all_needed: bool
    valid: torch.Tensor  # [S*R, K]
    semantic: torch.Tensor  # [S*R, K]
    other: torch.Tensor  # [S*R, K]
    omega: torch.Tensor  # [S*R]
    kappa: torch.Tensor  # [S*R]
    k_len: int
    prepared: PreparedRows | None = None

    def __post_init__(self) -> None:
        if self.prepared is None:
            self.prepared = prepare_rows(self.valid, self.semantic, self.other, self.omega, self.kappa)

    @property
    def rows(self) -> PreparedRows:
        assert self.prepared is not None
        return self.prepared

    def next_step(self) -> _Plan:
        """The plan of the next decode step, derived instead of rebuilt: the same single row per
        sequence, now the new token, with one more key (that token: valid, text side, not image)."""
        r = self.valid.shape[0]
        yes = torch.ones(r, 1, dtype=torch.bool, device=self.valid.device)
        prepared = with_new_key(self.rows)  # every row one key longer: the new key is the last
        return _Plan(
            self.seq,
            self.start_layer,
            0,
            1,
            yes,
            True,
            torch.cat([self.valid, yes], 1),
            torch.cat([self.semantic, yes], 1),
            torch.cat([self.other, ~yes], 1),
            self.omega,
            self.kappa,
            self.k_len + 1,
            prepared,
        )

    def subset(self, keep: torch.Tensor) -> _Plan:
        flat = keep.repeat_interleave(self.n_rows)
        needed = self.needed[keep]
        return _Plan(
            self.seq[keep],
            [x for x, k in zip(self.start_layer, keep.tolist(), strict=True) if k],
            self.q0,
            self.n_rows,
            needed,
            bool(needed.all()),
            self.valid[flat],
            self.semantic[flat],
            self.other[flat],
            self.omega[flat],
            self.kappa[flat],
            self.k_len,
        )


def _build_plan(batch: AlignmentBatch, mask: torch.Tensor | None, bsz: int, q_len: int, k_len: int) -> _Plan | None:
    seq = batch.enabled.nonzero().squeeze(1)
    if seq.numel() == 0:
        return None
    # Only rows from the earliest align_from on can need alignment.
    q0 = max(int(batch.align_from[seq].min()) - (k_len - q_len), 0)
    if q0 >= q_len:
        return None
    device = batch.omega.device
    q_pos = torch.arange(k_len - q_len + q0, k_len, device=device)  # key index of each selected query row
    n_seq, n_rows = seq.numel(), q_pos.numel()
    if mask is not None:
        mask = mask.expand(bsz, -1, -1, -1)[seq]
    valid = _valid_keys(mask, n_seq, q0, q_pos, k_len).reshape(n_seq * n_rows, k_len)
    semantic, other = span_masks(
        torch.arange(k_len, device=device),
        q_pos.repeat(n_seq),
        batch.last_image[seq].repeat_interleave(n_rows),
        batch.image_keys[seq, :k_len].repeat_interleave(n_rows, dim=0),
        batch.other_is_image_only[seq].repeat_interleave(n_rows),
    )
    needed = q_pos[None, :] >= batch.align_from[seq][:, None]
    return _Plan(
        seq,
        batch.start_layer[seq].tolist(),
        q0,
        n_rows,
        needed,
        bool(needed.all()),
        valid,
        semantic & valid,
        other & valid,
        batch.omega[seq].repeat_interleave(n_rows),
        batch.kappa[seq].repeat_interleave(n_rows),
        k_len,
    )


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
    batch = _current.get()
    layer = getattr(module, "layer_idx", None)
    plan = None
    if batch is not None and layer is not None:
        bsz, n_heads, q_len, head_dim = query.shape
        plan = batch.plan_for(attention_mask, bsz, q_len, key.shape[2])
    if plan is None or layer is None or min(plan.start_layer) > layer:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            **kwargs,  # type: ignore[arg-type]
        )
    assert batch is not None
    if max(plan.start_layer) > layer:
        plan = plan.subset(torch.tensor([s <= layer for s in plan.start_layer]))
    # When every row of the batch is aligned here (decoding with alignment on for all), SDPA's result
    # would be thrown away: skip it. Otherwise keep SDPA's output for all rows not aligned.
    everything = plan.q0 == 0 and plan.seq.numel() == bsz and plan.all_needed
    out = None
    if not everything:
        out, _ = sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            **kwargs,  # type: ignore[arg-type]
        )

    seq, q0, n_rows = plan.seq, plan.q0, plan.n_rows
    k_len = key.shape[2]
    scale = scaling if scaling is not None else head_dim**-0.5
    kv_heads = key.shape[1]
    n_rep = n_heads // kv_heads
    q = (query if everything else query[seq, :, q0:]).float()  # [S, H, R, D]
    k = (key if everything else key[seq]).float()  # [S, KVH, K, D]: GQA without copying K/V per query head
    v = (value if everything else value[seq]).float()
    n_seq = q.shape[0]
    # Query head h reads KV head h // n_rep: group the query heads of each KV head along the row axis.
    q_grouped = q.reshape(n_seq, kv_heads, n_rep * n_rows, head_dim)
    scores = torch.matmul(q_grouped, k.transpose(-1, -2)).view(n_seq, n_heads, n_rows, k_len) * scale
    flat = scores.permute(0, 2, 1, 3).reshape(n_seq * n_rows, n_heads, k_len)  # rows x heads x keys
    aligned, stages = align_prepared(flat, plan.rows)
    probs = torch.softmax(aligned, dim=-1)  # masked keys already at MASKED
    probs = probs.view(n_seq, n_rows, n_heads, k_len).permute(0, 2, 1, 3)  # [S, H, R, K]
    new = torch.matmul(probs.reshape(n_seq, kv_heads, n_rep * n_rows, k_len), v)
    new = new.view(n_seq, n_heads, n_rows, head_dim).transpose(1, 2).to(query.dtype)  # [S, R, H, D]
    batch.record(seq, plan.needed, stages)
    if out is None:
        return new.contiguous(), None
    out[seq, q0:] = torch.where(plan.needed[..., None, None], new, out[seq, q0:])
    return out, None


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
