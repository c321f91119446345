"""The C kernel reads vLLM's AMX bfloat16 cache layout in place (sevi/kernels/paged_kv.c, `BF16_AMX`).

Two writers of that layout, so the reader is tested on every x86 machine: a torch transcription of vLLM's own
writer (`AttentionImpl<ISA::AMX>::reshape_and_cache` in vLLM's csrc/cpu/cpu_attn_amx.hpp) here, and vLLM's
writer itself where this vLLM build has it (tests/sevi/engines/vllm/plugin/test_cpu_backend.py). The torch path's
gathered reading (the orders, in float32) is the yardstick, at the kernel tests' tolerance.
"""

from __future__ import annotations

import pytest
import torch

from sevi.engines.vllm.plugin.paged_read import PagedKV, block_scores, block_values, c_kernel_for
from sevi.kernels.paged_kv import amx_order
from tests.support.vllm_plugin import use_kernel


@pytest.fixture(params=["native", "avx2"])
def kernel_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    use_kernel(str(request.param), monkeypatch)
    return str(request.param)


def amx_write(k: torch.Tensor, v: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block regions `[N, G, 2, block_size * D]` holding k, v (`[N * block_size, G, D]`, slot order) as vLLM's AMX
    writer lays them out, transcribed from its loops rather than from amx_order: for K, 32-bit words (pairs of
    dims) in groups of 16 tokens, `key_cache[group * 16 * D/2 + j * 16 + offset] = key_words[j]`; for V, pairs
    of tokens packed per dim in groups of 16 dims, `value_cache[i * bs * 16 + (n / 2) * 32 + j * 2 + n % 2] =
    value[i * 16 + j]`. Unwritten places are NaN: a reader that touches them shows it."""
    slots, g, d = k.shape
    n_blocks = slots // block_size
    out = torch.full((n_blocks, g, 2, block_size * d), float("nan"), dtype=torch.bfloat16)
    words = out[:, :, 0].view(torch.int32)  # [N, G, bs * D / 2]
    key_words = k.contiguous().view(torch.int32)  # [slots, G, D / 2]
    for slot in range(slots):
        block, offset = divmod(slot, block_size)
        group, in_group = divmod(offset, 16)
        for j in range(d // 2):
            words[block, :, group * 16 * (d // 2) + j * 16 + in_group] = key_words[slot, :, j]
    values = out[:, :, 1]
    for slot in range(slots):
        block, offset = divmod(slot, block_size)
        sub, sub_offset = divmod(offset, 2)
        for i in range(d // 16):
            for j in range(16):
                values[block, :, i * block_size * 16 + sub * 32 + j * 2 + sub_offset] = v[slot, :, i * 16 + j]
    return out


def test_amx_order_is_the_writers_layout() -> None:
    """amx_order (what the kernel assumes, and what the backend compares vLLM's probed order with) says where
    the transcribed writer puts each (slot, dim)."""
    bs, d = 32, 48
    bits = torch.arange(bs * d, dtype=torch.int16)  # every (slot, dim) a distinct bit pattern
    k = bits.view(torch.bfloat16).view(bs, 1, d)
    region = amx_write(k, k, bs)[0, 0].view(torch.int16)
    k_order, v_order = amx_order(bs, d)
    assert torch.equal(region[0][k_order], bits)
    assert torch.equal(region[1][v_order], bits)
    assert not torch.equal(k_order, torch.arange(bs * d)) and not torch.equal(v_order, torch.arange(bs * d))


def _cache(n_blocks: int, g: int, bs: int, d: int, seed: int) -> PagedKV:
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n_blocks * bs, g, d, generator=gen).bfloat16()
    v = torch.randn(n_blocks * bs, g, d, generator=gen).bfloat16()
    regions = amx_write(k, v, bs)
    k_order, v_order = amx_order(bs, d)
    return PagedKV(regions[:, :, 0], regions[:, :, 1], False, False, k_order, v_order, d, amx=True)


def _gathered(cache: PagedKV) -> PagedKV:
    """The same cache read by the torch path (orders, gather + bmm): the yardstick."""
    return PagedKV(cache.key, cache.value, False, False, cache.key_order, cache.value_order, cache.head_size, amx=False)


# (block size, head size, query heads per KV head, keys): vLLM's CPU block of 128 and the AMX minimum of 32;
# LLaVA's 128 dims, 64, and 80 (a head size with an odd number of 16-dim groups); GQA 1..8 heads per KV head
# (the kernel takes 8, 4, 2 at once as registers allow, 3 = 2 + 1); key counts ending mid-group, on an odd key
# (the last key pair half read), and on a block boundary.
@pytest.mark.parametrize(
    ("bs", "d", "rep", "num_keys"),
    [(128, 128, 1, 300), (128, 128, 4, 257), (32, 64, 2, 75), (32, 80, 3, 64), (64, 32, 8, 131), (128, 64, 1, 128)],
)
def test_kernel_reads_the_amx_layout_as_the_torch_path_does(
    bs: int, d: int, rep: int, num_keys: int, kernel_build: str
) -> None:
    g, rows, n_blocks = 2, 3, 6
    cache = _cache(n_blocks, g, bs, d, seed=bs + d + rep)
    assert c_kernel_for(cache) is not None and c_kernel_for(_gathered(cache)) is None
    gen = torch.Generator().manual_seed(num_keys)
    nb = -(-num_keys // bs)
    blocks = torch.stack([torch.randperm(n_blocks, generator=gen)[:nb] for _ in range(rows)]).reshape(-1)
    q = torch.randn(rows, g, rep, d, generator=gen)
    counts = torch.tensor([num_keys, max(1, num_keys - 17), max(1, num_keys // 2 + 1)])  # rows of other lengths

    got = block_scores(q, cache, blocks, num_keys, 0.125, key_counts=counts)
    want = block_scores(q, _gathered(cache), blocks, num_keys, 0.125)
    valid = torch.arange(num_keys) < counts[:, None, None]
    assert torch.isfinite(got).all()  # nothing read from the NaN places outside the written slots
    torch.testing.assert_close(got[valid.expand_as(got)], want[valid.expand_as(want)], rtol=1e-5, atol=1e-5)
    assert bool((got[~valid.expand_as(got)] == 0).all())

    probs = torch.softmax(torch.randn(rows, g * rep, num_keys, generator=gen), -1).masked_fill(~valid, 0)
    got_v = block_values(probs, cache, blocks, g, key_counts=counts)
    want_v = block_values(probs, _gathered(cache), blocks, g)
    assert torch.isfinite(got_v).all()
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-5)

    # The softmax taken by the kernel (the aligned rows' path: scores in, p.V of their softmax out).
    scores = torch.randn(rows, g * rep, num_keys, generator=gen) * 3
    masked = scores.masked_fill(~valid, -1e30)
    got_s = block_values(masked.clone(), cache, blocks, g, key_counts=counts, softmax=True)
    want_s = block_values(masked.clone(), _gathered(cache), blocks, g, softmax=True)
    torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5)
