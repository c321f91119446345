"""SEVI-aligned decode attention in Triton, reading K and V in place from vLLM's paged cache.

Three kernels per aligned layer (instead of about 60 torch ops), float32 arithmetic around tensor-core dots:
  A `_scores_kernel`, one program per (row, KV head): q.K of the KV head's query heads over the row's own
    keys, K read through the block ids and strides in the cache dtype (a dot with exact products and float32
    accumulation), written once to a float32 scores buffer `[R, H, K]` (zeros past the row's keys).
  B `_align_kernel`, one program per row holding all H heads: pass 1 over the row's scores gathers the
    per-head statistics (online max, semantic / other masses, largest semantic score) and classifies the
    heads; pass 2 computes the global heads' mean and the core heads' max per key tile and blends both
    stages into the scores, in place. It writes the head groups and stage masks (telemetry).
  C `_values_kernel`, one program per (row, KV head): online softmax of the aligned scores and p.V, V read in
    place like K and kept in the cache dtype; p (float32) is split into cache-dtype parts (bf16: 3, fp16: 2),
    so p.V runs on tensor cores with float32's precision.
Why three and not one: the cross-head step needs every head's statistics over all keys before any key can
be blended, so a single pass would have to hold a row's H x K scores on chip or read K twice. Written
once, the scores cost H * K * 4 bytes per row against K and V's 2 * G * K * D * 2 (bf16): 1/128 of the
traffic at 32 heads of 128 (MHA), 7/128 at Qwen2-VL's 28/4, and A and C keep the GQA grouping (each K/V
tile read once per KV head, q.K and p.V as `tl.dot` over the group's heads padded to 16 rows).
Without alignment (`align=False`: the unaligned baseline of ``make gpu-check``) B is skipped.

Tensor parallelism: the cross-head quantities need every shard's partial sums, so with `shards` the
operator runs in torch (:func:`sevi.method.alignment.align_sharded`, around the gather) between kernels A and C.

Layouts: any strided per-block view `[blocks, kv_heads, block_size, head]` (FlashAttention's K and V halves,
NHD or HND physically) or `[blocks, kv_heads, head, block_size]` (the CPU cache's transposed K), any of
float32 / float16 / bfloat16. Without a CUDA device the kernels run in the interpreter (sevi.kernels), whose
16-bit float arithmetic is wrong: there (`WIDEN`) the dots' operands are widened to float32 first, the same
exact products. Offsets into the scores are int64, and rows run in chunks of at most SCORES_ELEMENTS scores
(scratch vLLM's memory profiling does not see). Row, block and key counts are not specialised on
(`do_not_specialize`): one compiled variant per shape and dtype, which :func:`warm_up` compiles at engine load.

Checked without a GPU: tests/sevi/kernels (interpreter, against float32 torch), tests/bench/test_kernel_compile.py
(compiled for sm_90a: no spills, tensor-core dots; figures in docs/benchmarks.md). Not yet run on a GPU.
"""

from __future__ import annotations

import torch

from sevi.kernels import use_interpreter
from sevi.kernels.alignment_dispatch import align_sharded
from sevi.method.alignment import MASKED, HeadGroups, PreparedRows, ShardGather, prepare_rows

use_interpreter()  # before triton decorates the kernels below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Start of running maxima: below any score, even masked ones (about MASKED), and still finite (no inf - inf).
_LOW = -3.0e38
BLOCK_K = 64  # keys per tile


@triton.jit
def _score_rows(r, heads, H: tl.constexpr, num_keys):
    """Offsets of row r's `heads` in the scores `[R, H, K]`, in int64: R x H x K passes 2**31 in a long
    recompute prefill (2,048 rows x 32 heads x 32k keys), where int32 offsets would wrap."""
    return (r.to(tl.int64) * H + heads) * num_keys


@triton.jit
def _group_program(H: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, REP_PAD: tl.constexpr):
    """A (row, KV head) program of kernels A and C: its row r (int64: every offset derived from it is), KV
    head g, its query heads' indices within the row (padded to REP_PAD) with their mask, and the head dims."""
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    heads = tl.arange(0, REP_PAD)
    dims = tl.arange(0, D_PAD)
    return r, g, g * REP + heads, heads < REP, dims, dims < D


