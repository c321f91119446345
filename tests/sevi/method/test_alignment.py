"""The alignment operator against the naive loop implementation, on hand-made and random scores."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sevi.method.alignment import align_scores, classify_heads, span_masks
from tests.sevi_reference import align_row_loop


def _masks(k_len: int, e: int, image: list[int], qwen: bool, i: int | None = None) -> tuple[torch.Tensor, ...]:
    i = k_len - 1 if i is None else i
    keys = torch.arange(k_len)
    image_keys = torch.zeros(1, k_len, dtype=torch.bool)
    image_keys[0, image] = True
    semantic, other = span_masks(keys, torch.tensor([i]), torch.tensor([e]), image_keys, torch.tensor([qwen]))
    valid = (keys <= i)[None]
    return valid, semantic & valid, other & valid


def _loop(
    scores: torch.Tensor, valid: torch.Tensor, semantic: torch.Tensor, other: torch.Tensor, omega: float, kappa: float
) -> torch.Tensor:
    keys = [int(j) for j in valid[0].nonzero()[:, 0]]
    s = [[float(scores[0, h, j]) for j in keys] for h in range(scores.shape[1])]
    out = align_row_loop(
        s, keys, set(semantic[0].nonzero()[:, 0].tolist()), set(other[0].nonzero()[:, 0].tolist()), omega, kappa
    )
    full = scores.clone().double()
    for h, row in enumerate(out):
        full[0, h, keys] = torch.tensor(row, dtype=torch.float64)
    return full


@pytest.mark.parametrize("qwen", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_operator_matches_loop_on_random_rows(qwen: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    heads, k_len, e = 8, 20, 9
    scores = torch.randn(1, heads, k_len, generator=g, dtype=torch.float64) * 3
    valid, semantic, other = _masks(k_len, e, list(range(3, 10)), qwen, i=17)
    omega, kappa = 1.5, 0.45
    knob = dict(dtype=torch.float64)  # knobs in the scores' precision: the blend is then exact to 1e-9
    got, groups = align_scores(
        scores, valid, semantic, other, torch.tensor([omega], **knob), torch.tensor([kappa], **knob)
    )
    want = _loop(scores, valid, semantic, other, omega, kappa)
    # Only valid keys are defined by the spec; the caller masks the rest before the softmax.
    torch.testing.assert_close(got[..., valid[0]], want[..., valid[0]], rtol=1e-9, atol=1e-9)


def test_all_groups_populated_and_both_stages_change_scores() -> None:
    """Hand-made row: head 0 core (peaked on text), head 1 global (spread on text), head 2 other (image)."""
    e = 2  # keys 0..2 are image/prompt, 3..5 semantic
    scores = torch.tensor(
        [[[0.0, 0.0, 0.0, 9.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 2.0, 2.0], [5.0, 5.0, 5.0, 0.0, 0.0, 0.0]]],
        dtype=torch.float64,
    )
    valid, semantic, other = _masks(6, e, [0, 1, 2], qwen=False)
    groups = classify_heads(scores, valid, semantic, other, torch.tensor([0.5]))
    assert groups.core[0].tolist() == [True, False, False]
    assert groups.global_[0].tolist() == [False, True, False]
    assert groups.other[0].tolist() == [False, False, True]
    got, moved = align_scores(scores, valid, semantic, other, torch.tensor([1.0]), torch.tensor([0.5]))
    assert moved.stage1 is not None and moved.stage2 is not None
    assert moved.stage1[0].tolist() == [False, False, True] and moved.stage2[0].tolist() == [False, True, False]
    # Stage 1: the other head moves halfway toward the global head's (unmodified) scores.
    torch.testing.assert_close(got[0, 2], (scores[0, 2] + scores[0, 1]) / 2)
    # Stage 2: the global head moves halfway toward the core head's scores; the core head never changes.
    torch.testing.assert_close(got[0, 1], (scores[0, 1] + scores[0, 0]) / 2)
    torch.testing.assert_close(got[0, 0], scores[0, 0])


def test_empty_groups_leave_scores_alone() -> None:
    # Every semantic head is core (kappa 0): no global heads, so neither stage may run.
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(1, 6, 10, generator=g, dtype=torch.float64)
    valid, semantic, other = _masks(10, 4, [1, 2, 3, 4], qwen=True)
    got, groups = align_scores(scores, valid, semantic, other, torch.tensor([2.0]), torch.tensor([0.0]))
    assert not bool(groups.global_.any())
    assert torch.equal(got, scores)
    # A row with no semantic keys at all (the query is the last image token): nothing is semantic... unless
    # other mass is 0 too; either way the result must equal the loop reference.
    valid, semantic, other = _masks(10, 9, [5, 6, 7, 8, 9], qwen=True)
    got, _ = align_scores(scores, valid, semantic, other, torch.tensor([2.0]), torch.tensor([0.2]))
    torch.testing.assert_close(got, _loop(scores, valid, semantic, other, 2.0, 0.2))


def test_ties_count_as_semantic() -> None:
    # Uniform attention over 2 other keys and 2 semantic keys: S == O exactly, so the head is semantic.
    scores = torch.zeros(1, 2, 4, dtype=torch.float64)
    valid, semantic, other = _masks(4, 1, [0, 1], qwen=False)
    groups = classify_heads(scores, valid, semantic, other, torch.tensor([0.2]))
    assert groups.semantic.all()
    # Peak 0.25 vs kappa * S = 0.2 * 0.5: core. With kappa 0.6 (0.3 > 0.25): global.
    assert groups.core.all()
    assert classify_heads(scores, valid, semantic, other, torch.tensor([0.6])).global_.all()


def test_omega_zero_is_bit_identical_and_rows_are_independent() -> None:
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 8, 16, generator=g)
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[1, :4] = False  # left padding on row 1
    keys = torch.arange(16)
    image_keys = ((keys >= 4) & (keys < 9))[None].expand(3, -1)
    semantic, other = span_masks(
        keys, torch.full((3,), 15), torch.full((3,), 8), image_keys, torch.tensor([False, True, False])
    )
    semantic &= valid
    other &= valid
    omega = torch.tensor([0.0, 3.0, 1.0])
    kappa = torch.tensor([0.5, 0.5, 0.5])
    got, _ = align_scores(scores, valid, semantic, other, omega, kappa)
    assert torch.equal(got[0], scores[0])
    for r in (1, 2):
        alone, _ = align_scores(
            scores[r : r + 1],
            valid[r : r + 1],
            semantic[r : r + 1],
            other[r : r + 1],
            omega[r : r + 1],
            kappa[r : r + 1],
        )
        torch.testing.assert_close(got[r], alone[0])


def test_span_masks_per_family() -> None:
    keys = torch.arange(8)
    image_keys = torch.tensor([[False, True, True, True, False, False, False, False]] * 2)
    semantic, other = span_masks(
        keys, torch.tensor([6, 6]), torch.tensor([3, 3]), image_keys, torch.tensor([False, True])
    )
    assert semantic[0].tolist() == [False, False, False, False, True, True, True, False]
    assert other[0].tolist() == [True, True, True, True, False, False, False, False]  # LLaVA: all keys <= e
    assert other[1].tolist() == [False, True, True, True, False, False, False, False]  # Qwen: image span only


def test_with_new_key_equals_masks_built_one_key_wider() -> None:
    """A decode step's masks, derived from the last step's, equal those prepared afresh: rows of one
    length (the new key is every row's last column) and rows of different lengths (each row's own)."""
    from sevi.method.alignment import prepare_rows, with_new_key

    e, k = 4, 10
    keys = torch.arange(k + 1)
    for last_key in (torch.tensor([9, 9, 9]), torch.tensor([9, 6, 5])):  # each row's last key now (past e)
        position = last_key + 1  # the new key of each row

        def prepared(width: int, pos: torch.Tensor) -> Any:
            j = keys[None, :width]
            valid = j <= pos[:, None]
            return prepare_rows(
                valid, (j > e) & valid, (j <= e) & valid, torch.tensor([1.0, 0.0, 2.0]), torch.full((3,), 0.5)
            )

        before, want = prepared(k, last_key), prepared(k + 1, position)
        same_length = bool((last_key == k - 1).all())
        got = with_new_key(before, None if same_length else position)
        for name in ("key_bias", "semantic_keys", "other_keys", "kappa", "blend", "on"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert got.key_bias.is_contiguous() and got.semantic_keys.is_contiguous() and got.other_keys.is_contiguous()
