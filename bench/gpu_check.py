"""`make gpu-check`: the Triton SEVI kernels on one NVIDIA GPU, held to float32 torch, timed, probed. One JSON report.

Needs torch with CUDA and triton, NOT vLLM, no network, no install step (run from the repository root with its
modules on the path). Sections (each in the report, each able to fail the check):
- `correctness`: LLaVA-1.5-7B (32 heads x 128) and Qwen2-VL-7B (28 query / 4 KV heads x 128), bf16 and fp16
  paged caches in vLLM's default physical layout (NHD: block, token, head; stride order 0, 2, 1, 3) and in HND,
  1k and 4k keys with 576 image tokens, rows of different lengths over shuffled blocks. Queries are built so
  that every head group occurs in every row (a third of the heads look at the image, a third spread over the
  text after it, a third peak on one text key), so both stages move heads: their counts are reported and a
  count of 0 fails the check (an "equal" where nothing moved proves nothing). Each kernel (A scores, B the
  operator in place, C softmax + p.V) and the whole aligned decode are held to float32 torch (gather, the
  torch operator of sevi.method.alignment, softmax, p.V), and the head groups / stage masks to the operator's.
- `timing`: aligned decode, the same kernels unaligned (no B), each kernel alone, and torch SDPA on contiguous
  K / V, at batch 1 / 8 / 32 and 1k / 4k keys (NHD, bf16): GPU time per call from a CUDA-graph replay and host
  time per call (eager launches, before the device catches up).
- `sync_probe`: a steady decode step (the masks a key wider, the key counts one more, the aligned decode) under
  `torch.cuda.set_sync_debug_mode("error")`: any host-device sync raises. The step plan's own host side is held
  to no read-back by tests/sevi/engines/vllm/plugin/test_plan.py (it needs vLLM's logits processor to fill it).
- `variants`: compiled variants of each kernel over a growing key count after a warm-up (0 new: no compile
  inside an engine step).
- `offsets`: the kernels' score offsets past 2**31, and a row whose blocks lie past 2**31 cache elements.
- `torchvision`: `import torchvision` in a fresh interpreter after the project's modules.
- `engine_tier` (bench/gpu_engine_tier.py, only where vLLM is installed; in a subprocess).

`--interpret` runs the same sections on a CPU through Triton's interpreter at small sizes (keys 96 / 160, 38
image tokens, batch 1 / 2; timings are the interpreter's and mean nothing for a GPU; no CUDA graph, no sync
mode: the sync probe runs the step's torch side on the `meta` device, where any read-back raises; variants are
counted by Triton's own binder for sm_90a): tests/bench/test_gpu_check.py runs it. Without a CUDA device and
without `--interpret` it refuses at once (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"llava-1.5-7b": (32, 32, 128, False), "qwen2-vl-7b": (28, 4, 128, True)}  # heads, kv heads, head, Qwen
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = ("NHD", "HND")
GROUPS = ("semantic", "core", "global_", "stage1", "stage2")
BLOCK = 16  # FlashAttention's default block size in vLLM
OMEGA, KAPPA = 1.0, 0.2


@dataclass(frozen=True)
class Sizes:
    keys: tuple[int, ...]
    image: tuple[int, int]  # first and last image token
    batches: tuple[int, ...]  # timing
    check_batch: int  # correctness
    reps: int
    variant_keys: tuple[int, ...]


GPU_SIZES = Sizes((1024, 4096), (5, 580), (1, 8, 32), 4, 50, tuple(range(1000, 1040)) + (1, 17, 4097, 8191))
CPU_SIZES = Sizes((96, 160), (3, 40), (1, 2), 2, 1, (1, 2, 15, 16, 17, 33, 100, 577, 4097))


def refuse_without_gpu() -> None:
    if not torch.cuda.is_available():
        print(
            "gpu-check needs an NVIDIA GPU (torch.cuda.is_available() is False here): nothing was run "
            "(--interpret runs its sections on a CPU through Triton's interpreter).",
            file=sys.stderr,
        )
        raise SystemExit(2)


@dataclass
class Case:
    """One batch of aligned rows over a paged cache, with its float32 reference."""

    q: torch.Tensor  # [R, H, D] float32 (representable in the cache dtype, as vLLM's query is)
    key: torch.Tensor  # per-block views [N, G, bs, D]
    value: torch.Tensor
    blocks: torch.Tensor  # long [R * nb]
    counts: torch.Tensor  # long [R]
    rows: Any  # PreparedRows
    scale: float
    kv_heads: int
    k: torch.Tensor  # float32 [R, G, K, D] gathered (the reference's keys / values)
    v: torch.Tensor


def _cache(n_blocks: int, g: int, d: int, dtype: torch.dtype, layout: str, dev: torch.device, gen: Any) -> torch.Tensor:
    """A FlashAttention cache `[N, G, bs, 2D]` (logical), stored NHD (`[N, bs, G, 2D]` transposed) or HND."""
    if layout == "NHD":
        return torch.randn(n_blocks, BLOCK, g, 2 * d, device=dev, generator=gen).to(dtype).transpose(1, 2)
    return torch.randn(n_blocks, g, BLOCK, 2 * d, device=dev, generator=gen).to(dtype)


def make_case(
    shape: str, dtype: torch.dtype, layout: str, keys: int, batch: int, sizes: Sizes, dev: torch.device
) -> Case:
    from sevi.method.alignment import prepare_rows, span_masks

    heads, g, d, image_only = SHAPES[shape]
    rep = heads // g
    gen = torch.Generator(device=dev).manual_seed(keys * 7 + batch + len(shape))
    nb = -(-keys // BLOCK)
    n_blocks = batch * nb + 7
    cache = _cache(n_blocks, g, d, dtype, layout, dev, gen)
    key, value = cache[..., :d], cache[..., d:]
    table = torch.randperm(n_blocks, device=dev, generator=gen)[: batch * nb].view(batch, nb)
    counts = keys - torch.randint(0, 40, (batch,), device=dev, generator=gen)
    counts[0] = keys
    k = key[table].permute(0, 2, 1, 3, 4).reshape(batch, g, -1, d)[:, :, :keys].float()
    v = value[table].permute(0, 2, 1, 3, 4).reshape(batch, g, -1, d)[:, :, :keys].float()
    pos = counts - 1
    j = torch.arange(keys, device=dev)
    first, last = sizes.image
    image = ((j >= first) & (j <= last))[None].expand(batch, keys)
    semantic, other = span_masks(
        j, pos, torch.full((batch,), last, device=dev), image, torch.full((batch,), image_only, device=dev)
    )
    valid = j[None] <= pos[:, None]
    # Head roles, a third each: look at the image (-> "other"), spread over the text after it (-> global),
    # peak on one text key (-> core). Image and text means are scaled by sqrt(n) so that a 4k-key row still
    # gives the image heads more image than text mass.
    q = torch.zeros(batch, heads, d, device=dev)
    for b in range(batch):
        img_keys, sem_keys = image[b] & valid[b], semantic[b] & valid[b]
        for h in range(heads):
            kk = k[b, h // rep]
            role = h % 3
            if role == 0:
                q[b, h] = 6.0 * kk[img_keys].sum(0) / img_keys.sum().sqrt()
            elif role == 1:
                q[b, h] = kk[sem_keys].sum(0) / sem_keys.sum().sqrt()
            else:
                q[b, h] = kk[int(pos[b]) - 2 - h % 5]
    q = q.to(dtype).float()
    rows = prepare_rows(
        valid,
        semantic,
        other,
        torch.full((batch,), OMEGA, device=dev),
        torch.full((batch,), KAPPA, device=dev),
        all_on=True,
    )
    return Case(q, key, value, table.reshape(-1).contiguous(), counts, rows, d**-0.5, g, k, v)


def reference(c: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """float32 torch: (scores over each row's keys, 0 past them; aligned scores; output; head groups)."""
    from sevi.method.alignment import align_prepared

    r, h, d = c.q.shape
    g, keys = c.kv_heads, c.k.shape[2]
    rep = h // g
    s = torch.einsum("bgrd,bgkd->bgrk", c.q.view(r, g, rep, d), c.k).reshape(r, h, keys) * c.scale
    s = s * (torch.arange(keys, device=s.device)[None, None] < c.counts[:, None, None])
    aligned, groups = align_prepared(s.contiguous(), c.rows)
    out = torch.einsum("bgrk,bgkd->bgrd", torch.softmax(aligned, -1).view(r, g, rep, keys), c.v).reshape(r, h, d)
    return s, aligned, out, groups


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def correctness_case(
    shape: str, dtype_name: str, layout: str, keys: int, sizes: Sizes, dev: torch.device
) -> dict[str, Any]:
    from sevi.kernels.sevi_decode import align_in_place, aligned_decode, paged_scores, paged_values

    c = make_case(shape, DTYPES[dtype_name], layout, keys, sizes.check_batch, sizes, dev)
    want_s, want_aligned, want, want_groups = reference(c)
    # A: the scores
    s = paged_scores(c.q, c.key, False, c.blocks, c.counts, keys, c.scale, c.kv_heads)
    err_a = _err(s, want_s)
    # B: the operator over the reference scores, in place
    b_in = want_s.clone()
    groups_b = align_in_place(b_in, c.counts, c.rows)
    valid = c.rows.key_bias[:, 0][:, None, :] == 0
    err_b = _err(torch.where(valid, b_in, 0.0), torch.where(valid, want_aligned, 0.0))
    # C: softmax + p.V of the reference's aligned scores
    out_c = paged_values(want_aligned.contiguous(), c.value, False, c.blocks, c.counts, c.kv_heads)
    err_c = _err(out_c, want)
    # The whole aligned decode
    out, groups, _ = aligned_decode(c.q, c.key, c.value, False, False, c.blocks, c.counts, c.rows, c.scale, c.kv_heads)
    err = _err(out, want)
    assert groups is not None
    mismatched = sum(
        int((getattr(groups, f) != getattr(want_groups, f)).sum())
        + int((getattr(groups_b, f) != getattr(want_groups, f)).sum())
        for f in GROUPS
    )
    counts = {
        "other_heads": int((~groups.semantic).sum()),
        "core_heads": int(groups.core.sum()),
        "global_heads": int(groups.global_.sum()),
        "stage1_moved": int(groups.stage1.sum()),  # type: ignore[union-attr]
        "stage2_moved": int(groups.stage2.sum()),  # type: ignore[union-attr]
    }
    plain, _, _ = aligned_decode(
        c.q, c.key, c.value, False, False, c.blocks, c.counts, c.rows, c.scale, c.kv_heads, align=False
    )
    moved_output = _err(plain, out)
    tol = 2e-3
    passed = (
        err_a < tol * max(1.0, float(want_s.abs().max()))
        and err_b < tol * max(1.0, float(want_s.abs().max()))
        and max(err_c, err) < tol
        and mismatched == 0
        and min(counts.values()) > 0
        and moved_output > 10 * tol
    )
    return {
        "model": shape,
        "dtype": dtype_name,
        "layout": layout,
        "keys": keys,
        "rows": sizes.check_batch,
        "heads_per_row": SHAPES[shape][0],
        "max_abs_err": {"A_scores": err_a, "B_aligned": err_b, "C_output": err_c, "decode": err},
        "group_mismatches": mismatched,
        "counts": counts,
        "aligned_vs_plain_max_diff": moved_output,
        "pass": passed,
    }


def _graph_us(fn: Callable[[], Any], reps: int) -> float:
    """GPU microseconds per call from a CUDA-graph replay of `fn` (captured after a warm-up on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / reps


def _host_us(fn: Callable[[], Any], reps: int, gpu: bool) -> float:
    """Host microseconds per call: eager calls timed before the device is waited for (on a CPU: wall time)."""
    fn()
    if gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - started
    if gpu:
        torch.cuda.synchronize()
    return elapsed * 1e6 / reps


def timing_case(shape: str, batch: int, keys: int, sizes: Sizes, dev: torch.device, gpu: bool) -> dict[str, Any]:
    from sevi.kernels.sevi_decode import align_in_place, aligned_decode, paged_scores, paged_values

    c = make_case(shape, torch.bfloat16, "NHD", keys, batch, sizes, dev)
    heads, g, d, _ = SHAPES[shape]
    buf = torch.empty(batch, heads, d, device=dev)
    scores = paged_scores(c.q, c.key, False, c.blocks, c.counts, keys, c.scale, g)
    aligned = scores.clone()
    align_in_place(aligned, c.counts, c.rows)
    kc, vc = c.k.to(torch.bfloat16).contiguous(), c.v.to(torch.bfloat16).contiguous()
    qs = c.q.to(torch.bfloat16)[:, :, None]
    calls: dict[str, Callable[[], Any]] = {
        "aligned": lambda: aligned_decode(
            c.q, c.key, c.value, False, False, c.blocks, c.counts, c.rows, c.scale, g, buf
        ),
        "unaligned": lambda: aligned_decode(
            c.q, c.key, c.value, False, False, c.blocks, c.counts, c.rows, c.scale, g, buf, align=False
        ),
        "A": lambda: paged_scores(c.q, c.key, False, c.blocks, c.counts, keys, c.scale, g),
        "B": lambda: align_in_place(scores, c.counts, c.rows),  # over its own output: same work every call
        "C": lambda: paged_values(aligned, c.value, False, c.blocks, c.counts, g, buf),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            qs, kc, vc, scale=c.scale, enable_gqa=g < heads
        ),
    }
    reps = sizes.reps
    gpu_us = {name: round(_graph_us(fn, reps), 1) for name, fn in calls.items()} if gpu else None
    host_us = {name: round(_host_us(fn, reps, gpu), 1) for name, fn in calls.items()}
    row: dict[str, Any] = {"model": shape, "batch": batch, "keys": keys, "gpu_us": gpu_us, "host_us": host_us}
    if gpu_us is not None:
        row["aligned_over_sdpa"] = round(gpu_us["aligned"] / gpu_us["sdpa"], 2)
        row["aligned_over_unaligned"] = round(gpu_us["aligned"] / gpu_us["unaligned"], 3)
    return row


def sync_probe(sizes: Sizes, dev: torch.device, gpu: bool) -> dict[str, Any]:
    """A steady decode step: the masks gain a key, the key counts one more, the aligned decode. On a GPU under
    set_sync_debug_mode("error"); on a CPU the step's torch side on the meta device (any read-back raises)."""
    from sevi.kernels.sevi_decode import aligned_decode
    from sevi.method.alignment import add_key_, widen

    keys = sizes.keys[0]
    c = make_case("qwen2-vl-7b", torch.bfloat16, "NHD", keys, sizes.check_batch, sizes, dev)
    rows = widen(c.rows, keys + BLOCK)  # room to grow, as a step plan has
    counts = c.counts.clone()
    steps = 5
    if not gpu:
        fields = {f.name: getattr(c.rows, f.name) for f in dataclasses.fields(c.rows)}
        meta_rows = type(c.rows)(**{n: x.to("meta") if torch.is_tensor(x) else x for n, x in fields.items()})
        meta_rows = widen(meta_rows, keys + BLOCK)
        meta_counts = counts.to("meta")
        try:
            for _ in range(steps):
                add_key_(meta_rows, meta_counts)
                meta_counts.add_(1)
        except Exception as exc:  # a read-back on meta
            return {"pass": False, "mode": "meta (torch side only)", "error": repr(exc)}
        return {"pass": True, "mode": "meta (torch side only; the kernels are not run on meta)", "steps": steps}
    aligned_decode(c.q, c.key, c.value, False, False, c.blocks, counts, rows, c.scale, c.kv_heads)  # compiled
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(steps):
            add_key_(rows, counts)
            counts.add_(1)
            aligned_decode(c.q, c.key, c.value, False, False, c.blocks, counts, rows, c.scale, c.kv_heads)
    except RuntimeError as exc:
        return {"pass": False, "mode": "cuda sync debug error", "error": str(exc)[:500]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"pass": True, "mode": "cuda sync debug error", "steps": steps}


def variant_count(sizes: Sizes, dev: torch.device, gpu: bool) -> dict[str, Any]:
    """Compiled variants over a growing key count, after the engine-load warm-up."""
    if not gpu:  # the interpreter compiles nothing: Triton's own binder for sm_90a says what a GPU would compile
        env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, "-m", "bench.kernel_compile", "--variants", ",".join(map(str, sizes.variant_keys))],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            return {"pass": False, "error": done.stderr[-1000:]}
        found = json.loads(done.stdout)
        return {
            "mode": "sm_90a specialisation keys",
            "keys": list(sizes.variant_keys),
            "variants": found,
            "pass": all(n == 1 for n in found.values()),
        }
    from sevi.kernels import sevi_decode

    kernels = {"A": sevi_decode._scores_kernel, "B": sevi_decode._align_kernel, "C": sevi_decode._values_kernel}
    heads, g, d, _ = SHAPES["qwen2-vl-7b"]
    sevi_decode.warm_up(heads, g, d, torch.bfloat16, BLOCK, dev)
    device = torch.cuda.current_device()

    def compiled() -> dict[str, int]:
        # Triton 3.x: device_caches[device] = (compiled kernels by key, key cache, target, backend, binder)
        found = {n: k.device_caches[device] for n, k in kernels.items()}
        return {n: len(c[0] if isinstance(c, tuple) else c) for n, c in found.items()}

    from sevi.method.alignment import prepare_rows

    before = compiled()
    for keys in sizes.variant_keys:  # one row of `keys` keys, masks as wide (values do not matter here)
        nb = -(-keys // BLOCK)
        cache = torch.randn(nb, g, BLOCK, 2 * d, device=dev).to(torch.bfloat16)
        valid = torch.ones(1, keys, dtype=torch.bool, device=dev)
        rows = prepare_rows(valid, valid, valid, torch.ones(1, device=dev), torch.full((1,), KAPPA, device=dev))
        q = torch.randn(1, heads, d, device=dev)
        count = torch.full((1,), keys, device=dev)
        blocks = torch.arange(nb, device=dev)
        sevi_decode.aligned_decode(q, cache[..., :d], cache[..., d:], False, False, blocks, count, rows, d**-0.5, g)
    torch.cuda.synchronize()
    after = compiled()
    new = {n: after[n] - before[n] for n in kernels}
    return {
        "mode": "JIT cache",
        "keys": list(sizes.variant_keys),
        "new_after_warm_up": new,
        "pass": all(n == 0 for n in new.values()),
    }


def offsets(dev: torch.device, gpu: bool) -> dict[str, Any]:
    """The kernels' score offsets past 2**31 (int64), and on a GPU a row whose blocks lie past 2**31 elements."""
    from sevi.kernels.sevi_decode import aligned_decode, score_offsets

    probes = [(2047, 32, 32768), (70000, 28, 40000)]
    got = [score_offsets(r, h, k) for r, h, k in probes]
    want = [(r * h * k, (r * h + h - 1) * k) for r, h, k in probes]
    result: dict[str, Any] = {"score_offsets_ok": got == want}
    if gpu:
        from sevi.method.alignment import prepare_rows

        heads, g, d, _ = SHAPES["qwen2-vl-7b"]
        per_block = g * BLOCK * 2 * d
        n_blocks = (1 << 31) // per_block + 4
        cache = torch.empty(n_blocks, g, BLOCK, 2 * d, dtype=torch.bfloat16, device=dev)
        gen = torch.Generator(device=dev).manual_seed(1)
        table = torch.arange(n_blocks - 3, n_blocks, device=dev)
        cache[table] = torch.randn(3, g, BLOCK, 2 * d, device=dev, generator=gen).to(torch.bfloat16)
        keys = 3 * BLOCK
        q = torch.randn(1, heads, d, device=dev, generator=gen).to(torch.bfloat16).float()
        valid = torch.ones(1, keys, dtype=torch.bool, device=dev)
        rows = prepare_rows(valid, valid, ~valid, torch.zeros(1, device=dev), torch.full((1,), KAPPA, device=dev))
        count = torch.full((1,), keys, device=dev)
        out, _, _ = aligned_decode(q, cache[..., :d], cache[..., d:], False, False, table, count, rows, d**-0.5, g)
        k = cache[table, :, :, :d].permute(1, 0, 2, 3).reshape(g, keys, d).float()
        v = cache[table, :, :, d:].permute(1, 0, 2, 3).reshape(g, keys, d).float()
        s = torch.einsum("grd,gkd->grk", q.view(g, heads // g, d), k) * d**-0.5
        want_out = torch.einsum("grk,gkd->grd", torch.softmax(s, -1), v).reshape(1, heads, d)
        result["cache_past_2_31_err"] = _err(out, want_out)
        result["cache_elements"] = cache.numel()
        del cache
        torch.cuda.empty_cache()
    result["pass"] = result["score_offsets_ok"] and result.get("cache_past_2_31_err", 0.0) < 2e-3
    return result


def torchvision_after_project() -> dict[str, Any]:
    """`import torchvision` in a fresh interpreter after the project's modules (the shim must not break it)."""
    if importlib.util.find_spec("torchvision") is None:
        return {"pass": True, "skipped": "torchvision is not installed"}
    code = (
        "import sevi, sevi.kernels, sevi.method.alignment\n"
        "from sevi.runtime.torchvision_compat import shim_defined_schemas\n"
        "import torchvision\nfrom torchvision.transforms import functional\n"
        "print(torchvision.__version__, shim_defined_schemas())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return {"pass": done.returncode == 0, "output": (done.stdout or done.stderr).strip()[-500:]}


def engine_tier(skip: bool) -> dict[str, Any] | str:
    """bench.gpu_engine_tier's report, or why it did not run."""
    if skip:
        return "skipped (--kernel-only or --interpret)"
    if importlib.util.find_spec("vllm") is None:
        return "skipped: vLLM is not installed here (it needs a GPU server with vLLM; the kernel tier ran)"
    out = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "engine-tier.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_engine_tier", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not out.exists():
        return f"failed (exit {done.returncode}): {done.stderr[-2000:]}"
    found: dict[str, Any] = json.loads(out.read_text())
    return found


@contextlib.contextmanager
def _section(report: dict[str, Any], name: str) -> Iterator[None]:
    """Time a section; an exception fails it (and the check) but the other sections still run."""
    started = time.time()
    try:
        yield
    except Exception as exc:
        report[name] = {"pass": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    report.setdefault("section_seconds", {})[name] = round(time.time() - started, 1)


def run(interpret: bool, kernel_only: bool) -> dict[str, Any]:
    import triton

    gpu = not interpret
    sizes = CPU_SIZES if interpret else GPU_SIZES
    dev = torch.device("cuda" if gpu else "cpu")
    started = time.time()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if gpu else f"CPU, Triton interpreter ({platform.processor()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "sizes": sizes.__dict__,
    }
    with _section(report, "correctness"):
        if interpret:  # every dtype and layout on the GQA shape; LLaVA's 32 KV heads on two (interpreter cost)
            matrix = [("qwen2-vl-7b", dt, lay, k) for dt in DTYPES for lay in LAYOUTS for k in sizes.keys]
            matrix += [("llava-1.5-7b", "bf16", "NHD", sizes.keys[0]), ("llava-1.5-7b", "fp16", "HND", sizes.keys[1])]
        else:
            matrix = [(s, dt, lay, k) for s in SHAPES for dt in DTYPES for lay in LAYOUTS for k in sizes.keys]
        cases = [correctness_case(s, dt, lay, k, sizes, dev) for s, dt, lay, k in matrix]
        report["correctness"] = {"pass": all(c["pass"] for c in cases), "cases": cases}
    with _section(report, "timing"):
        shapes = ["qwen2-vl-7b"] if interpret else list(SHAPES)
        timing = [timing_case(s, b, k, sizes, dev, gpu) for s in shapes for b in sizes.batches for k in sizes.keys]
        report["timing"] = {"pass": True, "note": "interpreter: not GPU figures" if interpret else "", "cases": timing}
    with _section(report, "sync_probe"):
        report["sync_probe"] = sync_probe(sizes, dev, gpu)
    with _section(report, "variants"):
        report["variants"] = variant_count(sizes, dev, gpu)
    with _section(report, "offsets"):
        report["offsets"] = offsets(dev, gpu)
    with _section(report, "torchvision"):
        report["torchvision"] = torchvision_after_project()
    report["engine_tier"] = engine_tier(kernel_only or interpret)
    checked = ("correctness", "timing", "sync_probe", "variants", "offsets", "torchvision")
    report["all_pass"] = all(report[name]["pass"] for name in checked)
    report["seconds"] = round(time.time() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON report here (e.g. bench/results/gpu-check.json)")
    parser.add_argument("--kernel-only", action="store_true", help="skip the engine tier even where vLLM imports")
    parser.add_argument("--interpret", action="store_true", help="the same sections at small sizes on a CPU")
    args = parser.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels
        torch.set_num_threads(1)
    else:
        refuse_without_gpu()
    report = run(args.interpret, args.kernel_only)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report["all_pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
