"""The SEVI alignment operator (spec section 2), on one query row per (sequence, head).

Pure torch (this module imports nothing else of the project) and shared by every engine: the
transformers attention hook and the vLLM backend both run :func:`align_prepared` (:func:`align_scores`
for one-off use). Input rows are independent, so callers flatten (batch x aligned rows) into the leading
dimension and pass per-row masks and knobs. The engines call it through sevi/kernels/alignment_dispatch.py,
which runs this very code compiled ahead of time where it can (sevi/kernels/alignment_compiled.py) and as it is
here everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


# Score of a masked (invalid) key: finite, so that means and blends over heads stay finite (no inf - inf,
# no 0 * inf), and far enough below any real score that a softmax gives it exactly zero weight.
MASKED = -1e30


@dataclass(frozen=True)
class PreparedRows:
    """Per-row inputs of the operator in the shapes its kernels want. Build once per forward with
    :func:`prepare_rows`; every layer then reuses them (only the scores change from layer to layer)."""

    key_bias: torch.Tensor  # [R, 1, K] float32: 0 at valid keys, MASKED elsewhere
    semantic_keys: torch.Tensor  # [R, 1, K] float32 indicator of the semantic keys
    other_keys: torch.Tensor  # [R, 1, K] float32 indicator of the "other" keys
    kappa: torch.Tensor  # [R, 1] float32
    blend: torch.Tensor  # [R, 1, 1]: omega / (1 + omega), the weight of the target in a moved head
    on: torch.Tensor  # [R, 1] bool: omega > 0
    all_on: bool  # every row has omega > 0 (the `on` test can be skipped)


def prepare_rows(
    valid: torch.Tensor,
    semantic_keys: torch.Tensor,
    other_keys: torch.Tensor,
    omega: torch.Tensor,
    kappa: torch.Tensor,
    all_on: bool | None = None,
) -> PreparedRows:
    """valid, semantic_keys, other_keys: `[R, K]` bool (the key sets are restricted to valid keys here);
    omega, kappa: `[R]`; all_on: whether every omega > 0 where the caller knows it on the host (else read
    back from omega's device: a sync on a GPU)."""
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(~valid, MASKED)
    semantic = (semantic_keys & valid).float()[:, None, :]
    other = (other_keys & valid).float()[:, None, :]
    omega = omega.to(torch.promote_types(omega.dtype, torch.float32))  # float64 knobs stay exact
    on = omega > 0
    return PreparedRows(
        bias[:, None, :],
        semantic,
        other,
        kappa.float()[:, None],
        (omega / (1 + omega))[:, None, None],
        on[:, None],
        bool(on.all()) if all_on is None else all_on,
    )


def select_rows(rows: PreparedRows, index: torch.Tensor, all_on: bool | None = None) -> PreparedRows:
    """The prepared rows at `index` (long `[R']`); all_on as in :func:`prepare_rows`."""
    on = rows.on[index]
    return PreparedRows(
        rows.key_bias[index],
        rows.semantic_keys[index],
        rows.other_keys[index],
        rows.kappa[index],
        rows.blend[index],
        on,
        rows.all_on or (bool(on.all()) if all_on is None else all_on),
    )


def with_new_key(rows: PreparedRows, at: torch.Tensor | None = None) -> PreparedRows:
    """The rows one decode step later: one key wider, the new key (the token just generated: valid,
    semantic, not "other") at the new last column of every row (`at` None), or, when rows have
    different lengths, at column `at` (long `[R]`): the one after each row's own last key."""
    if at is not None:
        widened = widen(rows, rows.key_bias.shape[-1] + 1)
        add_key_(widened, at)
        return widened
    # One pad per mask (a single op: the reference engine runs this every decode step).
    bias = F.pad(rows.key_bias, (0, 1), value=0.0)
    semantic = F.pad(rows.semantic_keys, (0, 1), value=1.0)
    other = F.pad(rows.other_keys, (0, 1), value=0.0)
    return PreparedRows(bias, semantic, other, rows.kappa, rows.blend, rows.on, rows.all_on)


def widen(rows: PreparedRows, width: int) -> PreparedRows:
    """The rows' masks `width` keys wide: the keys added are masked, neither semantic nor "other"."""
    extra = width - rows.key_bias.shape[-1]
    if extra <= 0:
        return rows
    return PreparedRows(
        F.pad(rows.key_bias, (0, extra), value=MASKED),
        F.pad(rows.semantic_keys, (0, extra)),
        F.pad(rows.other_keys, (0, extra)),
        rows.kappa,
        rows.blend,
        rows.on,
        rows.all_on,
    )


def add_key_(rows: PreparedRows, key_count: torch.Tensor) -> None:
    """In place, one decode step on, in masks allocated wider than the rows' keys: each row's next key (column
    `key_count`, long `[R]`: the keys it had) is the token just generated: valid, semantic, not "other"."""
    col = key_count.to(rows.key_bias.device).view(-1, 1, 1)
    rows.key_bias.scatter_(2, col, 0.0)
    rows.semantic_keys.scatter_(2, col, 1.0)


def _classify(
    biased: torch.Tensor, semantic_keys: torch.Tensor, other_keys: torch.Tensor, kappa: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(semantic, core) head masks `[R, H]` from float32 scores that already carry the key bias.

    Both tests compare quantities of one head that share the softmax's denominator (S >= O, and
    max p > kappa * S), so they run on e = exp(s - max s) and the normalisation is never taken; the
    largest semantic probability is exp(max semantic score - max s), an H-wide exp instead of a K-wide
    max over e. Compiled, that is one exp pass and no K-wide buffer (8 rows x 16 heads x 650 keys:
    about 71 -> 64 us)."""
    top = biased.amax(-1, keepdim=True)
    e = torch.exp(biased - top)
    # Masses by multiply-and-sum, not a matmul with the key sets: a [K, 2] right-hand side is a poor
    # GEMM shape (6x slower at 600 keys).
    semantic_mass = (e * semantic_keys).sum(-1)  # S per head, times the softmax denominator
    other_mass = (e * other_keys).sum(-1)  # O likewise
    # Ties (S == O) count as semantic: the spec's test is S >= O.
    semantic = semantic_mass >= other_mass
    # Non-semantic keys pushed below any score (the key sets are 0 / 1): a row without semantic keys
    # gets exp(-huge) = 0, so no core head, as with p.
    top_semantic = (biased + (semantic_keys - 1) * -MASKED).amax(-1)
    peak = torch.exp(top_semantic - top[..., 0])
    core = semantic & (peak > kappa * semantic_mass)
    return semantic, core


def classify_prepared(scores: torch.Tensor, rows: PreparedRows) -> HeadGroups:
    """Head groups of each row from its scores `[R, H, K]`; probabilities in float32."""
    semantic, core = _classify(scores.float() + rows.key_bias, rows.semantic_keys, rows.other_keys, rows.kappa)
    return HeadGroups(semantic=semantic, core=core, global_=semantic ^ core)


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
    """:func:`align_scores` on prepared rows (the per-layer hot path), eagerly.

    The scores come back in float32 (or their own dtype when wider) with the key mask applied
    (masked keys at about MASKED), ready for the softmax. The softmax stays outside: compiled into the
    operator's graph it cost 90 us more per layer than torch's own at 8 rows x 650 keys in the served
    model (its passes over the scores are worse than aten's).
    """
    out, semantic, core, glob, stage1, stage2 = align_tensors(
        scores,
        rows.key_bias,
        rows.semantic_keys,
        rows.other_keys,
        rows.kappa,
        rows.blend,
        on=None if rows.all_on else rows.on,
    )
    return out, HeadGroups(semantic=semantic, core=core, global_=glob, stage1=stage1, stage2=stage2)


def operator_inputs(scores: torch.Tensor, rows: PreparedRows) -> list[torch.Tensor]:
    """The compiled operator's inputs, in its order (:func:`align_tensors`' arguments, `on` given); it
    returns the aligned scores and the semantic, core, global, stage-1 and stage-2 head masks."""
    return [scores, rows.key_bias, rows.semantic_keys, rows.other_keys, rows.kappa, rows.blend, rows.on]


def align_tensors(
    scores: torch.Tensor,
    key_bias: torch.Tensor,
    semantic_keys: torch.Tensor,
    other_keys: torch.Tensor,
    kappa: torch.Tensor,
    blend: torch.Tensor,
    on: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operator on the fields of :class:`PreparedRows` (`on` None: every row's omega > 0, the eager
    path's shortcut; the compiled one always takes it).

    Returns the aligned scores and the semantic, core, global, stage-1-moved and stage-2-moved head
    masks. Every op here runs once per aligned layer, so the formulation keeps their number and their
    cost low: masks are float weights (multiplies and adds instead of masked copies or K-wide
    `where`s), and each stage is one `lerp` toward the row's target with a per-head weight that is 0
    for the heads the stage does not move. Tensors only (no dataclasses), so that torch.export can
    trace it. It is :func:`head_partials` then :func:`blend_targets`, the two halves a tensor-parallel
    shard runs on either side of its collective (:func:`align_sharded`).
    """
    s = scores + key_bias  # float32, or the scores' dtype when wider
    semantic, core, glob, global_sum, n_global, core_max, n_core = head_partials(s, semantic_keys, other_keys, kappa)
    out, stage1, stage2 = blend_targets(s, semantic, glob, global_sum, n_global, core_max, n_core, blend, on)
    return out, semantic, core, glob, stage1, stage2


def head_partials(
    s: torch.Tensor,
    semantic_keys: torch.Tensor,
    other_keys: torch.Tensor,
    kappa: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The heads' groups and the cross-head quantities the stages need, in forms that add up over shards
    of the heads: (semantic, core, global) masks `[R, H]`, the global heads' score sum `[R, 1, K]` and
    count `[R, 1]`, the element-wise max of the core heads' scores `[R, 1, K]` and their count `[R, 1]`.
    `s`: scores with the key bias added."""
    semantic, core = _classify(s.float(), semantic_keys, other_keys, kappa)
    glob = semantic ^ core  # core heads are semantic heads: the rest of them are global
    glob_w = glob.to(s.dtype)
    n_global = glob_w.sum(-1, keepdim=True)  # [R, 1]
    global_sum = torch.matmul(glob_w.unsqueeze(1), s)  # [R, 1, K]
    # MASKED on non-core heads makes max() pick core heads only; rows without core heads are excluded
    # by the stage-2 condition (their weight is 0), and the value stays finite.
    core_bias = torch.where(core, 0.0, MASKED).unsqueeze(-1)  # [R, H, 1]: an add, not a K-wide where
    core_max = (s + core_bias).amax(1, keepdim=True)  # [R, 1, K]
    n_core = core.to(s.dtype).sum(-1, keepdim=True)  # [R, 1]
    return semantic, core, glob, global_sum, n_global, core_max, n_core


def blend_targets(
    s: torch.Tensor,
    semantic: torch.Tensor,
    glob: torch.Tensor,
    global_sum: torch.Tensor,
    n_global: torch.Tensor,
    core_max: torch.Tensor,
    n_core: torch.Tensor,
    blend: torch.Tensor,
    on: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both stages from the cross-head quantities of :func:`head_partials` (over every head of the layer):
    the aligned scores and the heads each stage moved `[R, H]`."""
    global_mean = global_sum / n_global.clamp(min=1).unsqueeze(-1)  # [R, 1, K]
    stage1 = ~semantic & (n_global > 0)
    stage2 = glob & (n_core > 0)
    if on is not None:
        stage1, stage2 = stage1 & on, stage2 & on
    # (s + omega * target) / (1 + omega) == lerp(s, target, omega / (1 + omega)); a weight of 0 leaves
    # s as it is. The stages move disjoint heads (other vs global): one lerp each, toward a target
    # shared by the row's heads, with a per-head weight (cheaper than picking a per-head target).
    w1 = (stage1.unsqueeze(-1) * blend).to(s.dtype)  # no-op casts unless knobs and scores differ
    w2 = (stage2.unsqueeze(-1) * blend).to(s.dtype)
    out = torch.lerp(torch.lerp(s, global_mean, w1), core_max, w2)
    return out, stage1, stage2


# Gathers a tensor from every shard of a layer's heads: `[R, C]` in, `[shards, R, C]` out, in shard order.
ShardGather = Callable[[torch.Tensor], torch.Tensor]


def align_sharded(
    scores: torch.Tensor,
    rows: PreparedRows,
    gather: ShardGather,
) -> tuple[torch.Tensor, HeadGroups, torch.Tensor]:
    """:func:`align_prepared` for one shard of a layer's heads (tensor parallelism: each worker holds some
    of the query heads). Classification is per head; the global heads' mean, the core heads' max and the
    "both groups non-empty" tests are over every head of the layer, so each shard's partial sums, maxima
    and counts are gathered (one collective: `gather`) and combined in shard order, the same on every
    shard. Returns the aligned scores of this shard's heads, its head groups (stage masks: its heads
    moved), and per row whether each stage moved any head of any shard (bool `[R, 2]`, for telemetry).

    Eagerly; sevi/kernels/alignment_dispatch.py runs both halves compiled where it can, like the whole operator."""
    s, semantic, core, glob, packed = shard_partials(
        scores, rows.key_bias, rows.semantic_keys, rows.other_keys, rows.kappa
    )
    out, stage1, stage2, moved = shard_finish(
        s, semantic, glob, gather(packed), rows.blend, None if rows.all_on else rows.on
    )
    return out, HeadGroups(semantic=semantic, core=core, global_=glob, stage1=stage1, stage2=stage2), moved


def shard_partials(
    scores: torch.Tensor,
    key_bias: torch.Tensor,
    semantic_keys: torch.Tensor,
    other_keys: torch.Tensor,
    kappa: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """A shard's half before the exchange: the biased scores, its head groups, and what it contributes,
    packed in one `[R, 2K + 3]` tensor: the global heads' score sum (K), the core heads' max (K), and the
    counts of global, core and other heads."""
    s = scores + key_bias
    semantic, core, glob, global_sum, n_global, core_max, n_core = head_partials(s, semantic_keys, other_keys, kappa)
    n_other = (~semantic).to(s.dtype).sum(-1, keepdim=True)
    packed = torch.cat([global_sum[:, 0], core_max[:, 0], n_global, n_core, n_other], -1)
    return s, semantic, core, glob, packed


def shard_finish(
    s: torch.Tensor,
    semantic: torch.Tensor,
    glob: torch.Tensor,
    every: torch.Tensor,
    blend: torch.Tensor,
    on: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """A shard's half after the exchange: `every` (`[shards, R, 2K + 3]`, every shard's packed partials)
    summed or maxed over the shards, then both stages on this shard's heads. Returns the aligned scores,
    the stage masks of this shard's heads, and the rows each stage moved anywhere (bool `[R, 2]`)."""
    k = s.shape[-1]
    global_sum, core_max = every[..., :k].sum(0).unsqueeze(1), every[..., k : 2 * k].amax(0).unsqueeze(1)
    counts = every[..., 2 * k :].sum(0)
    n_global, n_core, n_other = counts[:, 0:1], counts[:, 1:2], counts[:, 2:3]
    out, stage1, stage2 = blend_targets(s, semantic, glob, global_sum, n_global, core_max, n_core, blend, on)
    moved = torch.cat([(n_other > 0) & (n_global > 0), (n_global > 0) & (n_core > 0)], -1)  # [R, 2]
    if on is not None:
        moved = moved & on
    return out, stage1, stage2, moved


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
    its groups are non-empty, and rows with omega == 0 come back unchanged at their valid keys. Invalid
    keys come back at about MASKED (-1e30), so a softmax over the result gives them zero weight as is.
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
