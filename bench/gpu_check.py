"""`make gpu-check`: the Triton SEVI kernels on one NVIDIA GPU, against the torch operator, timed. One JSON report.

Kernel tier (this script; needs torch with CUDA and triton, NOT vLLM, no network, no install step: run from the
repository root with its modules on the path): at LLaVA-1.5-7B (32 heads x 128) and Qwen2-VL-7B (28 query / 4
KV heads x 128) shapes, bf16 and fp16 paged caches in FlashAttention's layout (blocks of 16 keys, shuffled),
batch 1 / 8 / 32, 600 and 2,000 keys with 576 image tokens:
- correctness: the kernel's output against gather + the torch operator (models.alignment) + softmax + p.V, and
  the head groups / stage masks;
- time per call (CUDA events, median) of the aligned path, the same kernels' unaligned path (no cross-head
  kernel), and torch's SDPA on contiguous K/V of the cache's dtype;
- the K/V bandwidth each reaches, as a share of the measured device copy bandwidth.
Targets (issue 14): aligned <= 1.5x unaligned at batch 32; >= half of the copy bandwidth at 2,000 keys.

Engine tier (bench/gpu_engine_tier.py), where vLLM is installed: a random LLaVA of LLaVA-1.5-7B's width, the
vLLM engine against the reference engine (greedy, mixed batch) and against stock vLLM's server, aligned and
unaligned throughput at concurrency 1, 8 and 32. Run in a subprocess after the kernel tier, so a failure there
still leaves the kernel tier's report; without vLLM the report says the tier was skipped and why.

Without a CUDA device it refuses at once (exit 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHAPES = {"llava-1.5-7b": (32, 32, 128, False), "qwen2-vl-7b": (28, 4, 128, True)}  # heads, kv heads, head, Qwen
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BLOCK = 16  # FlashAttention's default block size in vLLM
IMAGE = (5, 580)  # 576 image tokens after a short system prompt


def refuse_without_gpu() -> None:
    if not torch.cuda.is_available():
        print(
            "gpu-check needs an NVIDIA GPU (torch.cuda.is_available() is False here): nothing was run.", file=sys.stderr
        )
        raise SystemExit(2)


def _time(fn: Any, reps: int) -> float:
    """Median microseconds per call, by CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Device copy bandwidth, bytes/s (read + write of a 1 GiB buffer)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    us = _time(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 4 / (us * 1e-6)


def case(name: str, dtype_name: str, batch: int, keys: int, copy_bw: float) -> dict[str, Any]:
    from models.alignment import align_prepared, prepare_rows, span_masks
    from models.kernels.sevi_decode import aligned_decode

    heads, kv_heads, d, image_only = SHAPES[name]
    dtype, dev = DTYPES[dtype_name], torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(keys + batch)
    nb = -(-keys // BLOCK)
    n_blocks = batch * nb + 7
    cache = torch.randn(n_blocks, kv_heads, BLOCK, 2 * d, device=dev, generator=gen).to(dtype)
    key, value = cache[..., :d], cache[..., d:]
    table = torch.randperm(n_blocks, device=dev, generator=gen)[: batch * nb].view(batch, nb)
    counts = torch.randint(keys - 40, keys + 1, (batch,), device=dev, generator=gen)
    counts[0] = keys
    q = torch.randn(batch, heads, d, device=dev, generator=gen) * torch.linspace(0.3, 3.0, heads, device=dev)[:, None]
    pos = counts - 1
    j = torch.arange(keys, device=dev)
    image = ((j >= IMAGE[0]) & (j <= IMAGE[1]))[None].expand(batch, keys)
    semantic, other = span_masks(
        j, pos, torch.full((batch,), IMAGE[1], device=dev), image, torch.full((batch,), image_only, device=dev)
    )
    rows = prepare_rows(
        j[None] <= pos[:, None],
        semantic,
        other,
        torch.full((batch,), 0.5, device=dev),
        torch.full((batch,), 0.2, device=dev),
    )
    scale = d**-0.5
    blocks = table.reshape(-1).contiguous()

    out, groups, _ = aligned_decode(q, key, value, False, False, blocks, counts, rows, scale, kv_heads)
    # Reference: the same keys gathered, float32, the torch operator, softmax, p.V.
    k = key[table].permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, -1, d)[:, :, :keys].float()
    v = value[table].permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, -1, d)[:, :, :keys].float()
    rep = heads // kv_heads
    s = torch.einsum("bgrd,bgkd->bgrk", q.view(batch, kv_heads, rep, d), k).reshape(batch, heads, keys) * scale
    s = s * (j[None, None] < counts[:, None, None])
    aligned, want_groups = align_prepared(s.contiguous(), rows)
    want = torch.einsum("bgrk,bgkd->bgrd", torch.softmax(aligned, -1).view(batch, kv_heads, rep, keys), v).reshape(
        batch, heads, d
    )
    assert groups is not None
    mismatched = sum(
        int((getattr(groups, f) != getattr(want_groups, f)).sum())
        for f in ("semantic", "core", "global_", "stage1", "stage2")
    )
    err = float((out - want).abs().max())

    reps = 20
    buf = torch.empty(batch, heads, d, device=dev)
    t_aligned = _time(
        lambda: aligned_decode(q, key, value, False, False, blocks, counts, rows, scale, kv_heads, buf), reps
    )
    t_plain = _time(
        lambda: aligned_decode(q, key, value, False, False, blocks, counts, rows, scale, kv_heads, buf, align=False),
        reps,
    )
    kc, vc = k.to(dtype).contiguous(), v.to(dtype).contiguous()
    qs = q.to(dtype)[:, :, None]
    t_sdpa = _time(
        lambda: torch.nn.functional.scaled_dot_product_attention(qs, kc, vc, scale=scale, enable_gqa=rep > 1), reps
    )
    kv_bytes = 2 * int(counts.sum()) * kv_heads * d * cache.element_size()

    def share(us: float) -> float:
        return round(kv_bytes / (us * 1e-6) / copy_bw, 3)

    return {
        "model": name,
        "dtype": dtype_name,
        "batch": batch,
        "keys": keys,
        "max_abs_err": err,
        "group_mismatches": mismatched,
        "pass": err < 2e-3 and mismatched == 0,
        "us_aligned": round(t_aligned, 1),
        "us_unaligned": round(t_plain, 1),
        "us_sdpa": round(t_sdpa, 1),
        "aligned_over_unaligned": round(t_aligned / t_plain, 3),
        "bandwidth_share": {"aligned": share(t_aligned), "unaligned": share(t_plain), "sdpa": share(t_sdpa)},
    }


