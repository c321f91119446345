"""What reading vLLM's AMX bfloat16 cache costs the aligned rows, against its AVX-512/AVX2 ("vec") layout.

    python -m bench.paged_layouts [--rows 1,8] [--keys 650] [--heads 16] [--kv-heads 16] [--head-dim 32] [--repeats 200]

One aligned layer's K/V work (q.K, then softmax and p.V) on bfloat16 caches, side by side in one run:
- vec / C kernel: vLLM's layout on CPUs without AMX (K [D, block], V [block, D]), read in place;
- amx / C kernel: vLLM's AMX tile layout, read in place (paged_kv.c BF16_AMX);
- amx / gather: the same cache read by the torch path (what every AMX machine ran before the AMX reader).
Prints microseconds per layer and each path's ratio to vec / C kernel. The layouts are written by a torch
re-layout of vLLM's writers (sevi.kernels.paged_kv.amx_order), so this runs on any x86 machine; the figure
that matters on an AMX Xeon is the same ratio there (the AMX tile unit itself is not used by this reader).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Mapping

import torch

from sevi.engines.vllm.plugin.paged_read import PagedKV, block_scores, block_values, c_kernel_for
from sevi.kernels.paged_kv import amx_order


def caches(n_blocks: int, g: int, bs: int, d: int, seed: int = 0) -> dict[str, PagedKV]:
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n_blocks, g, bs, d, generator=gen).bfloat16()  # [N, G, slot, D]
    v = torch.randn(n_blocks, g, bs, d, generator=gen).bfloat16()
    k_order, v_order = amx_order(bs, d)
    k_amx = torch.empty(n_blocks, g, bs * d, dtype=torch.bfloat16)
    v_amx = torch.empty_like(k_amx)
    k_amx[..., k_order] = k.reshape(n_blocks, g, -1)  # (slot, d) row-major -> its place in the tile layout
    v_amx[..., v_order] = v.reshape(n_blocks, g, -1)
    vec = PagedKV(k.transpose(-1, -2).contiguous(), v, True, False)
    amx = PagedKV(k_amx, v_amx, False, False, k_order, v_order, d, amx=True)
    gathered = PagedKV(k_amx, v_amx, False, False, k_order, v_order, d, amx=False)
    return {"vec / C kernel": vec, "amx / C kernel": amx, "amx / gather (before)": gathered}


def aligned_layer(
    q: torch.Tensor, cache: PagedKV, blocks: torch.Tensor, keys: int, scores: torch.Tensor, out: torch.Tensor
) -> None:
    """One aligned layer's reads of K and V: q.K, then softmax and p.V (the operator itself is not timed)."""
    block_scores(q, cache, blocks, keys, 0.125)
    block_values(scores.clone(), cache, blocks, q.shape[1], out, softmax=True)


def timed(fns: Mapping[str, Callable[[], object]], repeats: int, rounds: int = 5) -> dict[str, float]:
    """Microseconds per call of each function: the best of `rounds` rounds, the functions taking turns within
    each round (so a busy moment of the machine falls on all of them, not on one)."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / repeats * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8")
    p.add_argument("--keys", type=int, default=650, help="keys per row (576 image tokens + a prompt)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g, rep, d, bs = args.kv_heads, args.heads // args.kv_heads, args.head_dim, args.block_size
    nb = -(-args.keys // bs)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, AMX tiles {torch.cpu._is_amx_tile_supported()}")
    print(f"{args.heads} heads ({g} KV) x {d}, {args.keys} keys, block {bs}, bfloat16 cache, {args.threads} thread(s)")
    for rows in (int(r) for r in args.rows.split(",")):
        layouts = caches(rows * nb, g, bs, d)
        assert c_kernel_for(layouts["amx / C kernel"]) is not None, "the C kernel did not build here"
        blocks = torch.arange(rows * nb)
        q = torch.randn(rows, g, rep, d)
        scores = torch.randn(rows, g * rep, args.keys)
        out = torch.empty(rows, args.heads, d)
        fns = {
            name: functools.partial(aligned_layer, q, cache, blocks, args.keys, scores, out)
            for name, cache in layouts.items()
        }
        gather = fns.pop("amx / gather (before)")
        results = timed(fns, args.repeats)
        results["amx / gather (before)"] = timed({"gather": gather}, max(1, args.repeats // 20), rounds=2)["gather"]
        base = results["vec / C kernel"]
        for name, us in results.items():
            print(f"rows {rows:2d}  {name:24s} {us:9.1f} us/layer  {us / base:5.2f}x of vec / C kernel")


if __name__ == "__main__":
    main()
