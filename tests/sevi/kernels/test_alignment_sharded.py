"""The operator on shards of a layer's heads (tensor parallelism) equals the operator on all heads.

Each shard runs in its own thread, as each tensor-parallel worker runs its own heads, and the gather is a
barrier-backed exchange, as vLLM's all-gather is: a shard blocks until every shard has contributed.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sevi.kernels import alignment_dispatch
from sevi.kernels.alignment_dispatch import align_prepared, align_sharded
from sevi.method.alignment import HeadGroups, PreparedRows, prepare_rows, span_masks


def _rows(
    seed: int,
    r: int = 6,
    k: int = 24,
    e: int = 9,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, PreparedRows]:
    g = torch.Generator().manual_seed(seed)
    heads = 8
    # Per-head scales: some heads peaked, some flat, so every group is populated somewhere.
    scores = torch.randn(r, heads, k, generator=g, dtype=dtype) * torch.linspace(0.5, 6, heads, dtype=dtype)[:, None]
    pos = torch.randint(e + 2, k, (r,), generator=g)
    keys = torch.arange(k)
    valid = keys[None, :] <= pos[:, None]
    image = (keys[None, :] >= 2) & (keys[None, :] <= e)
    semantic, other = span_masks(keys, pos, torch.full((r,), e), image.expand(r, k), torch.tensor([False] * r))
    omega = torch.tensor([0.0, 0.5, 3.0, 1.0, 4.0, 2.0], dtype=dtype)[:r]
    kappa = torch.full((r,), 0.3, dtype=dtype)
    return scores, prepare_rows(valid, semantic, other, omega, kappa)


def _run_shards(
    scores: torch.Tensor,
    rows: PreparedRows,
    shards: int,
) -> list[tuple[torch.Tensor, HeadGroups, torch.Tensor]]:
    barrier = threading.Barrier(shards)
    slots: list[torch.Tensor | None] = [None] * shards

    def gather_for(rank: int):  # type: ignore[no-untyped-def]
        def gather(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t
            barrier.wait()
            every = torch.stack([s for s in slots if s is not None])
            barrier.wait()  # nobody overwrites a slot before every shard has read it
            return every

        return gather

    parts = scores.chunk(shards, dim=1)
    with ThreadPoolExecutor(shards) as pool:
        runs = [pool.submit(align_sharded, parts[i].contiguous(), rows, gather_for(i)) for i in range(shards)]
        return [f.result(timeout=30) for f in runs]


@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("seed", range(6))
def test_sharded_operator_equals_the_whole_layer(seed: int, shards: int) -> None:
    scores, rows = _rows(seed)
    want, groups = align_prepared(scores, rows)
    got = _run_shards(scores, rows, shards)
    valid = rows.key_bias[:, 0] == 0
    aligned = torch.cat([out for out, _, _ in got], dim=1)
    for h in range(scores.shape[1]):
        torch.testing.assert_close(aligned[:, h][valid], want[:, h][valid], rtol=1e-12, atol=1e-12)
    for name in ("semantic", "core", "global_", "stage1", "stage2"):
        assert torch.equal(torch.cat([getattr(g, name) for _, g, _ in got], 1), getattr(groups, name)), name
    assert groups.stage1 is not None and groups.stage2 is not None
    moved = torch.stack([groups.stage1.any(-1), groups.stage2.any(-1)], -1)
    for _, _, rows_moved in got:  # every shard reports the whole layer's rows, the same on each
        assert torch.equal(rows_moved, moved)


def test_shards_without_the_exchange_compute_another_method() -> None:
    """Not vacuous: on these rows, a shard that aligns its own heads alone (what tensor parallelism did
    before the exchange) gives other scores than the whole layer."""
    differs = 0
    for seed in range(6):
        scores, rows = _rows(seed)
        want, _ = align_prepared(scores, rows)
        alone = torch.cat([align_prepared(part.contiguous(), rows)[0] for part in scores.chunk(2, dim=1)], dim=1)
        valid = (rows.key_bias[:, 0] == 0)[:, None, :].expand_as(want)
        differs += int(not torch.allclose(alone[valid], want[valid]))
    assert differs >= 3


def test_compiled_halves_equal_the_compiled_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 on the CPU: both halves run compiled ahead of time (as the whole operator does), and the
    shards' result equals the whole layer's within float32 rounding (sums over shards, then over heads)."""
    if alignment_dispatch.compiled_sharded() is None or alignment_dispatch.compiled_operator() is None:
        pytest.skip("no C++ compiler: the compiled operator is not built here")
    calls: list[int] = []
    compiled = alignment_dispatch.compiled_sharded()

    def counted(rows: PreparedRows, sharded: bool = False) -> object:
        calls.append(int(sharded))
        return compiled if sharded else alignment_dispatch.compiled_operator()

    monkeypatch.setattr(alignment_dispatch, "compiled_for", counted)
    for seed in range(4):
        scores, rows = _rows(seed, dtype=torch.float32)
        want, groups = align_prepared(scores, rows)
        got = _run_shards(scores, rows, 2)
        valid = (rows.key_bias[:, 0] == 0)[:, None, :].expand_as(want)
        aligned = torch.cat([out for out, _, _ in got], dim=1)
        torch.testing.assert_close(aligned[valid], want[valid], rtol=1e-5, atol=1e-4)
        for name in ("semantic", "core", "stage1", "stage2"):
            assert torch.equal(torch.cat([getattr(g, name) for _, g, _ in got], 1), getattr(groups, name)), name
    assert calls.count(1) == 8 and calls.count(0) == 4  # two shards a seed took the compiled halves
