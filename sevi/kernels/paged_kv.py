"""The aligned rows' q.K and p.V straight from the paged cache (`paged_kv.c`), loaded with ctypes.

Why: the torch path (paged_read.py) must first copy each row's K and V blocks into one tensor to batch the
matmul; at real prompt lengths (600 keys) that copy is half of the alignment's cost per layer. The C
kernel reads the blocks where they lie, float32, bfloat16 or float16 (the 16-bit ones widened to float32
as they are loaded). It is built once per source and ISA with the system C compiler
into a cache folder (`SEVI_KERNEL_CACHE`, default `~/.cache/sevi-serve`); where there is no compiler,
or `SEVI_PAGED_KERNEL=0`, :func:`kernel` returns None and paged_read.py keeps its torch path. The alignment
operator itself stays in torch (sevi/method/alignment.py); this is how K and V are read, plus the softmax
of the aligned scores, taken inside the p.V call while each row is in cache.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from sevi.kernels.build_cache import cached_file
from sevi.runtime import runtime_env

log = logging.getLogger("sevi.vllm")

_SOURCE = Path(__file__).with_name("paged_kv.c")
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


# The cache's element types, as paged_kv.c numbers them (queries, probabilities and outputs are float32).
_ELEMENT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# bfloat16 in vLLM's AMX tile layout (amx_order), read in place from flat block regions.
_BF16_AMX = 3


def amx_order(block_size: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where vLLM's AMX cache writer (bfloat16 on CPUs with AMX tiles) puts K and V of (slot, dim) inside a
    block region, for each (slot, dim) in row-major order (long `[block_size * head_size]` each): K in groups of
    16 keys with each pair of dims side by side, V in groups of 16 dims with each pair of keys side by side
    (paged_kv.c says it in full). The C kernel reads exactly this; the CPU backend takes that path only where
    the order it learned from vLLM's writer equals it."""
    n = torch.arange(block_size).view(-1, 1)
    d = torch.arange(head_size).view(1, -1)
    key = (n // 16) * 16 * head_size + (d // 2) * 32 + (n % 16) * 2 + d % 2
    value = (d // 16) * 16 * block_size + (n // 2) * 32 + (d % 16) * 2 + n % 2
    return key.reshape(-1), value.reshape(-1)


class PagedKernel:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._scores = lib.sevi_paged_scores
        self._scores.argtypes = [_PTR, _PTR, _PTR, _PTR] + [_I64] * 12 + [ctypes.c_float, _PTR]
        self._scores.restype = None
        self._values = lib.sevi_paged_values
        self._values.argtypes = [_PTR, _PTR, _PTR, _PTR] + [_I64] * 12 + [_PTR, _I64]
        self._values.restype = None
        lib.sevi_paged_element_types.restype = _I64
        built = int(lib.sevi_paged_element_types())
        self.cache_dtypes = frozenset(dt for dt, et in _ELEMENT_TYPES.items() if built >> et & 1)
        self.reads_amx = bool(built >> _BF16_AMX & 1)  # bfloat16 in vLLM's AMX tiles (amx_order)

    def scores_args(
        self,
        key: torch.Tensor,
        transposed: bool,
        blocks: torch.Tensor,
        key_counts: torch.Tensor | None,
        num_keys: int,
        scale: float,
        rows: int,
        kv_heads: int,
        rep: int,
        head_dim: int,
        amx: bool = False,
    ) -> tuple[Any, ...]:
        """The arguments of `sevi_paged_scores` between the cache pointer and the output pointer: all that
        the aligned layers of one step share (their caches have one shape and layout), so that a step
        builds them once (:meth:`run_scores`). blocks: long `[R * nb]`, contiguous (its pointer is taken).
        amx: `key` is flat bfloat16 block regions `[N, G, bs * D]` in vLLM's AMX layout (:func:`amx_order`)."""
        et, bs, (sb, sg, sd, sn) = _layout(key, transposed, head_dim, amx)
        return (
            blocks.data_ptr(),
            _lens(key_counts),
            et,
            rows,
            blocks.shape[0] // max(rows, 1),
            kv_heads,
            rep,
            head_dim,
            bs,
            num_keys,
            sb,
            sg,
            sd,
            sn,
            scale,
        )

    def values_args(
        self,
        value: torch.Tensor,
        transposed: bool,
        blocks: torch.Tensor,
        key_counts: torch.Tensor | None,
        num_keys: int,
        rows: int,
        kv_heads: int,
        rep: int,
        amx_head_dim: int = 0,
    ) -> tuple[Any, ...]:
        """Likewise for `sevi_paged_values` (:meth:`run_values`); amx_head_dim: D of flat AMX regions (0: a
        strided view)."""
        d = amx_head_dim or (value.shape[-2] if transposed else value.shape[-1])
        et, bs, (sb, sg, sd, sn) = _layout(value, transposed, d, bool(amx_head_dim))
        return (
            blocks.data_ptr(),
            _lens(key_counts),
            et,
            rows,
            blocks.shape[0] // max(rows, 1),
            kv_heads,
            rep,
            d,
            bs,
            num_keys,
            sb,
            sg,
            sn,
            sd,
        )

    def run_scores(self, q: int, key: int, args: tuple[Any, ...], out: int) -> None:
        """q.K for data pointers q (float32 `[R, G, rep, D]`, contiguous), key (the cache) and out (float32
        `[R, G * rep, K]`), with the rest from :meth:`scores_args`."""
        self._scores(q, key, *args, out)

    def run_values(self, probs: int, value: int, args: tuple[Any, ...], out: int, softmax: bool) -> None:
        """p.V for data pointers probs (float32 `[R, H, K]`, contiguous; with `softmax` it holds scores and
        is scratch: overwritten by exp(score - max)), value (the cache) and out (float32 `[R, H, D]`), with the
        rest from :meth:`values_args`."""
        self._values(probs, value, *args, out, int(softmax))

    def scores(
        self,
        q: torch.Tensor,
        key: torch.Tensor,
        transposed: bool,
        block_index: torch.Tensor,
        num_keys: int,
        scale: float,
        key_counts: torch.Tensor | None = None,
        amx: bool = False,
    ) -> torch.Tensor:
        """q `[R, G, rep, D]` float32; key: the cache's K view (`[N, G, D, bs]` when transposed, else
        `[N, G, bs, D]`, of a dtype in `cache_dtypes`; with `amx`, bfloat16 regions `[N, G, bs * D]` in vLLM's
        AMX layout); block_index `[R * nb]` long -> float32 scores `[R, G * rep, num_keys]`.
        key_counts: long `[R]`, the keys each row reads (0 past them), or None for all."""
        r, g, rep, d = q.shape
        q = q.contiguous()
        blocks = block_index.contiguous()
        out = torch.empty(r, g * rep, num_keys, dtype=torch.float32)
        args = self.scores_args(key, transposed, blocks, key_counts, num_keys, scale, r, g, rep, d, amx)
        self.run_scores(q.data_ptr(), key.data_ptr(), args, out.data_ptr())
        return out

    def values(
        self,
        probs: torch.Tensor,
        value: torch.Tensor,
        transposed: bool,
        block_index: torch.Tensor,
        num_kv_heads: int,
        out: torch.Tensor | None = None,
        key_counts: torch.Tensor | None = None,
        softmax: bool = False,
        amx_head_dim: int = 0,
    ) -> torch.Tensor:
        """probs `[R, H, K]` float32; value: the cache's V view -> float32 `[R, G, rep, D]` (into `out`,
        contiguous float32, when given). key_counts: long `[R]`, the keys each row reads (their
        probabilities past them must be 0), or None for all. softmax: `probs` holds scores; the output is
        p.V of their softmax over each row's keys (`probs` must then be contiguous: it is overwritten with
        exp(score - row max), the output divided by their sum)."""
        r, h, k = probs.shape
        g, rep = num_kv_heads, h // num_kv_heads
        if softmax:
            assert probs.is_contiguous() and probs.dtype == torch.float32, "softmax in place needs float32 rows"
        probs = probs.contiguous()
        blocks = block_index.contiguous()
        d = amx_head_dim or (value.shape[-2] if transposed else value.shape[-1])
        if out is None:
            out = torch.empty(r, g, rep, d, dtype=torch.float32)
        args = self.values_args(value, transposed, blocks, key_counts, k, r, g, rep, amx_head_dim)
        self.run_values(probs.data_ptr(), value.data_ptr(), args, out.data_ptr(), softmax)
        return out.view(r, g, rep, d)


def _layout(
    view: torch.Tensor, transposed: bool, head_dim: int, amx: bool
) -> tuple[int, int, tuple[int, int, int, int]]:
    """(element type as paged_kv.c numbers it, block size, element strides (block, head, d, n)) of a cache view;
    the AMX layout has no d or n stride (the kernel knows its order)."""
    if amx:
        assert view.dtype == torch.bfloat16 and view.dim() == 3 and head_dim % 16 == 0
        sb, sg, _ = view.stride()
        return _BF16_AMX, view.shape[-1] // head_dim, (sb, sg, 0, 0)
    sb, sg, s2, s3 = view.stride()
    bs = view.shape[-1] if transposed else view.shape[-2]
    return _ELEMENT_TYPES[view.dtype], bs, (sb, sg, s2, s3) if transposed else (sb, sg, s3, s2)


def _lens(key_counts: torch.Tensor | None) -> int | None:
    """The kernels' `lens` pointer (NULL: every row reads all keys)."""
    if key_counts is None:
        return None
    assert key_counts.dtype == torch.int64 and key_counts.is_contiguous() and key_counts.device.type == "cpu"
    return key_counts.data_ptr()  # type: ignore[no-any-return]


def flags_for(isa: str) -> list[str] | None:
    """Compiler flags for a CPU of torch's capability `isa` (torch.backends.cpu.get_cpu_capability()), or
    None below AVX2: built for plain x86-64 the loops ran at half the torch path's speed (190 vs 90 us for
    q.K of 8 rows x 16 heads x 150 keys), so such CPUs keep the torch path."""
    if isa.startswith("AVX512"):
        return ["-O3", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mprefer-vector-width=512"]
    if isa.startswith("AVX2"):
        return ["-O3", "-mavx2", "-mfma", "-mf16c"]
    return None


def _build(compiler: str, flags: list[str]) -> Path:
    # The flags are part of the cached file's name, so machines of different ISAs sharing a cache folder
    # each build their own.
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]

    def compile_to(path: Path) -> None:
        # -Wno-psabi: gcc notes that 64-byte vector returns change the ABI; they are all inlined.
        subprocess.run(
            [compiler, *flags, "-Wno-psabi", "-shared", "-fPIC", str(_SOURCE), "-o", str(path)],
            check=True,
            capture_output=True,
            timeout=120,
        )

    return cached_file(f"paged_kv-{digest}.so", compile_to)


def load(flags: list[str]) -> PagedKernel | None:
    """The kernel built with `flags` (or loaded from the cache folder); None when it cannot be built."""
    compiler = shutil.which(runtime_env.c_compiler()) or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: SEVI reads K/V by gather + bmm (slower at long prompts)")
        return None
    try:
        return PagedKernel(ctypes.CDLL(str(_build(compiler, flags))))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("paged K/V kernel not built (%s): SEVI reads K/V by gather + bmm", exc)
        return None


@functools.lru_cache(maxsize=1)
def kernel() -> PagedKernel | None:
    """The kernel for this CPU, built on first use; None (torch path) when disabled, on CPUs without AVX2
    (the ISA torch itself dispatches to: no AVX2 code on a machine without it), or when it cannot be built."""
    if not runtime_env.current().paged_kernel or not hasattr(ctypes, "CDLL"):
        return None
    flags = flags_for(torch.backends.cpu.get_cpu_capability())
    if flags is None:
        log.info("CPU without AVX2: SEVI reads K/V by gather + bmm")
        return None
    return load(flags)
