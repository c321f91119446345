"""bench.paged_layouts runs and its AMX and vec caches hold the same K/V (so its ratios compare like with like)."""

from __future__ import annotations

import torch

from bench.paged_layouts import caches
from sevi.engines.vllm.plugin.paged_read import block_scores, block_values


def test_the_three_layouts_hold_the_same_keys_and_values() -> None:
    layouts = caches(n_blocks=3, g=2, bs=32, d=32)
    blocks = torch.tensor([2, 0, 1])
    q = torch.randn(1, 2, 2, 32)
    probs = torch.softmax(torch.randn(1, 4, 90), -1)
    scores = [block_scores(q, cache, blocks, 90, 0.1) for cache in layouts.values()]
    values = [block_values(probs, cache, blocks, 2) for cache in layouts.values()]
    for s, v in zip(scores[1:], values[1:], strict=True):
        torch.testing.assert_close(s, scores[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, values[0], rtol=1e-5, atol=1e-5)
