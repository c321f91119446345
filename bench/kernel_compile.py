"""The Triton SEVI kernels compiled for an H100 (sm_90a) on a machine without a GPU: registers, spills, tensor cores.

Triton's wheel carries NVIDIA's `ptxas`, so a kernel compiles for sm_90a anywhere. Each kernel is launched
through :mod:`sevi.kernels.sevi_decode`'s own wrappers with a recorder in its place, so the compile sees
exactly the arguments (types, alignment, values Triton specialises on, constexprs) that a launch at that shape
would; Triton's own binder turns them into the signature it would compile. Reported per kernel, shape and cache
dtype: registers, spill stores / loads and stack bytes (`ptxas -v`), and whether the dots run on tensor cores
(`wgmma` / `mma` in the PTX). Shapes: LLaVA-1.5-7B (32 heads x 128) and Qwen2-VL-7B (28 query / 4 KV heads x
128); dtypes bf16 / fp16 (vLLM's FlashAttention caches) and fp32 (the interpreter tests; FlashAttention takes
no fp32 cache, so fp32 is reported, not held to the tensor-core rule).

Run as `TRITON_INTERPRET=0 python -m bench.kernel_compile [--json]` (the variable keeps the kernels compiled, not
interpreted, without a GPU); tests/bench/test_kernel_compile.py holds the figures to no spills and tensor-core
dots in A and C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SHAPES = {"llava-1.5-7b": (32, 32, 128), "qwen2-vl-7b": (28, 4, 128)}  # heads, kv heads, head size
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = {"A": "_scores_kernel", "B": "_align_kernel", "C": "_values_kernel"}
ARCH = "sm_90a"
BLOCK_SIZE = 16  # vLLM's FlashAttention block size


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the call instead of launching it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


@contextlib.contextmanager
def _recording() -> Iterator[dict[str, _Recorder]]:
    from sevi.kernels import sevi_decode

    saved = {name: getattr(sevi_decode, attr) for name, attr in KERNELS.items()}
    recorders = {name: _Recorder() for name in KERNELS}
    try:
        for name, attr in KERNELS.items():
            setattr(sevi_decode, attr, recorders[name])
        yield recorders
    finally:
        for name, attr in KERNELS.items():
            setattr(sevi_decode, attr, saved[name])


def launches(shape: str, dtype: str, keys: int = 1024, batch: int = 1) -> dict[str, tuple[Any, Any, tuple, dict]]:
    """Each kernel's launch (kernel, grid, args, kwargs) by the decode at this shape: a FlashAttention cache
    `[blocks, kv_heads, 16, 2 * head]` (K and V its halves), `batch` rows of `keys` keys."""
    from sevi.kernels import sevi_decode
    from sevi.method.alignment import prepare_rows

    heads, kv_heads, d = SHAPES[shape]
    nb = -(-keys // BLOCK_SIZE)
    cache = torch.zeros(batch * nb, kv_heads, BLOCK_SIZE, 2 * d, dtype=DTYPES[dtype])
    valid = torch.ones(batch, keys, dtype=torch.bool)
    rows = prepare_rows(valid, valid, valid, torch.ones(batch), torch.full((batch,), 0.2))
    q = torch.zeros(batch, heads, d, dtype=DTYPES[dtype]).float()
    counts = torch.full((batch,), keys)
    blocks = torch.arange(batch * nb)
    with _recording() as rec:
        sevi_decode.aligned_decode(
            q, cache[..., :d], cache[..., d:], False, False, blocks, counts, rows, d**-0.5, kv_heads
        )
    return {name: (getattr(sevi_decode, KERNELS[name]), *rec[name].calls[0]) for name in KERNELS if rec[name].calls}


def _binder(kernel: Any) -> tuple[Any, Any, Any]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    return target, backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialization(kernel: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What Triton keys its compiled variants on for this launch (a new value here: a new compile)."""
    _, _, binder = _binder(kernel)
    _, spec, options = binder(*args, **kwargs)
    return tuple(spec), str(options)


def compile_launch(kernel: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Compile one launch for sm_90a; registers / spills / stack from ptxas -v, tensor-core use from the PTX."""
    import triton
    from triton.compiler import ASTSource

    target, backend, binder = _binder(kernel)
    bound, spec, options = binder(*args, **kwargs)
    opts, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=opts.__dict__)
    ptx = compiled.asm["ptx"]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [str(ptxas), f"-arch={ARCH}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    info = done.stdout + done.stderr

    def first(pattern: str) -> int:
        found = re.search(pattern, info)
        return int(found.group(1)) if found else 0

    return {
        "registers": first(r"Used (\d+) registers"),
        "stack_bytes": first(r"(\d+) bytes stack frame"),
        "spill_stores": first(r"(\d+) bytes spill stores"),
        "spill_loads": first(r"(\d+) bytes spill loads"),
        "wgmma": "wgmma." in ptx,
        "mma": "wgmma." in ptx or bool(re.search(r"\bmma\.sync", ptx)),
        "num_warps": opts.num_warps,
    }


def report(keys: int = 1024) -> list[dict[str, Any]]:
    """Every kernel at every shape and dtype (B once per shape: it reads only float32 scores)."""
    rows = []
    for shape in SHAPES:
        for dtype in DTYPES:
            for name, (kernel, _grid, args, kwargs) in launches(shape, dtype, keys).items():
                if name == "B" and dtype != "bf16":
                    continue
                rows.append(
                    {
                        "kernel": name,
                        "shape": shape,
                        "dtype": dtype if name != "B" else "fp32 scores",
                        **compile_launch(kernel, args, kwargs),
                    }
                )
    return rows


def variant_count(keys: list[int], shape: str = "qwen2-vl-7b", dtype: str = "bf16") -> dict[str, int]:
    """Distinct compiled variants each kernel needs over these key counts (rows of `k` keys, masks as wide):
    decode grows the key count by one a step, so anything above 1 is a compile inside an engine step."""
    seen: dict[str, set[Any]] = {name: set() for name in KERNELS}
    for k in keys:
        for name, (kernel, _grid, args, kwargs) in launches(shape, dtype, k).items():
            seen[name].add(specialization(kernel, args, kwargs))
    return {name: len(found) for name, found in seen.items()}


def failures(rows: list[dict[str, Any]]) -> list[str]:
    """The rule the CI test holds: no local-memory spills anywhere; A and C on tensor cores at bf16 / fp16."""
    bad = []
    for r in rows:
        where = f"{r['kernel']} {r['shape']} {r['dtype']}"
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{where}: spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded")
        if r["kernel"] in ("A", "C") and r["dtype"] in ("bf16", "fp16") and not r["mma"]:
            bad.append(f"{where}: no tensor-core MMA")
    return bad


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["kernel shape          dtype        regs  stack  spill st/ld  mma (wgmma)"]
    for r in rows:
        lines.append(
            f"{r['kernel']:<6} {r['shape']:<14} {r['dtype']:<12} {r['registers']:>4} {r['stack_bytes']:>6}"
            f"  {r['spill_stores']:>5}/{r['spill_loads']:<5}  {r['mma']} ({r['wgmma']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (the test reads them)")
    parser.add_argument("--keys", type=int, default=1024)
    parser.add_argument("--variants", help="comma-separated key counts: print each kernel's variant count (JSON)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "0":
        print("run with TRITON_INTERPRET=0 (the kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    if args.variants:
        print(json.dumps(variant_count([int(k) for k in args.variants.split(",")])))
        return 0
    rows = report(args.keys)
    print(json.dumps(rows) if args.json else table(rows))
    bad = failures(rows)
    for line in bad:
        print("FAIL", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
