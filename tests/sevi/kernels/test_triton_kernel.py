"""The Triton SEVI decode kernels (sevi/kernels) against the torch operator, on CPU through Triton's interpreter.

Random paged caches at the heads of LLaVA-1.5-7B (32 x 128) and Qwen2-VL-7B (28 query / 4 KV heads x 128) at
reduced key counts, rows of different lengths crossing blocks in shuffled block order, several images per
prompt, float32 / float16 / bfloat16 caches, FlashAttention's layout and the CPU cache's (K transposed).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (sevi.kernels also sets it without CUDA)

from sevi.kernels import triton_available  # noqa: E402
from sevi.method.alignment import PreparedRows, align_prepared, prepare_rows, shard_partials, span_masks  # noqa: E402

_WHY = triton_available()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"Triton kernels untested: {_WHY}")

if _WHY is None:
    from sevi.kernels import sevi_decode
    from sevi.kernels.sevi_decode import aligned_decode, paged_scores, row_chunks, score_offsets


def paged_cache(
    n_blocks: int, g: int, bs: int, d: int, dtype: torch.dtype, layout: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor, torch.Tensor]:
    """(K view, V view, K transposed, K and V as `[N, G, bs, D]` float32 for the reference).
    flash: `[N, G, bs, 2D]`, K the first D channels; cpu: per (block, head) a K region ([D, bs]: transposed)
    then a V region ([bs, D]), as vLLM's CPU cache on AVX2."""
    k = torch.randn(n_blocks, g, bs, d, generator=gen).to(dtype)
    v = torch.randn(n_blocks, g, bs, d, generator=gen).to(dtype)
    if layout == "flash":
        cache = torch.cat([k, v], -1)
        return cache[..., :d], cache[..., d:], False, k.float(), v.float()
    cache = torch.empty(n_blocks, g, bs, 2 * d, dtype=dtype)
    regions = cache.view(n_blocks, g, 2, bs * d)
    regions[:, :, 0] = k.transpose(-1, -2).reshape(n_blocks, g, bs * d)
    regions[:, :, 1] = v.reshape(n_blocks, g, bs * d)
    key = regions[:, :, 0].unflatten(-1, (d, bs))
    value = regions[:, :, 1].unflatten(-1, (bs, d))
    return key, value, True, k.float(), v.float()


def masks(
    counts: list[int], width: int, images: list[tuple[int, int]], image_only: bool, omega: list[float], kappa: float
) -> PreparedRows:
    """Rows whose prompt holds `images` (spans [first, last]); row r's query is at counts[r] - 1."""
    r = len(counts)
    pos = torch.tensor(counts) - 1
    image = torch.zeros(r, width, dtype=torch.bool)
    for first, last in images:
        image[:, first : last + 1] = True
    last_image = torch.full((r,), images[-1][1])
    valid = torch.arange(width)[None, :] <= pos[:, None]
    semantic, other = span_masks(torch.arange(width), pos, last_image, image, torch.full((r,), image_only))
    return prepare_rows(valid, semantic, other, torch.tensor(omega), torch.full((r,), kappa))


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    counts: list[int],
    rows: PreparedRows,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """q.K on each row's gathered keys (0 past them), the torch operator, softmax, p.V: float32 `[R, H, D]`."""
    r, h, d = q.shape
    g, width = k.shape[1], rows.key_bias.shape[-1]
    keys = k[blocks].permute(0, 2, 1, 3, 4).reshape(r, g, -1, d)[:, :, :width]  # [R, G, K, D]
    vals = v[blocks].permute(0, 2, 1, 3, 4).reshape(r, g, -1, d)[:, :, :width]
    rep = h // g
    scores = torch.einsum("rgjd,rgkd->rgjk", q.view(r, g, rep, d), keys).reshape(r, h, width) * scale
    scores = scores * (torch.arange(width)[None, None, :] < torch.tensor(counts)[:, None, None])
    aligned, groups = align_prepared(scores.contiguous(), rows)
    probs = torch.softmax(aligned, -1)
    out = torch.einsum("rgjk,rgkd->rgjd", probs.view(r, g, rep, width), vals).reshape(r, h, d)
    return out, aligned, groups


