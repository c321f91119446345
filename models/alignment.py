"""The SEVI alignment operator (spec section 2), on one query row per (sequence, head).

Pure torch and shared by every engine: the transformers attention hook and the vLLM backend both call
:func:`align_scores`. Input rows are independent, so callers flatten (batch x aligned rows) into the
leading dimension and pass per-row masks and knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class HeadGroups:
    """Boolean head masks `[rows, heads]`: the groups, and (after alignment) the heads each stage moved."""

    semantic: torch.Tensor
    core: torch.Tensor
    global_: torch.Tensor
    stage1: torch.Tensor | None = None  # other heads moved (empty groups and omega == 0 move none)
    stage2: torch.Tensor | None = None  # global heads moved

    @property
    def other(self) -> torch.Tensor:
        return ~self.semantic


@dataclass(frozen=True)
class PreparedRows:
    """Per-row inputs of the operator in the shapes its kernels want. Build once per forward with
    :func:`prepare_rows`; every layer then reuses them (only the scores change from layer to layer)."""

    key_bias: torch.Tensor  # [R, 1, K] float32: 0 at valid keys, -inf elsewhere
    key_sets: torch.Tensor  # [R, K, 2] float32 indicators: semantic keys, other keys
    not_semantic: torch.Tensor  # [R, 1, K] bool
    kappa: torch.Tensor  # [R, 1] float32
    omega: torch.Tensor  # [R, 1, 1] float32
    on: torch.Tensor  # [R, 1] bool: omega > 0


def prepare_rows(valid: torch.Tensor, semantic_keys: torch.Tensor, other_keys: torch.Tensor, omega: torch.Tensor,
                 kappa: torch.Tensor) -> PreparedRows:
    """valid, semantic_keys, other_keys: `[R, K]` bool (the key sets already restricted to valid keys);
    omega, kappa: `[R]`."""
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(~valid, float("-inf"))
    sets = torch.stack([semantic_keys & valid, other_keys & valid], -1).float()
    return PreparedRows(bias[:, None, :], sets, ~(semantic_keys & valid)[:, None, :], kappa.float()[:, None],
                        omega.float()[:, None, None], (omega > 0)[:, None])


def classify_prepared(scores: torch.Tensor, rows: PreparedRows) -> HeadGroups:
    """Head groups of each row from its scores `[R, H, K]`; probabilities in float32."""
    p = torch.softmax(scores.float() + rows.key_bias, dim=-1)
    masses = torch.matmul(p, rows.key_sets)  # [R, H, 2]: semantic mass S, other mass O
    semantic_mass = masses[..., 0]
    # Ties (S == O) count as semantic: the spec's test is S >= O.
    semantic = semantic_mass >= masses[..., 1]
    peak = p.masked_fill(rows.not_semantic, 0.0).amax(-1)
    core = semantic & (peak > rows.kappa * semantic_mass)
    return HeadGroups(semantic=semantic, core=core, global_=semantic & ~core)


def classify_heads(
    scores: torch.Tensor,
    valid: torch.Tensor,
    semantic_keys: torch.Tensor,
    other_keys: torch.Tensor,
    kappa: torch.Tensor,
) -> HeadGroups:
    """Split the heads of each row into semantic (core / global) and other heads.

    scores: `[R, H, K]` pre-softmax scores; valid, semantic_keys, other_keys: `[R, K]` bool;
    kappa: `[R]`. Classification runs in float32 whatever the score dtype.
    """
    rows = prepare_rows(valid, semantic_keys, other_keys, torch.zeros_like(kappa), kappa)
    return classify_prepared(scores, rows)


def align_prepared(scores: torch.Tensor, rows: PreparedRows) -> tuple[torch.Tensor, HeadGroups]:
    """:func:`align_scores` on prepared rows (the per-layer hot path)."""
    groups = classify_prepared(scores, rows)
    glob, core = groups.global_, groups.core
    glob_w = glob.to(scores.dtype)
    n_global = glob_w.sum(-1, keepdim=True)  # [R, 1]
    global_mean = torch.matmul(glob_w[:, None, :], scores) / n_global.clamp(min=1)[..., None]  # [R, 1, K]
    # A stand-in of -inf for non-core heads makes max() pick core heads only; rows without core heads
    # are excluded by the stage-2 condition below, so the -inf never reaches the output.
    core_max = scores.masked_fill(~core[..., None], float("-inf")).amax(1, keepdim=True)  # [R, 1, K]

    stage1 = groups.other & (n_global > 0) & rows.on
    stage2 = glob & core.any(-1, keepdim=True) & rows.on

    # The stages move disjoint heads (other vs global), so one blend serves both.
    w = rows.omega.to(scores.dtype)
    target = torch.where(stage1[..., None], global_mean, core_max)
    out = torch.where((stage1 | stage2)[..., None], (scores + w * target) / (1 + w), scores)
    return out, replace(groups, stage1=stage1, stage2=stage2)


def align_scores(
    scores: torch.Tensor,
    valid: torch.Tensor,
    semantic_keys: torch.Tensor,
    other_keys: torch.Tensor,
    omega: torch.Tensor,
    kappa: torch.Tensor,
) -> tuple[torch.Tensor, HeadGroups]:
    """Return SEVI-aligned pre-softmax scores for each row, and the head groups with the heads each stage moved.

    scores: `[R, H, K]`; valid, semantic_keys, other_keys: `[R, K]` bool; omega, kappa: `[R]`.
    Stage 1 pulls every other head toward the mean of the (unmodified) global heads; stage 2 pulls
    every global head toward the element-wise max of the core heads. A stage runs only where both of
    its groups are non-empty, and rows with omega == 0 come back bit-identical. Invalid (masked) keys
    are aligned like the rest; the caller masks them before the softmax as usual.
    """
    return align_prepared(scores, prepare_rows(valid, semantic_keys, other_keys, omega, kappa))


def span_masks(
    key_positions: torch.Tensor,
    query_positions: torch.Tensor,
    last_image: torch.Tensor,
    image_keys: torch.Tensor,
    other_is_image_only: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key masks for rows: semantic keys `e < j <= i` and the "other" keys (spec sections 2 and 4).

    key_positions: `[K]` or `[R, K]` index of each key in its sequence; query_positions: `[R]` (i);
    last_image: `[R]` (e, -1 when there is no image); image_keys: `[R, K]` bool, whether each key is an
    image token; other_is_image_only: `[R]` bool (Qwen family: only image tokens count as "other";
    LLaVA family: every key up to e).
    """
    j = key_positions if key_positions.dim() == 2 else key_positions[None, :]
    e = last_image[:, None]
    semantic = (j > e) & (j <= query_positions[:, None])
    up_to_e = j <= e
    other = torch.where(other_is_image_only[:, None], image_keys & up_to_e, up_to_e)
    return semantic, other
