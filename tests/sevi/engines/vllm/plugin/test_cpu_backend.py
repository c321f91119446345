"""The CPU backend's reading of vLLM's K/V cache layouts (sevi/engines/vllm/plugin/cpu_backend.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from sevi.engines.vllm.plugin.cpu_backend import cache_layout, read_cpu_kv  # noqa: E402
from sevi.engines.vllm.plugin.paged_read import block_scores, block_values, c_kernel_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_state")


def test_cache_layout_probe_reads_back_what_the_kernel_wrote() -> None:
    from vllm import _custom_ops as ops

    bs, hd, heads = 32, 32, 2
    k_t, v_t = cache_layout("vec", torch.float32, bs, hd)
    cache = torch.zeros(4, heads, bs, 2 * hd)
    kc, vc = cache.view(4, heads, 2 * bs, hd).chunk(2, dim=2)
    k, v = torch.randn(70, heads, hd), torch.randn(70, heads, hd)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(70, dtype=torch.long) + 32, "vec")
    kr, vr = read_cpu_kv(cache, torch.tensor([[1, 2, 3]]), k_t, v_t)  # the blocks holding slots 32..101
    assert torch.equal(kr[0, :, :70].transpose(0, 1), k) and torch.equal(vr[0, :, :70].transpose(0, 1), v)


@pytest.mark.parametrize("hd", [32, 128])
def test_amx_bfloat16_cache_layout_is_learned_and_read(hd: int, kv_path: str) -> None:
    """vLLM's AMX kernel (bfloat16 on CPUs with AMX) keeps K in tiles of 16 keys x pairs of dims and V in
    pairs of keys: no strided view. The backend learns the layout as a permutation of each block (from
    the same writer the AMX kernel uses, which runs on x86 builds with AVX-512), finds it is the AMX layout
    the C kernel reads in place, and reads K/V there (or by gathering, on the torch path)."""
    from vllm import _custom_ops as ops

    from sevi.engines.vllm.plugin.cpu_backend import cache_order, cpu_kv

    bs, g, rep, n_blocks, num_keys = 128, 2, 2, 6, 300
    try:
        layout = cache_layout("amx", torch.bfloat16, bs, hd)
    except RuntimeError as err:  # vLLM's AVX2-only build (AVX2 machines) has no AMX cache writer
        pytest.skip(f"this vLLM build has no AMX cache writer: {err}")
    assert layout is None
    gen = torch.Generator().manual_seed(hd)
    cache = torch.zeros(n_blocks, g, bs, 2 * hd, dtype=torch.bfloat16)
    kc, vc = cache.view(n_blocks, g, 2 * bs, hd).chunk(2, dim=2)
    k = torch.randn(n_blocks * bs, g, hd, generator=gen).bfloat16()
    v = torch.randn(n_blocks * bs, g, hd, generator=gen).bfloat16()
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(n_blocks * bs, dtype=torch.long), "amx")
    paged = cpu_kv(cache, "amx", hd)
    assert paged.key_order is not None and paged.block_size == bs and paged.amx
    assert (c_kernel_for(paged) is not None) == kv_path.startswith("kernel")
    k_order, _ = cache_order("amx", torch.bfloat16, bs, hd)
    assert not torch.equal(k_order, torch.arange(bs * hd))  # not the row-major layout under another name
    blocks = torch.tensor([[4, 0, 2], [1, 5, 3]])
    slots = (blocks[:, :, None] * bs + torch.arange(bs)).reshape(2, -1)[:, :num_keys]  # [R, K] cache slots
    keys, vals = k[slots].float().transpose(1, 2), v[slots].float().transpose(1, 2)  # [R, G, K, D]
    q = torch.randn(2, g, rep, hd, generator=gen)
    want = torch.matmul(q, keys.transpose(-1, -2)).mul(0.2).reshape(2, g * rep, num_keys)
    torch.testing.assert_close(block_scores(q, paged, blocks.reshape(-1), num_keys, 0.2), want, rtol=1e-5, atol=1e-5)
    probs = torch.softmax(torch.randn(2, g * rep, num_keys, generator=gen), -1)
    torch.testing.assert_close(
        block_values(probs, paged, blocks.reshape(-1), g),
        torch.matmul(probs.view(2, g, rep, num_keys), vals),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("choice", ["c", "torch"])
@pytest.mark.parametrize("isa", ["vec", "amx"])
def test_describe_cache_names_the_layout_and_how_aligned_rows_read_it(
    isa: str, choice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What /ready reports: on AMX machines vLLM picks "amx" for bfloat16 (simulated here by naming it), whose
    tiles the C kernel reads in place; elsewhere "vec" (K [D, block]), read in place too."""
    import vllm.v1.attention.backends.cpu_attn as cpu_attn

    from sevi.engines.vllm.plugin.cpu_backend import describe_cache
    from sevi.kernels import choice as kernel_choice
    from sevi.kernels.paged_kv import kernel

    monkeypatch.setattr(cpu_attn, "_get_attn_isa", lambda *args, **kwargs: isa)
    monkeypatch.setattr(kernel_choice, "aligned_kernel", lambda: choice)  # SEVI_ALIGNED_KERNEL
    try:
        details = describe_cache(torch.bfloat16, 128, 64)
    except RuntimeError as err:  # vLLM's AVX2-only build has no AMX cache writer
        pytest.skip(f"this vLLM build has no {isa} cache writer: {err}")
    assert details["kv_cache_isa"] == isa
    assert details["kv_cache_layout"].startswith("AMX tiles" if isa == "amx" else "K [D, block]")
    in_place = "in place (C kernel)" if choice == "c" and kernel() is not None else "gather (torch)"
    assert details["aligned_read"] == in_place
