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
    s = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    sem = semantic_keys[:, None, :]
    p_sem = p * sem
    semantic_mass = p_sem.sum(-1)
    other_mass = (p * other_keys[:, None, :]).sum(-1)
    # Ties (S == O) count as semantic: the spec's test is S >= O.
    semantic = semantic_mass >= other_mass
    peak = p_sem.amax(-1)
    core = semantic & (peak > kappa.float()[:, None] * semantic_mass)
    return HeadGroups(semantic=semantic, core=core, global_=semantic & ~core)


def align_scores(
    scores: torch.Tensor,
    valid: torch.Tensor,
    semantic_keys: torch.Tensor,
    other_keys: torch.Tensor,
    omega: torch.Tensor,
    kappa: torch.Tensor,
) -> tuple[torch.Tensor, HeadGroups]:
    """Return SEVI-aligned pre-softmax scores for each row, and the head groups with the heads each stage moved.

    Stage 1 pulls every other head toward the mean of the (unmodified) global heads; stage 2 pulls
    every global head toward the element-wise max of the core heads. A stage runs only where both of
    its groups are non-empty, and rows with omega == 0 come back bit-identical. Invalid (masked) keys
    are aligned like the rest; the caller masks them before the softmax as usual.
    """
    groups = classify_heads(scores, valid, semantic_keys, other_keys, kappa)
    w = omega.to(scores.dtype)[:, None, None]
    other = groups.other
    glob = groups.global_
    core = groups.core

    n_global = glob.sum(-1, keepdim=True)  # [R, 1]
    global_mean = (scores * glob[..., None]).sum(1) / n_global.clamp(min=1)  # [R, K]
    # A stand-in of -inf for non-core heads makes max() pick core heads only; rows without core heads
    # are excluded by the stage-2 condition below, so the -inf never reaches the output.
    core_max = scores.masked_fill(~core[..., None], float("-inf")).amax(1)  # [R, K]

    on = omega[:, None] > 0
    stage1 = other & (n_global > 0) & on
    stage2 = glob & core.any(-1, keepdim=True) & on

    # The stages move disjoint heads (other vs global), so one blend serves both.
    target = torch.where(stage1[..., None], global_mean[:, None, :], core_max[:, None, :])
    out = torch.where((stage1 | stage2)[..., None], (scores + w * target) / (1 + w), scores)
    return out, replace(groups, stage1=stage1, stage2=stage2)


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