def engine_tier(skip: bool) -> dict[str, Any] | str:
    """bench.gpu_engine_tier's report, or why it did not run."""
    if skip:
        return "skipped (--kernel-only)"
    if importlib.util.find_spec("vllm") is None:
        return "skipped: vLLM is not installed here (it needs a GPU server with vLLM; the kernel tier ran)"
    out = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "engine-tier.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_engine_tier", "--out", str(out)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not out.exists():
        return f"failed (exit {done.returncode}): {done.stderr[-2000:]}"
    found: dict[str, Any] = json.loads(out.read_text())
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON report here (e.g. bench/results/gpu-check.json)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--keys", default="600,2000")
    parser.add_argument("--kernel-only", action="store_true", help="skip the engine tier even where vLLM imports")
    args = parser.parse_args(argv)
    refuse_without_gpu()
    import triton

    started = time.time()
    copy_bw = copy_bandwidth()
    results = [
        case(name, dt, b, k, copy_bw)
        for name in SHAPES
        for dt in DTYPES
        for b in map(int, args.batches.split(","))
        for k in map(int, args.keys.split(","))
    ]
    at32 = [r["aligned_over_unaligned"] for r in results if r["batch"] == 32]
    at2k = [r["bandwidth_share"]["aligned"] for r in results if r["keys"] == 2000]
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "copy_bandwidth_GBps": round(copy_bw / 1e9, 1),
        "kernel_tier": {
            "all_pass": all(r["pass"] for r in results),
            "cases": results,
            "targets": {
                "aligned_over_unaligned_at_batch_32_max": max(at32) if at32 else None,
                "target_ratio": 1.5,
                "aligned_bandwidth_share_at_2000_keys_min": min(at2k) if at2k else None,
                "target_share": 0.5,
            },
        },
        "engine_tier": engine_tier(args.kernel_only),
        "seconds": round(time.time() - started, 1),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report["kernel_tier"]["all_pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