@triton.jit
def _offset_probe_kernel(out_ptr, r, num_keys, H: tl.constexpr):
    """The scores offsets the kernels compute for row r's first and last head (tests: offsets past 2**31)."""
    heads = tl.arange(0, 2) * (H - 1)
    tl.store(out_ptr + tl.arange(0, 2), _score_rows(r, heads, H, num_keys))


@triton.jit(do_not_specialize=["nb", "num_keys"])
def _scores_kernel(
    q_ptr,
    k_ptr,
    blocks_ptr,
    counts_ptr,
    out_ptr,
    scale,
    nb,
    block_size,
    num_keys,
    s_b,
    s_g,
    s_n,
    s_d,
    H: tl.constexpr,
    REP: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    REP_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDEN: tl.constexpr,
    IEEE: tl.constexpr,
):
    r, g, heads, hm, dims, dm = _group_program(H, REP, D, D_PAD, REP_PAD)
    # q in the cache's dtype (vLLM's query is in it): q.K on tensor cores, products exact, fp32 accumulation
    q = tl.load(q_ptr + (r * H + heads)[:, None] * D + dims[None, :], mask=hm[:, None] & dm[None, :], other=0.0)
    if WIDEN:  # the interpreter (its 16-bit float arithmetic is wrong): the same exact products, in fp32
        q = q.to(tl.float32)
    count = tl.load(counts_ptr + r)
    out_rows = out_ptr + _score_rows(r, heads, H, num_keys)[:, None]
    for start in range(0, count, BLOCK):  # the row's own keys only (rows of a batch differ in length)
        keys = start + tl.arange(0, BLOCK)
        live = keys < count
        blk = tl.load(blocks_ptr + r * nb + keys // block_size, mask=live, other=0)
        slot = keys % block_size
        kt = tl.load(
            k_ptr + blk[None, :] * s_b + g * s_g + slot[None, :] * s_n + dims[:, None] * s_d,
            mask=live[None, :] & dm[:, None],
            other=0.0,
        )  # [D, BLOCK], cache dtype
        if WIDEN:
            kt = kt.to(tl.float32)
        if IEEE:  # noqa: SIM108 - constexpr branches: a float32 cache (not FlashAttention's), exact fp32 products
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt, out_dtype=tl.float32)
        tl.store(out_rows + keys[None, :], s * scale, mask=hm[:, None] & (keys < num_keys)[None, :])
    # Past the row's keys its scores are 0 (the sharded operator reads the whole width; the masks drop them).
    for start in range(tl.cdiv(count, BLOCK) * BLOCK, num_keys, BLOCK):
        keys = start + tl.arange(0, BLOCK)
        tl.store(
            out_rows + keys[None, :],
            tl.zeros([REP_PAD, BLOCK], tl.float32),
            mask=hm[:, None] & (keys < num_keys)[None, :],
        )