CASES = {  # name: heads, kv heads, block size, row key counts, images (first, last), Qwen ("other": images only)
    "llava-7b": (32, 32, 16, [100, 37, 70], [(1, 30)], False),
    "llava-7b-2img": (32, 32, 32, [100, 70], [(1, 14), (18, 30)], False),
    "qwen2vl-7b": (28, 4, 16, [190, 70, 113, 33], [(3, 40), (44, 30 + 52)], True),
}


# Every dtype and layout on the GQA shape (4 KV heads: cheap in the interpreter); the 32-KV-head shape (32 programs
# per row and kernel, about 4 s a case here) on a selection that still covers each dtype and layout.
MATRIX = [
    ("qwen2vl-7b", layout, dtype)
    for layout in ("flash", "cpu")
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
] + [("llava-7b", "flash", torch.float32), ("llava-7b", "cpu", torch.bfloat16), ("llava-7b-2img", "cpu", torch.float16)]


@pytest.mark.parametrize(("case", "layout", "dtype"), MATRIX)
def test_kernel_equals_torch_operator_softmax_and_pv(case: str, layout: str, dtype: torch.dtype) -> None:
    heads, kv_heads, bs, counts, images, image_only = CASES[case]
    d = 128
    gen = torch.Generator().manual_seed(len(case) * 7 + bs)
    width = max(counts) + 5  # masks wider than the widest row, as a plan with room to grow
    nb = -(-width // bs)
    n_blocks = len(counts) * nb + 3
    key, value, k_t, k, v = paged_cache(n_blocks, kv_heads, bs, d, dtype, layout, gen)
    blocks = torch.randperm(n_blocks, generator=gen)[: len(counts) * nb].view(len(counts), nb)  # shuffled
    # Queries that make every head group appear: scaled so that heads differ in how peaked they are. In the
    # cache's dtype, as vLLM's query is (kernel A reads q in it: q.K on tensor cores).
    q = torch.randn(len(counts), heads, d, generator=gen) * torch.linspace(0.3, 3.0, heads)[None, :, None]
    q = q.to(dtype).float()
    omega = [4.0, 0.5, 0.0, 1.0][: len(counts)]
    rows = masks(counts, width, images, image_only, omega, kappa=0.2)
    scale = d**-0.5
    count_t = torch.tensor(counts)
    out, groups, _ = aligned_decode(q, key, value, k_t, False, blocks.reshape(-1), count_t, rows, scale, kv_heads)
    want, _, want_groups = reference(q, k, v, blocks, counts, rows, scale)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert groups is not None
    for name in ("semantic", "core", "global_", "stage1", "stage2"):
        assert torch.equal(getattr(groups, name), getattr(want_groups, name)), name
    # Not vacuous: both stages moved heads, and the result differs from plain attention.
    assert bool(groups.stage1.any()) and bool(groups.stage2.any())
    plain, _, _ = aligned_decode(
        q, key, value, k_t, False, blocks.reshape(-1), count_t, rows, scale, kv_heads, align=False
    )
    assert float((plain - out).abs().max()) > 1e-3


def test_sharded_heads_equal_the_whole_layer() -> None:
    """Tensor parallelism: two shards of the heads, each running kernel A, the torch operator around the gather
    (align_sharded), kernel C, give the whole layer's output (the gather here: both shards' partials, in order)."""
    heads, kv_heads, bs, counts, images, image_only = CASES["qwen2vl-7b"]
    d, gen = 128, torch.Generator().manual_seed(3)
    width = max(counts) + 1
    nb = -(-width // bs)
    key, value, k_t, k, v = paged_cache(len(counts) * nb, kv_heads, bs, d, torch.float32, "flash", gen)
    blocks = torch.arange(len(counts) * nb).view(len(counts), nb)
    q = torch.randn(len(counts), heads, d, generator=gen) * torch.linspace(0.3, 3.0, heads)[None, :, None]
    rows = masks(counts, width, images, image_only, [2.0] * len(counts), kappa=0.2)
    count_t, half, kv_half = torch.tensor(counts), heads // 2, kv_heads // 2
    shard_q = [q[:, i * half : (i + 1) * half].contiguous() for i in range(2)]
    shard_k = [key[:, i * kv_half : (i + 1) * kv_half] for i in range(2)]
    shard_v = [value[:, i * kv_half : (i + 1) * kv_half] for i in range(2)]
    packed = torch.stack(
        [  # what each shard contributes to the gather, from its own heads' scores
            shard_partials(
                paged_scores(shard_q[i], shard_k[i], k_t, blocks.reshape(-1), count_t, width, d**-0.5, kv_half),
                rows.key_bias,
                rows.semantic_keys,
                rows.other_keys,
                rows.kappa,
            )[4]
            for i in range(2)
        ]
    )
    outs = []
    for i in range(2):
        part, groups, moved = aligned_decode(
            shard_q[i],
            shard_k[i],
            shard_v[i],
            k_t,
            False,
            blocks.reshape(-1),
            count_t,
            rows,
            d**-0.5,
            kv_half,
            shards=lambda _: packed,
        )
        assert groups is not None and moved is not None and bool(moved.any())
        outs.append(part)
    want, _, _ = reference(q, k, v, blocks, counts, rows, d**-0.5)
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-5, atol=1e-5)


def test_a_row_with_a_single_global_head() -> None:
    """The global heads' mean over exactly one head (and rows with none): the case where the count that divides
    the sum matters most. Seeds are searched until the torch operator finds a row with one global head whose
    other heads stage 1 moves; the kernels must then give its output and groups."""
    heads, kv_heads, bs, d = 8, 2, 16, 128
    counts, width = [40, 33, 47], 48
    nb = -(-width // bs)
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        key, value, k_t, k, v = paged_cache(len(counts) * nb, kv_heads, bs, d, torch.float32, "flash", gen)
        blocks = torch.arange(len(counts) * nb).view(len(counts), nb)
        q = torch.randn(len(counts), heads, d, generator=gen) * torch.linspace(0.3, 4.0, heads)[None, :, None]
        rows = masks(counts, width, [(1, 12)], False, [2.0] * len(counts), kappa=0.3)
        want, _, want_groups = reference(q, k, v, blocks, counts, rows, d**-0.5)
        one = (want_groups.global_.sum(-1) == 1) & want_groups.stage1.any(-1)  # type: ignore[attr-defined]
        if bool(one.any()):
            break
    else:
        pytest.fail("no seed gave a row with exactly one global head")
    out, groups, _ = aligned_decode(
        q, key, value, k_t, False, blocks.reshape(-1), torch.tensor(counts), rows, d**-0.5, kv_heads
    )
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert groups is not None
    for name in ("semantic", "core", "global_", "stage1", "stage2"):
        assert torch.equal(getattr(groups, name), getattr(want_groups, name)), name


def test_score_offsets_do_not_wrap_past_2_31() -> None:
    """A recompute prefill after preemption aligns every row from the last prompt row on: 2,048 rows x 32 heads x
    32k keys of scores is 2**31 elements, where int32 offsets wrap. The kernels' own offset arithmetic, probed."""
    for row, heads, keys in [(2047, 32, 32768), (70000, 28, 40000), (3, 32, 4096)]:
        assert score_offsets(row, heads, keys) == (row * heads * keys, (row * heads + heads - 1) * keys)


def test_row_chunks_bound_the_scores_and_cover_every_row() -> None:
    for rows, heads, keys, limit in [(2048, 32, 32768, 1 << 25), (5, 4, 10, 80), (7, 32, 1 << 20, 1000), (0, 8, 8, 64)]:
        chunks = row_chunks(rows, heads, keys, limit)
        assert [i for a, b in chunks for i in range(a, b)] == list(range(rows))
        assert all(b > a for a, b in chunks)
        assert all((b - a) * heads * keys <= limit for a, b in chunks if b - a > 1)  # one row may exceed it
    assert len(row_chunks(2048, 32, 32768)) == 64  # the preemption case: 64 launches of 32 rows


def test_rows_in_chunks_equal_one_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the scores bounded to two rows' worth, the rows run in chunks and give the same output, groups and
    stage masks as one launch over every row."""
    heads, kv_heads, bs, counts, images, image_only = CASES["qwen2vl-7b"]
    d, gen = 128, torch.Generator().manual_seed(5)
    width = max(counts) + 3
    nb = -(-width // bs)
    key, value, k_t, _, _ = paged_cache(len(counts) * nb + 2, kv_heads, bs, d, torch.float32, "flash", gen)
    blocks = torch.randperm(len(counts) * nb + 2, generator=gen)[: len(counts) * nb].reshape(-1)
    q = torch.randn(len(counts), heads, d, generator=gen) * torch.linspace(0.3, 3.0, heads)[None, :, None]
    rows = masks(counts, width, images, image_only, [4.0, 0.5, 0.0, 1.0], kappa=0.2)
    count_t = torch.tensor(counts)
    whole, whole_groups, _ = aligned_decode(q, key, value, k_t, False, blocks, count_t, rows, d**-0.5, kv_heads)
    monkeypatch.setattr(sevi_decode, "SCORES_ELEMENTS", 2 * heads * width)
    assert len(row_chunks(len(counts), heads, width)) == 2
    parts, groups, _ = aligned_decode(q, key, value, k_t, False, blocks, count_t, rows, d**-0.5, kv_heads)
    assert torch.equal(parts, whole)
    assert groups is not None and whole_groups is not None
    for name in ("semantic", "core", "global_", "stage1", "stage2"):
        assert torch.equal(getattr(groups, name), getattr(whole_groups, name)), name


def test_scores_past_a_rows_keys_are_zero_and_unread_keys_stay_unread() -> None:
    """Kernel A loops to each row's own key count and then writes zeros up to the masks' width: a short row beside
    a long one gets exact scores over its keys and zeros past them (the sharded operator reads the whole width)."""
    heads, kv_heads, bs, d = 8, 2, 16, 128
    gen = torch.Generator().manual_seed(9)
    counts, width = [100, 5], 112
    nb = -(-width // bs)
    key, _, k_t, k, _ = paged_cache(2 * nb, kv_heads, bs, d, torch.float32, "flash", gen)
    blocks = torch.arange(2 * nb).view(2, nb)
    q = torch.randn(2, heads, d, generator=gen)
    scores = paged_scores(q, key, k_t, blocks.reshape(-1), torch.tensor(counts), width, d**-0.5, kv_heads)
    assert torch.equal(scores[1, :, counts[1] :], torch.zeros(heads, width - counts[1]))
    want = torch.einsum("gjd,gkd->gjk", q[1].view(kv_heads, heads // kv_heads, d), k[blocks[1, 0], :, : counts[1]])
    torch.testing.assert_close(scores[1, :, : counts[1]], want.reshape(heads, -1) * d**-0.5, rtol=1e-5, atol=1e-5)


def test_warm_up_launches_each_kernel_at_a_layer_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine-load warm-up launches kernels A, B and C once each, in FlashAttention's layout and the cache
    dtype (on a GPU that compiles the variant every later step uses)."""
    launched: list[str] = []
    for name in ("_scores_kernel", "_align_kernel", "_values_kernel"):
        kernel = getattr(sevi_decode, name)

        class Spy:
            def __init__(self, kernel: object, name: str) -> None:
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid: object) -> object:
                launched.append(self.name)
                return self.kernel[grid]  # type: ignore[index]

        monkeypatch.setattr(sevi_decode, name, Spy(kernel, name))
    sevi_decode.warm_up(28, 4, 128, torch.bfloat16, 16, torch.device("cpu"))
    assert launched == ["_scores_kernel", "_align_kernel", "_values_kernel"]
