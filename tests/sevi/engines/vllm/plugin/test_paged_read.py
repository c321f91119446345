"""Block-wise scores and values over a paged K/V cache, by the C kernel (both builds) and by torch
(sevi/engines/vllm/plugin/paged_read.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from sevi.engines.vllm.plugin.cpu_backend import paged_cpu_kv, read_cpu_kv  # noqa: E402
from sevi.engines.vllm.plugin.paged_read import PagedKV, block_scores, block_values, c_kernel_for  # noqa: E402
from tests.support.vllm_plugin import random_cpu_cache  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_state")


def k_blocks(cache: torch.Tensor, k_t: bool) -> torch.Tensor:
    """K `[N, G, bs, D]` row-major from the CPU cache."""
    n, g, bs, two_d = cache.shape
    r = cache.view(n, g, 2, bs * two_d // 2)[:, :, 0]
    return r.view(n, g, two_d // 2, bs).transpose(-1, -2) if k_t else r.view(n, g, bs, two_d // 2)


def v_blocks(cache: torch.Tensor, v_t: bool) -> torch.Tensor:
    n, g, bs, two_d = cache.shape
    r = cache.view(n, g, 2, bs * two_d // 2)[:, :, 1]
    return r.view(n, g, two_d // 2, bs).transpose(-1, -2) if v_t else r.view(n, g, bs, two_d // 2)


# (keys, block size): a partial block, one full, two full, 2 + a partial; vLLM's CPU block of 128 keys.
# The 16-bit caches (vLLM's --dtype bfloat16 / float16) on the larger shapes.
@pytest.mark.parametrize(
    ("num_keys", "bs", "dtype"),
    [
        (20, 32, torch.float32),
        (32, 32, torch.float32),
        (64, 32, torch.float32),
        (75, 32, torch.float32),
        (111, 128, torch.float32),
        (300, 128, torch.float32),
        (75, 32, torch.bfloat16),
        (300, 128, torch.bfloat16),
        (75, 32, torch.float16),
        (300, 128, torch.float16),
    ],
)
def test_block_wise_scores_and_values_equal_the_gathered_ones(
    num_keys: int, bs: int, dtype: torch.dtype, kv_path: str
) -> None:
    hd, g, rep = 32, 2, 3
    cache, k_t, v_t = random_cpu_cache(12, g, bs, hd, seed=num_keys, dtype=dtype)
    if kv_path.startswith("kernel"):  # the C kernel reads every dtype vLLM's CPU cache comes in
        assert c_kernel_for(paged_cpu_kv(cache, k_t, v_t)) is not None
    nb = -(-num_keys // bs)
    blocks = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(i))[:nb] for i in range(4)])
    k, v = read_cpu_kv(cache, blocks, k_t, v_t)  # [R, G, nb * bs, D], the plain gathered reading
    k, v = k[:, :, :num_keys].float(), v[:, :, :num_keys].float()
    q = torch.randn(4, g, rep, hd)
    want = torch.matmul(q, k.transpose(-1, -2)).mul(0.3).reshape(4, g * rep, num_keys)
    # The CPU layout (K transposed on AVX2), and a row-major one like FlashAttention's.
    flash = torch.cat([k_blocks(cache, k_t), v_blocks(cache, v_t)], -1)  # [N, G, bs, 2D]
    for paged in (paged_cpu_kv(cache, k_t, v_t), PagedKV(flash[..., :hd], flash[..., hd:], False, False)):
        got = block_scores(q, paged, blocks.reshape(-1), num_keys, 0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        probs = torch.softmax(torch.randn(4, g * rep, num_keys), -1)
        want_v = torch.matmul(probs.view(4, g, rep, num_keys), v)
        torch.testing.assert_close(block_values(probs, paged, blocks.reshape(-1), g), want_v, rtol=1e-5, atol=1e-5)


# 24, 40: blocks that are not a whole number of the kernel's 16-key tiles; 128 (vLLM's CPU block), 256:
# whole spans of tiles (the streaming path), the last one partial. (query heads per KV head, head size): the
# kernel takes several heads of a KV head in one pass (2, 4, 8 at once, as registers allow), one at a time
# otherwise (3 heads: 2 + 1; 48 dims: 3 tiles per head have no case).
@pytest.mark.parametrize("bs", [24, 40, 128, 256])
@pytest.mark.parametrize(("rep", "hd"), [(2, 32), (1, 64), (4, 64), (8, 32), (3, 48), (2, 128)])
def test_block_wise_scores_and_values_for_any_block_size(bs: int, rep: int, hd: int, kv_path: str) -> None:
    n_blocks, g, num_keys = 6, 2, 2 * bs + 5
    gen = torch.Generator().manual_seed(bs)
    k, v = torch.randn(n_blocks, g, bs, hd, generator=gen), torch.randn(n_blocks, g, bs, hd, generator=gen)
    nb = -(-num_keys // bs)
    blocks = torch.stack([torch.randperm(n_blocks, generator=gen)[:nb] for _ in range(3)])
    q, probs = torch.randn(3, g, rep, hd, generator=gen), torch.softmax(torch.randn(3, g * rep, num_keys), -1)

    def seq(x: torch.Tensor) -> torch.Tensor:  # [R, G, num_keys, D]: each row's blocks end to end
        return x[blocks].permute(0, 2, 1, 3, 4).reshape(3, g, nb * bs, hd)[:, :, :num_keys]

    want = torch.matmul(q, seq(k).transpose(-1, -2)).mul(0.5).reshape(3, g * rep, num_keys)
    want_v = torch.matmul(probs.view(3, g, rep, num_keys), seq(v))
    for paged in (
        PagedKV(k, v, False, False),
        PagedKV(k.transpose(-1, -2).contiguous(), v.transpose(-1, -2).contiguous(), True, True),
    ):
        torch.testing.assert_close(
            block_scores(q, paged, blocks.reshape(-1), num_keys, 0.5), want, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(block_values(probs, paged, blocks.reshape(-1), g), want_v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rep", [1, 2, 4])
def test_rows_of_different_lengths_read_only_their_own_keys(rep: int, kernel_build: str) -> None:
    """With key counts the kernel neither reads past a row's own keys (NaN there changes nothing) nor
    leaves garbage in its scores there (0, for the key mask to drop)."""
    bs, g, hd, num_keys = 128, 2, 32, 300
    cache, k_t, v_t = random_cpu_cache(12, g, bs, hd, seed=11)
    counts = torch.tensor([300, 130, 1, 257])  # a partial span, one key, the first key of a third block
    blocks = torch.arange(12).view(4, 3)  # each row its own blocks
    k, v = read_cpu_kv(cache, blocks, k_t, v_t)
    q = torch.randn(4, g, rep, hd, generator=torch.Generator().manual_seed(2))
    valid = torch.arange(num_keys)[None, :] < counts[:, None]  # [R, K]
    want = torch.matmul(q, k[:, :, :num_keys].transpose(-1, -2)).mul(0.3).reshape(4, g * rep, num_keys)
    want = want.masked_fill(~valid[:, None], 0.0)
    probs = torch.softmax(torch.randn(4, g * rep, num_keys).masked_fill(~valid[:, None], float("-inf")), -1)
    want_v = torch.matmul(probs.view(4, g, rep, num_keys), v[:, :, :num_keys])
    paged = paged_cpu_kv(cache, k_t, v_t)
    for r, count in enumerate(counts.tolist()):  # poison every slot past each row's count, through the views
        for j in range(3):
            first = max(count - j * bs, 0)
            for view, transposed in ((paged.key, k_t), (paged.value, v_t)):
                block = view[int(blocks[r, j])]
                (block[:, :, first:] if transposed else block[:, first:]).fill_(float("nan"))
    assert bool(cache.isnan().any())
    got = block_scores(q, paged, blocks.reshape(-1), num_keys, 0.3, key_counts=counts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        block_values(probs, paged, blocks.reshape(-1), g, key_counts=counts), want_v, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("spread", [1.0, 40.0])  # 40: most weights underflow to 0, as in peaked heads
def test_values_kernel_takes_the_softmax_as_torch_does(spread: float, kernel_build: str) -> None:
    """The kernel's softmax (vectorised exp in place before p.V, the division after) equals torch's, masked
    keys and rows of different lengths included; its p.V equals the torch path's on torch's softmax."""
    from sevi.method.alignment import MASKED

    bs, g, rep, hd, num_keys = 128, 2, 3, 32, 300
    cache, k_t, v_t = random_cpu_cache(12, g, bs, hd, seed=5)
    paged = paged_cpu_kv(cache, k_t, v_t)
    counts = torch.tensor([300, 131, 17, 1])
    blocks = torch.arange(12).view(4, 3)
    gen = torch.Generator().manual_seed(int(spread))
    scores = torch.randn(4, g * rep, num_keys, generator=gen) * spread
    mask = (torch.arange(num_keys)[None, :] >= counts[:, None]) | (torch.rand(4, num_keys, generator=gen) < 0.1)
    mask[:, 0] = False
    scores = scores.masked_fill(mask[:, None], MASKED)
    want_p = torch.softmax(scores, -1)
    want = block_values(want_p, paged, blocks.reshape(-1), g, use_kernel=False)
    inplace = scores.clone()
    got = block_values(inplace, paged, blocks.reshape(-1), g, key_counts=counts, softmax=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The scores become exp(score - row max) over each row's own keys (the output is divided by their
    # sum): normalised, torch's softmax; masked keys exactly 0.
    own = torch.arange(num_keys)[None, None, :] < counts[:, None, None]
    exps = inplace.masked_fill(~own, 0.0)
    torch.testing.assert_close(exps / exps.sum(-1, keepdim=True), want_p.masked_fill(~own, 0.0), rtol=2e-6, atol=1e-12)
    assert bool((inplace.masked_select(mask[:, None] & own) == 0).all())