@triton.jit
def _lerp(a, b, w):
    # torch.lerp's formula (two branches on the weight), so that the blend rounds as the torch operator's does
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit(do_not_specialize=["num_keys", "width"])
def _align_kernel(
    s_ptr,
    counts_ptr,
    bias_ptr,
    sem_ptr,
    oth_ptr,
    kappa_ptr,
    blend_ptr,
    on_ptr,
    masks_ptr,
    num_keys,
    width,
    H: tl.constexpr,
    H_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    MASK_VALUE: tl.constexpr,
    LOW: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, H_PAD)
    hm = heads < H
    count = tl.load(counts_ptr + r)
    s_rows = s_ptr + _score_rows(r, heads, H, num_keys)[:, None]
    m = tl.full([H_PAD], LOW, tl.float32)
    sem_mass = tl.zeros([H_PAD], tl.float32)
    oth_mass = tl.zeros([H_PAD], tl.float32)
    top_sem = tl.full([H_PAD], LOW, tl.float32)
    for start in range(0, num_keys, BLOCK):  # pass 1: per-head statistics (online: one read of the scores)
        keys = start + tl.arange(0, BLOCK)
        inrow = keys < num_keys
        s = tl.load(s_rows + keys[None, :], mask=hm[:, None] & (keys < count)[None, :], other=0.0)
        b = tl.load(bias_ptr + r * width + keys, mask=inrow, other=MASK_VALUE)
        sem = tl.load(sem_ptr + r * width + keys, mask=inrow, other=0.0)
        oth = tl.load(oth_ptr + r * width + keys, mask=inrow, other=0.0)
        x = s + b[None, :]
        m_new = tl.maximum(m, tl.max(x, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new[:, None])
        sem_mass = sem_mass * alpha + tl.sum(e * sem[None, :], 1)
        oth_mass = oth_mass * alpha + tl.sum(e * oth[None, :], 1)
        top_sem = tl.maximum(top_sem, tl.max(x + (sem[None, :] - 1.0) * -MASK_VALUE, 1))
        m = m_new
    kappa = tl.load(kappa_ptr + r)
    semantic = (sem_mass >= oth_mass) & hm  # ties count as semantic (spec: S >= O)
    core = semantic & (tl.exp(top_sem - m) > kappa * sem_mass)
    glob = semantic & ~core
    n_global = tl.sum(glob.to(tl.float32), 0)
    n_core = tl.sum(core.to(tl.float32), 0)
    # Row-level gates as float factors (scalar-and-vector bool ops are not all supported by the interpreter)
    on = (tl.load(on_ptr + r) != 0).to(tl.float32)
    blend = tl.load(blend_ptr + r)
    stage1 = (~semantic & hm).to(tl.float32) * (n_global > 0).to(tl.float32) * on > 0
    stage2 = glob.to(tl.float32) * (n_core > 0).to(tl.float32) * on > 0
    w1 = tl.where(stage1, blend, 0.0)[:, None]
    w2 = tl.where(stage2, blend, 0.0)[:, None]
    core_bias = tl.where(core, 0.0, MASK_VALUE)[:, None]
    for start in range(0, num_keys, BLOCK):  # pass 2: both stages, written over the scores
        keys = start + tl.arange(0, BLOCK)
        inrow = keys < num_keys
        ptrs = s_rows + keys[None, :]
        s = tl.load(ptrs, mask=hm[:, None] & (keys < count)[None, :], other=0.0)
        b = tl.load(bias_ptr + r * width + keys, mask=inrow, other=MASK_VALUE)
        x = s + b[None, :]
        global_mean = tl.sum(tl.where(glob[:, None], x, 0.0), 0) / tl.maximum(n_global, 1.0)
        core_max = tl.max(x + core_bias, 0)
        out = _lerp(_lerp(x, global_mean[None, :], w1), core_max[None, :], w2)
        tl.store(ptrs, out, mask=hm[:, None] & inrow[None, :])
    base = masks_ptr + r * 5 * H + heads
    tl.store(base, semantic, mask=hm)  # bool masks, stored as torch.bool: no conversion op after the kernel
    tl.store(base + H, core, mask=hm)
    tl.store(base + 2 * H, glob, mask=hm)
    tl.store(base + 3 * H, stage1, mask=hm)
    tl.store(base + 4 * H, stage2, mask=hm)


@triton.jit(do_not_specialize=["nb", "num_keys"])
def _values_kernel(
    s_ptr,
    v_ptr,
    blocks_ptr,
    counts_ptr,
    out_ptr,
    nb,
    block_size,
    num_keys,
    s_b,
    s_g,
    s_n,
    s_d,
    H: tl.constexpr,
    REP: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    REP_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    LOW: tl.constexpr,
    WIDEN: tl.constexpr,
    SPLIT: tl.constexpr,
):
    r, g, heads, hm, dims, dm = _group_program(H, REP, D, D_PAD, REP_PAD)
    count = tl.load(counts_ptr + r)
    s_rows = s_ptr + _score_rows(r, heads, H, num_keys)[:, None]
    m = tl.full([REP_PAD], LOW, tl.float32)
    total = tl.zeros([REP_PAD], tl.float32)
    acc = tl.zeros([REP_PAD, D_PAD], tl.float32)
    for start in range(0, count, BLOCK):  # the row's own keys only: V past them is never read
        keys = start + tl.arange(0, BLOCK)
        live = keys < count
        s = tl.load(s_rows + keys[None, :], mask=hm[:, None] & live[None, :], other=LOW)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        blk = tl.load(blocks_ptr + r * nb + keys // block_size, mask=live, other=0)
        slot = keys % block_size
        v = tl.load(
            v_ptr + blk[:, None] * s_b + g * s_g + slot[:, None] * s_n + dims[None, :] * s_d,
            mask=live[:, None] & dm[None, :],
            other=0.0,
        )  # [BLOCK, D], kept in the cache dtype: p.V on tensor cores
        acc = acc * alpha[:, None]
        if SPLIT == 1:  # a float32 cache: one exact fp32 dot
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:
            # p (fp32) as a sum of SPLIT cache-dtype parts, each p.V exact products into the fp32 accumulator:
            # bf16 keeps 8 bits a part (3 parts: fp32's 24), fp16 11 (2 parts: 22).
            rest = p
            if WIDEN:
                v = v.to(tl.float32)
            for _ in tl.static_range(SPLIT):
                part = rest.to(v_ptr.dtype.element_ty)
                rest = rest - part.to(tl.float32)
                if WIDEN:  # the interpreter: the same exact products, in fp32
                    acc = tl.dot(part.to(tl.float32), v, acc, input_precision="ieee")
                else:
                    acc = tl.dot(part, v, acc, out_dtype=tl.float32)
        m = m_new
    out = acc / total[:, None]
    tl.store(out_ptr + (r * H + heads)[:, None] * D + dims[None, :], out, mask=hm[:, None] & dm[None, :])


def _strides(view: torch.Tensor, transposed: bool) -> tuple[int, int, int, int]:
    """(block, head, slot, dim) strides of a per-block view, `[N, G, D, bs]` when transposed else `[N, G, bs, D]`."""
    sb, sg, s2, s3 = view.stride()
    return (sb, sg, s3, s2) if transposed else (sb, sg, s2, s3)


def _pad(n: int, least: int = 16) -> int:
    # tl.dot needs at least 16 rows / columns on NVIDIA GPUs; tl.arange needs powers of two
    return max(least, triton.next_power_of_2(n))


# Cache-dtype parts p is split into for p.V on tensor cores (kernel C): enough for float32's 24 bits.
_SPLIT = {torch.bfloat16: 3, torch.float16: 2, torch.float32: 1}
# Most float32 scores one launch of the three kernels holds ([rows, heads, keys]: 128 MiB): memory vLLM's
# profiling does not see, so bounded; longer row sets (a recompute prefill) run in chunks of rows.
SCORES_ELEMENTS = 1 << 25


def _cache_dtype(cache: torch.Tensor) -> torch.dtype:
    if cache.dtype not in _SPLIT:
        raise ValueError(f"SEVI's Triton kernels read float32 / float16 / bfloat16 caches, not {cache.dtype}")
    return cache.dtype


def row_chunks(rows: int, heads: int, keys: int, limit: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) ranges of rows whose scores `[rows, heads, keys]` hold at most `limit` elements each
    (at least one row a chunk)."""
    per = max(1, (SCORES_ELEMENTS if limit is None else limit) // max(1, heads * keys))
    return [(a, min(a + per, rows)) for a in range(0, rows, per)]


def paged_scores(
    q: torch.Tensor,
    key: torch.Tensor,
    key_transposed: bool,
    block_index: torch.Tensor,
    key_count: torch.Tensor,
    num_keys: int,
    scale: float,
    num_kv_heads: int,
) -> torch.Tensor:
    """Kernel A: float32 scores `[R, H, num_keys]` of q (`[R, H, D]`) against each row's keys (0 past them).
    q is read in the cache's dtype (vLLM's query is in it already; a float32 q is rounded to it).
    block_index: long `[R * nb]` (row r reads blocks r*nb ..); key_count: long `[R]`."""
    r, h, d = q.shape
    rep = h // num_kv_heads
    dtype = _cache_dtype(key)
    block_size = key.shape[-1] if key_transposed else key.shape[-2]
    out = torch.empty(r, h, num_keys, dtype=torch.float32, device=q.device)
    if r == 0:
        return out
    _scores_kernel[(r, num_kv_heads)](
        q.to(dtype).contiguous(),
        key,
        block_index,
        key_count,
        out,
        scale,
        block_index.shape[0] // r,
        block_size,
        num_keys,
        *_strides(key, key_transposed),
        H=h,
        REP=rep,
        D=d,
        D_PAD=_pad(d),
        REP_PAD=_pad(rep),
        BLOCK=BLOCK_K,
        WIDEN=use_interpreter(),
        IEEE=dtype == torch.float32,
    )
    return out


def align_in_place(scores: torch.Tensor, key_count: torch.Tensor, rows: PreparedRows) -> HeadGroups:
    """Kernel B: the SEVI operator over contiguous float32 scores `[R, H, K]` (K: the masks' width), in place:
    they come back biased and aligned like :func:`sevi.method.alignment.align_prepared`'s output."""
    r, h, k = scores.shape
    masks = torch.empty(r, 5, h, dtype=torch.bool, device=scores.device)  # every entry written by the kernel
    if r:
        _align_kernel[(r,)](
            scores,
            key_count,
            rows.key_bias.contiguous(),
            rows.semantic_keys.contiguous(),
            rows.other_keys.contiguous(),
            rows.kappa.float().contiguous(),
            rows.blend.float().contiguous(),
            rows.on.contiguous(),
            masks,
            k,
            rows.key_bias.shape[-1],
            H=h,
            H_PAD=triton.next_power_of_2(h),
            BLOCK=BLOCK_K,
            MASK_VALUE=MASKED,
            LOW=_LOW,
        )
    return HeadGroups(
        semantic=masks[:, 0], core=masks[:, 1], global_=masks[:, 2], stage1=masks[:, 3], stage2=masks[:, 4]
    )


def paged_values(
    scores: torch.Tensor,
    value: torch.Tensor,
    value_transposed: bool,
    block_index: torch.Tensor,
    key_count: torch.Tensor,
    num_kv_heads: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kernel C: softmax over each row's keys of float32 scores `[R, H, K]` (contiguous), then p.V from the
    paged cache: float32 `[R, H, D]` (into `out`, contiguous float32, when given)."""
    r, h, k = scores.shape
    d = value.shape[-2] if value_transposed else value.shape[-1]
    block_size = value.shape[-1] if value_transposed else value.shape[-2]
    if out is None:
        out = torch.empty(r, h, d, dtype=torch.float32, device=scores.device)
    if r:
        _values_kernel[(r, num_kv_heads)](
            scores,
            value,
            block_index,
            key_count,
            out,
            block_index.shape[0] // r,
            block_size,
            k,
            *_strides(value, value_transposed),
            H=h,
            REP=h // num_kv_heads,
            D=d,
            D_PAD=_pad(d),
            REP_PAD=_pad(h // num_kv_heads),
            BLOCK=BLOCK_K if value.dtype != torch.float32 else BLOCK_K // 2,  # fp32 V at 64 keys: spills
            LOW=_LOW,
            WIDEN=use_interpreter(),
            SPLIT=_SPLIT[_cache_dtype(value)],
        )
    return out


def _rows_slice(rows: PreparedRows, a: int, b: int) -> PreparedRows:
    return PreparedRows(
        rows.key_bias[a:b],
        rows.semantic_keys[a:b],
        rows.other_keys[a:b],
        rows.kappa[a:b],
        rows.blend[a:b],
        rows.on[a:b],
        rows.all_on,
    )


def aligned_decode(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_transposed: bool,
    value_transposed: bool,
    block_index: torch.Tensor,
    key_count: torch.Tensor,
    rows: PreparedRows,
    scale: float,
    num_kv_heads: int,
    out: torch.Tensor | None = None,
    align: bool = True,
    shards: ShardGather | None = None,
) -> tuple[torch.Tensor, HeadGroups | None, torch.Tensor | None]:
    """SEVI-aligned attention of query rows q (`[R, H, D]`) over the paged cache: float32 `[R, H, D]`, the head
    groups with the heads each stage moved (None with `align=False`), and with `shards` per row whether each
    stage moved any head of any shard (bool `[R, 2]`, else None).

    key / value: per-block views (see the module docstring); block_index: long `[R * nb]`; key_count: long
    `[R]`, the keys each row reads (its valid keys are exactly the first key_count: `rows.key_bias`).
    Rows run in chunks of at most SCORES_ELEMENTS scores (:func:`row_chunks`)."""
    r, h, d = q.shape
    width = rows.key_bias.shape[-1]
    if out is None:
        out = torch.empty(r, h, d, dtype=torch.float32, device=q.device)
    chunks = row_chunks(r, h, width)
    if len(chunks) == 1:
        return _decode_chunk(
            q,
            key,
            value,
            key_transposed,
            value_transposed,
            block_index,
            key_count,
            rows,
            scale,
            num_kv_heads,
            out,
            align,
            shards,
        )
    nb = block_index.shape[0] // max(r, 1)
    parts = [
        _decode_chunk(
            q[a:b],
            key,
            value,
            key_transposed,
            value_transposed,
            block_index[a * nb : b * nb],
            key_count[a:b],
            _rows_slice(rows, a, b),
            scale,
            num_kv_heads,
            out[a:b],
            align,
            shards,
        )
        for a, b in chunks
    ]
    groups = None
    if parts[0][1] is not None:
        fields = ("semantic", "core", "global_", "stage1", "stage2")
        groups = HeadGroups(**{f: torch.cat([getattr(p[1], f) for p in parts]) for f in fields})  # type: ignore[arg-type]
    moved = torch.cat([p[2] for p in parts]) if parts[0][2] is not None else None  # type: ignore[misc]
    return out, groups, moved


def _decode_chunk(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_transposed: bool,
    value_transposed: bool,
    block_index: torch.Tensor,
    key_count: torch.Tensor,
    rows: PreparedRows,
    scale: float,
    num_kv_heads: int,
    out: torch.Tensor,
    align: bool,
    shards: ShardGather | None,
) -> tuple[torch.Tensor, HeadGroups | None, torch.Tensor | None]:
    scores = paged_scores(q, key, key_transposed, block_index, key_count, rows.key_bias.shape[-1], scale, num_kv_heads)
    groups, moved = None, None
    if shards is not None:
        scores, groups, moved = align_sharded(scores, rows, shards)
        scores = scores.float().contiguous()
    elif align:
        groups = align_in_place(scores, key_count, rows)
    return paged_values(scores, value, value_transposed, block_index, key_count, num_kv_heads, out), groups, moved


def score_offsets(row: int, heads: int, num_keys: int) -> tuple[int, int]:
    """The scores offsets the kernels compute for `row`'s first and last head, read back (tests / gpu-check:
    offsets past 2**31 must not wrap)."""
    found = torch.zeros(2, dtype=torch.int64, device="cuda" if torch.cuda.is_available() else "cpu")
    _offset_probe_kernel[(1,)](found, row, num_keys, H=heads)
    first, last = found.tolist()
    return first, last


def warm_up(
    heads: int, kv_heads: int, head_size: int, dtype: torch.dtype, block_size: int, device: torch.device
) -> None:
    """Compile the three kernels for a layer's shape and cache dtype in FlashAttention's layout, at engine load:
    the row count, block count and key count are not specialised on (do_not_specialize), so these are the
    variants every decode step of the engine launches, and none compiles inside a step."""
    cache = torch.zeros(2, kv_heads, block_size, 2 * head_size, dtype=dtype, device=device)
    valid = torch.ones(1, block_size, dtype=torch.bool, device=device)
    one = torch.ones(1, device=device)
    rows = prepare_rows(valid, valid, valid, one, one * 0.2)
    q = torch.zeros(1, heads, head_size, dtype=dtype, device=device)
    count = torch.full((1,), block_size, dtype=torch.long, device=device)
    blocks = torch.zeros(1, dtype=torch.long, device=device)
    aligned_decode(q, cache[..., :head_size], cache[..., head_size:], False, False, blocks, count, rows, 1.0, kv_heads)
