"""Unit tests of the vLLM plugin pieces that need no engine: parameters, cache layout, row plan, pairing."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from models.alignment import align_scores  # noqa: E402
from models.conservativeness import resolve_alignment  # noqa: E402
from models.contrastive import contrast_logits  # noqa: E402
from models.vllm_plugin.bound_layer import bound_layer  # noqa: E402
from models.vllm_plugin.cpu_backend import cache_layout, paged_cpu_kv, read_cpu_kv  # noqa: E402
from models.vllm_plugin.logits_processor import SeviLogitsProcessor  # noqa: E402
from models.vllm_plugin.paged_read import PagedKV, block_scores, block_values, c_kernel_for  # noqa: E402
from models.vllm_plugin.params import parse_row_request, to_extra_args  # noqa: E402
from models.vllm_plugin.plan import GROWTH, StepMetadata, StepPlan, build_plan, layer_index, step_plan  # noqa: E402
from models.vllm_plugin.rows import align_layer  # noqa: E402
from models.vllm_plugin.state import STATE  # noqa: E402
from tests.plugin_rows import EOS, IMAGE, add_rows, processor  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[None]:
    STATE.reset()
    yield
    STATE.reset()


@pytest.mark.parametrize("extra", [
    {"conservativeness": 1.5}, {"conservativeness": "loud"}, {"omega": -1}, {"omega": "x"}, {"kappa": 2},
    {"start_layer": -1}, {"start_layer": "two"}, {"sevi_role": "main"}, {"sevi_role": "boss", "sevi_pair": "p"},
])
def test_validate_params_refuses_bad_values(extra: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SeviLogitsProcessor.validate_params(SamplingParams(extra_args=extra))


def test_validate_params_accepts_good_values_and_ignores_foreign_args() -> None:
    SeviLogitsProcessor.validate_params(SamplingParams(extra_args={"conservativeness": "balanced", "kappa": 0.3}))
    SeviLogitsProcessor.validate_params(SamplingParams(extra_args={"unrelated": 1}))
    SeviLogitsProcessor.validate_params(SamplingParams())
    # vllm_xargs from a form may carry numbers as strings
    row = parse_row_request({"omega": "2.5", "start_layer": "1"}, 4)
    assert row.alignment is not None and row.alignment.omega == 2.5 and row.alignment.start_layer == 1


def test_extra_args_round_trip_and_contrast_rows_are_never_aligned() -> None:
    params = resolve_alignment(None, 4, omega=3.0, start_layer=1, kappa=0.6)
    main = parse_row_request(to_extra_args(params, role="main", pair="p", key="k"), 4)
    contrast = parse_row_request(to_extra_args(params, role="contrast", pair="p"), 4)
    assert main.alignment == params and main.aligned and main.key == "k"
    assert contrast.alignment == params and not contrast.aligned


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


def test_layer_index_from_vllm_layer_names() -> None:
    assert layer_index("language_model.model.layers.3.self_attn.attn") == 3
    assert layer_index("vision_tower.encoder.layers.1.attn") == 1
    assert layer_index("lm_head") is None


def test_plan_picks_last_prompt_row_at_prefill_and_each_decode_row() -> None:
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, omega=2.0, start_layer=1))
    prompt = [1, IMAGE, IMAGE, 7, 8, 9]
    # Row 0: prefill of the whole prompt; row 1: text-only (never aligned); row 2: decode; row 3: off.
    add_rows(proc, [(0, on, prompt, []), (1, on, [1, 7, 8], []), (2, on, prompt, [11, 12]), (3, None, prompt, [4])], 4)
    qsl = torch.tensor([0, 6, 9, 10, 11])
    seq = torch.tensor([6, 3, 8, 7])
    table = torch.arange(8).view(4, 2)
    plan = build_plan(STATE, qsl, seq, table, 32, torch.device("cpu"))
    assert plan is not None
    assert plan.token_index.tolist() == [5, 9]  # last prompt row of row 0, the decode row of row 2
    assert plan.batch_row.tolist() == [0, 2] and plan.key_count.tolist() == [6, 8]
    # The masks are wider than the widest row (room to grow in place): nothing past a row's keys is valid.
    assert plan.num_keys == 32 and not plan.valid[:, 8:].any()  # up to the end of the rows' block of 32
    assert plan.semantic[0, :8].tolist() == [False] * 3 + [True] * 3 + [False] * 2  # e=2 < j <= 5
    assert plan.other[1, :8].tolist() == [True] * 3 + [False] * 5  # LLaVA: every key up to e
    # A partial prefill chunk that stops before the last prompt row aligns nothing.
    assert build_plan(STATE, torch.tensor([0, 3, 3, 3, 3]), torch.tensor([3, 0, 0, 0]), table, 32,
                      torch.device("cpu")) is None


def _pair_batch(proc: SeviLogitsProcessor) -> tuple[list[int], list[int]]:
    params = resolve_alignment(None, 4, omega=2.0, start_layer=1, contrast=True)
    main_out: list[int] = [9]
    contrast_out: list[int] = [9]
    add_rows(proc, [(0, to_extra_args(params, role="main", pair="p"), [1, IMAGE, 7], main_out),
                (1, to_extra_args(params, role="contrast", pair="p"), [1, IMAGE, IMAGE, 7], contrast_out),
                (2, None, [1, 7], [3])], 3)
    return main_out, contrast_out


def test_pair_in_lockstep_combines_and_forces_the_same_token_on_both_rows() -> None:
    proc = processor()
    _pair_batch(proc)
    STATE.observe_seq_lens(torch.tensor([4, 5, 3]))  # both rows sample their output index 1
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    want = int(contrast_logits(logits[:1], logits[1:2]).argmax())
    third = logits[2].clone()
    out = proc.apply(logits.clone())
    assert int(out[0].argmax()) == want and int(out[1].argmax()) == want
    assert torch.isinf(out[:2]).sum() == 2 * 49  # one-hot: vLLM's sampler can pick nothing else
    assert torch.equal(out[2], third)  # rows outside pairs are untouched


def test_pair_out_of_lockstep_is_dissolved_main_goes_on_alone_contrast_ends() -> None:
    proc = processor()
    main_out, _ = _pair_batch(proc)
    STATE.observe_seq_lens(torch.tensor([4, 3, 3]))  # the contrast row is mid-prefill (e.g. resumed)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], logits[0])  # the main row keeps its own (aligned) logits
    assert int(out[1].argmax()) == EOS and torch.isinf(out[1]).sum() == 49
    assert "p" in STATE.dissolved_pairs
    # Later steps stay dissolved even when the rows line up again.
    main_out.append(4)
    proc.update_state(None)
    STATE.observe_seq_lens(torch.tensor([5, 5, 3]))
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], logits[0]) and int(out[1].argmax()) == EOS
    # The mark lives as long as a row of the pair does (a long-running server must not keep them all).
    STATE.remove(1)
    assert "p" in STATE.dissolved_pairs
    STATE.remove(0)
    assert "p" not in STATE.dissolved_pairs


def test_pair_with_partner_missing_is_dissolved_and_neither_sampling_waits() -> None:
    proc = processor()
    params = resolve_alignment(None, 4, omega=2.0, start_layer=1, contrast=True)
    add_rows(proc, [(0, to_extra_args(params, role="main", pair="q"), [1, IMAGE, 7], [])], 1)
    STATE.observe_seq_lens(torch.tensor([2]))  # partial prefill: nothing to decide yet
    logits = torch.randn(1, 20)
    assert torch.equal(proc.apply(logits.clone()), logits) and "q" not in STATE.dissolved_pairs
    proc.update_state(None)
    STATE.observe_seq_lens(torch.tensor([3]))  # samples, but its contrast row is not in the batch
    assert torch.equal(proc.apply(logits.clone()), logits) and "q" in STATE.dissolved_pairs


def _random_cpu_cache(n_blocks: int, heads: int, bs: int, hd: int, seed: int,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, bool, bool]:
    """A CPU cache filled through the kernel's own writer (every slot), and its probed K/V layout."""
    from vllm import _custom_ops as ops

    gen = torch.Generator().manual_seed(seed)
    cache = torch.zeros(n_blocks, heads, bs, 2 * hd, dtype=dtype)
    kc, vc = cache.view(n_blocks, heads, 2 * bs, hd).chunk(2, dim=2)
    n = n_blocks * bs
    k, v = torch.randn(n, heads, hd, generator=gen).to(dtype), torch.randn(n, heads, hd, generator=gen).to(dtype)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(n, dtype=torch.long), "vec")
    k_t, v_t = cache_layout("vec", dtype, bs, hd)
    return cache, k_t, v_t


# (keys, block size): a partial block, one full, two full, 2 + a partial; vLLM's CPU block of 128 keys.
# The 16-bit caches (vLLM's --dtype bfloat16 / float16) on the larger shapes.
@pytest.mark.parametrize(("num_keys", "bs", "dtype"), [
    (20, 32, torch.float32), (32, 32, torch.float32), (64, 32, torch.float32), (75, 32, torch.float32),
    (111, 128, torch.float32), (300, 128, torch.float32), (75, 32, torch.bfloat16), (300, 128, torch.bfloat16),
    (75, 32, torch.float16), (300, 128, torch.float16)])
def test_block_wise_scores_and_values_equal_the_gathered_ones(num_keys: int, bs: int, dtype: torch.dtype,
                                                             kv_path: str) -> None:
    hd, g, rep = 32, 2, 3
    cache, k_t, v_t = _random_cpu_cache(12, g, bs, hd, seed=num_keys, dtype=dtype)
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
    for paged in (PagedKV(k, v, False, False),
                  PagedKV(k.transpose(-1, -2).contiguous(), v.transpose(-1, -2).contiguous(), True, True)):
        torch.testing.assert_close(block_scores(q, paged, blocks.reshape(-1), num_keys, 0.5), want,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block_values(probs, paged, blocks.reshape(-1), g), want_v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rep", [1, 2, 4])
def test_rows_of_different_lengths_read_only_their_own_keys(rep: int, kernel_build: str) -> None:
    """With key counts the kernel neither reads past a row's own keys (NaN there changes nothing) nor
    leaves garbage in its scores there (0, for the key mask to drop)."""
    bs, g, hd, num_keys = 128, 2, 32, 300
    cache, k_t, v_t = _random_cpu_cache(12, g, bs, hd, seed=11)
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
    torch.testing.assert_close(block_values(probs, paged, blocks.reshape(-1), g, key_counts=counts), want_v,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spread", [1.0, 40.0])  # 40: most weights underflow to 0, as in peaked heads
def test_values_kernel_takes_the_softmax_as_torch_does(spread: float, kernel_build: str) -> None:
    """The kernel's softmax (vectorised exp in place before p.V, the division after) equals torch's, masked
    keys and rows of different lengths included; its p.V equals the torch path's on torch's softmax."""
    from models.alignment import MASKED
    bs, g, rep, hd, num_keys = 128, 2, 3, 32, 300
    cache, k_t, v_t = _random_cpu_cache(12, g, bs, hd, seed=5)
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
    torch.testing.assert_close(exps / exps.sum(-1, keepdim=True), want_p.masked_fill(~own, 0.0), rtol=2e-6,
                               atol=1e-12)
    assert bool((inplace.masked_select(mask[:, None] & own) == 0).all())


@pytest.mark.parametrize("hd", [32, 128])
def test_amx_bfloat16_cache_layout_is_learned_and_read(hd: int) -> None:
    """vLLM's AMX kernel (bfloat16 on CPUs with AMX) keeps K in tiles of 16 keys x pairs of dims and V in
    pairs of keys: no strided view. The backend learns the layout as a permutation of each block (from
    the same writer the AMX kernel uses, which runs on any x86) and reads K/V by gathering."""
    from vllm import _custom_ops as ops

    from models.vllm_plugin.cpu_backend import cache_order, cpu_kv

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
    assert paged.key_order is not None and paged.block_size == bs and c_kernel_for(paged) is None
    k_order, _ = cache_order("amx", torch.bfloat16, bs, hd)
    assert not torch.equal(k_order, torch.arange(bs * hd))  # not the row-major layout under another name
    blocks = torch.tensor([[4, 0, 2], [1, 5, 3]])
    slots = (blocks[:, :, None] * bs + torch.arange(bs)).reshape(2, -1)[:, :num_keys]  # [R, K] cache slots
    keys, vals = k[slots].float().transpose(1, 2), v[slots].float().transpose(1, 2)  # [R, G, K, D]
    q = torch.randn(2, g, rep, hd, generator=gen)
    want = torch.matmul(q, keys.transpose(-1, -2)).mul(0.2).reshape(2, g * rep, num_keys)
    torch.testing.assert_close(block_scores(q, paged, blocks.reshape(-1), num_keys, 0.2), want, rtol=1e-5, atol=1e-5)
    probs = torch.softmax(torch.randn(2, g * rep, num_keys, generator=gen), -1)
    torch.testing.assert_close(block_values(probs, paged, blocks.reshape(-1), g),
                               torch.matmul(probs.view(2, g, rep, num_keys), vals), rtol=1e-5, atol=1e-5)


def k_blocks(cache: torch.Tensor, k_t: bool) -> torch.Tensor:
    """K `[N, G, bs, D]` row-major from the CPU cache."""
    n, g, bs, two_d = cache.shape
    r = cache.view(n, g, 2, bs * two_d // 2)[:, :, 0]
    return r.view(n, g, two_d // 2, bs).transpose(-1, -2) if k_t else r.view(n, g, bs, two_d // 2)


def v_blocks(cache: torch.Tensor, v_t: bool) -> torch.Tensor:
    n, g, bs, two_d = cache.shape
    r = cache.view(n, g, 2, bs * two_d // 2)[:, :, 1]
    return r.view(n, g, two_d // 2, bs).transpose(-1, -2) if v_t else r.view(n, g, bs, two_d // 2)


@functools.lru_cache(maxsize=1)
def _avx2_kernel() -> Any:
    from models.kernels.paged_kv import flags_for, load

    flags = flags_for("AVX2")
    assert flags is not None
    return load(flags)


def _use_kernel(build: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make paged_read.py read K/V with the C kernel as built for this CPU ("native") or for AVX2 ("avx2": its own
    tile width, 8 floats, not AVX-512's 16; where the CPU has AVX2)."""
    import models.vllm_plugin.paged_read as paged_read

    if build == "avx2":
        if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
            pytest.skip("this CPU has no AVX2")
        assert _avx2_kernel() is not None, "the AVX2 kernel did not build here"
        monkeypatch.setattr(paged_read, "kernel", _avx2_kernel)
    else:
        assert paged_read.kernel() is not None, "the C kernel did not build here"


@pytest.fixture(params=["native", "avx2"])
def kernel_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The C kernel, both builds (see _use_kernel)."""
    _use_kernel(str(request.param), monkeypatch)
    return str(request.param)


@pytest.fixture(params=["kernel", "kernel-avx2", "torch"])
def kv_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every way the aligned rows read K/V: the C kernel in place (both builds) and the torch gather + bmm."""
    import models.vllm_plugin.paged_read as paged_read

    if request.param == "torch":
        monkeypatch.setattr(paged_read, "kernel", lambda: None)
    else:
        _use_kernel("avx2" if request.param == "kernel-avx2" else "native", monkeypatch)
    return str(request.param)


def _dense(plan: Any, layer: int, query: torch.Tensor, stock: torch.Tensor, cache: torch.Tensor,
           table: torch.Tensor, k_t: bool, v_t: bool, g: int) -> torch.Tensor:
    """What align_layer must write: each aligned row recomputed alone from gathered K/V, the rest `stock`."""
    heads, hd = query.shape[1], query.shape[2]
    want = stock.clone()
    for i, (tok, b) in enumerate(zip(plan.token_index.tolist(), plan.batch_row.tolist(), strict=True)):
        if int(plan.start_layer[i]) > layer:
            continue
        k, v = read_cpu_kv(cache, table[b : b + 1].long(), k_t, v_t)
        k = k[0, :, : plan.num_keys].repeat_interleave(heads // g, 0).float()  # [H, K, D]
        v = v[0, :, : plan.num_keys].repeat_interleave(heads // g, 0).float()
        scores = torch.einsum("hd,hkd->hk", query[tok].float(), k)[None] * hd**-0.5
        aligned, _ = align_scores(scores, plan.valid[i : i + 1], plan.semantic[i : i + 1], plan.other[i : i + 1],
                                  plan.omega[i : i + 1], plan.kappa[i : i + 1])
        probs = torch.softmax(aligned.masked_fill(~plan.valid[i, None, None], float("-inf")), -1)
        want[tok] = torch.einsum("hk,hkd->hd", probs[0], v).reshape(-1).to(want.dtype)
    return want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_align_layer_equals_dense_alignment_on_gathered_kv(kv_path: str, dtype: torch.dtype) -> None:
    """Mixed step: a recomputing prefill (several aligned rows of one sequence), decode rows whose keys span
    several blocks, a row with a later start layer, and rows that must stay untouched. In float32, and in
    bfloat16 as vLLM runs a model served with --dtype bfloat16 (query, cache and output all bfloat16)."""
    proc = processor()
    knobs = dict(omega=2.0, kappa=0.6)
    early = to_extra_args(resolve_alignment(None, 4, start_layer=1, **knobs))  # type: ignore[arg-type]
    late = to_extra_args(resolve_alignment(None, 4, start_layer=3, **knobs))  # type: ignore[arg-type]
    prompt = [1] + [IMAGE] * 8 + [7, 8, 9]  # 12 tokens, e = 8
    long_out = [11] * 60  # 72 keys: three blocks of 32
    add_rows(proc, [(0, early, prompt, [11, 12, 13]),  # prefill of prompt + outputs: rows 11..14 aligned
                (1, early, prompt, long_out), (2, None, prompt, [4]), (3, late, prompt, long_out[:40])], 4)
    q_len = torch.tensor([15, 1, 1, 1])
    seq = torch.tensor([15, 73, 14, 53])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q_len.cumsum(0)])
    bs, hd, g, heads = 32, 32, 2, 4
    cache, k_t, v_t = _random_cpu_cache(16, g, bs, hd, seed=7, dtype=dtype)
    table = torch.randperm(16, generator=torch.Generator().manual_seed(3))[:12].view(4, 3).int()
    plan = build_plan(STATE, qsl, seq, table, bs, torch.device("cpu"))
    assert plan is not None and plan.token_index.tolist() == [11, 12, 13, 14, 15, 17]
    n_tokens = int(qsl[-1])
    query = torch.randn(n_tokens, heads, hd, generator=torch.Generator().manual_seed(5)).to(dtype)
    stock = torch.randn(n_tokens, heads * hd, generator=torch.Generator().manual_seed(6)).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16 output: rounded to 8 bits of mantissa
    for layer in (1, 3):
        out = stock.clone()
        STATE.step_counts, STATE.pending = None, []
        paged = paged_cpu_kv(cache, k_t, v_t)
        # With the C kernel the layer runs bound calls (kernel + compiled operator), else the general path.
        rows = plan.rows_at(layer)
        bound = bound_layer(rows, paged, hd**-0.5, g, heads, hd) if rows is not None else None
        assert rows is not None and (bound is not None) == (kv_path != "torch")
        align_layer(plan, layer, query, out, paged, hd**-0.5, g, STATE)
        want = _dense(plan, layer, query, stock, cache, table, k_t, v_t, g)
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
        # The aligned rows written (sequence 3's from its start layer on), nothing else.
        assert int((out != stock).any(-1).sum()) == (5 if layer == 1 else 6)
        # Telemetry: one aligned row per (row, layer); sequence 3 only from its start layer on.
        counts = STATE.counts()
        assert counts is not None and counts[:, 0].tolist() == ([4, 1, 0, 0] if layer == 1 else [4, 1, 0, 1])


def _stock_attention(query: torch.Tensor, cache: torch.Tensor, md: Any) -> torch.Tensor:
    """vLLM's CPU kernel on `md`'s rows, called as CPUAttentionBackendImpl.forward calls it."""
    from vllm import _custom_ops as ops

    n_blocks, kv_heads, bs, _ = cache.shape
    key_cache, value_cache = cache.view(n_blocks, kv_heads, 2 * bs, -1).chunk(2, dim=2)
    out = torch.zeros(md.num_actual_tokens, query.shape[1], query.shape[2], dtype=query.dtype)
    ops.cpu_attention_with_kv_cache(
        query=query[: md.num_actual_tokens], key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=md.query_start_loc, seq_lens=md.seq_lens, scale=query.shape[2] ** -0.5, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=md.block_table, softcap=0,
        scheduler_metadata=md.scheduler_metadata, s_aux=None, dynamic_causal=None, k_scale=1.0, v_scale=1.0,
        kv_cache_dtype="auto")
    return out


def test_stock_kernel_runs_only_on_the_sequences_not_wholly_aligned() -> None:
    """A step with a prefill chunk (its last rows aligned), an aligned decode row, an unaligned one and one
    whose start layer comes later: per layer the stock kernel's metadata keeps the sequences with an
    unaligned row, and its output on them equals the full call's at the same rows."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    from models.vllm_plugin.cpu_stock import stock_rows

    proc = processor()
    knobs = dict(omega=2.0, kappa=0.6)
    early = to_extra_args(resolve_alignment(None, 4, start_layer=1, **knobs))  # type: ignore[arg-type]
    late = to_extra_args(resolve_alignment(None, 4, start_layer=3, **knobs))  # type: ignore[arg-type]
    prompt = [1] + [IMAGE] * 8 + [7, 8, 9]
    add_rows(proc, [(0, early, prompt, [11, 12, 13]), (1, early, prompt, [11] * 60), (2, None, prompt, [4]),
                (3, late, prompt, [11] * 40)], 4)
    q_len = torch.tensor([15, 1, 1, 1])
    seq = torch.tensor([15, 73, 14, 53], dtype=torch.int32)
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q_len.cumsum(0)]).int()
    bs, hd, g, heads = 32, 32, 2, 4
    cache, _, _ = _random_cpu_cache(16, g, bs, hd, seed=7)
    table = torch.randperm(16, generator=torch.Generator().manual_seed(3))[:12].view(4, 3).int()
    plan = build_plan(STATE, qsl, seq, table, bs, torch.device("cpu"))
    assert plan is not None
    n_tokens = int(qsl[-1])
    md = CPUAttentionMetadata(
        num_actual_tokens=n_tokens, max_query_len=15, query_start_loc=qsl, max_seq_len=73, seq_lens=seq,
        block_table=table, slot_mapping=torch.arange(n_tokens), causal=True,
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=4, num_heads=heads, num_kv_heads=g, head_dim=hd, seq_lens=seq, dtype=torch.float32,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa="vec", enable_kv_split=True))
    query = torch.randn(n_tokens, heads, hd, generator=torch.Generator().manual_seed(5))
    full = _stock_attention(query, cache, md)
    kw = dict(num_heads=heads, num_kv_heads=g, head_dim=hd, dtype=torch.float32, isa="vec", kv_cache_dtype="auto")
    # Layer 1: sequence 1's decode row is its whole query; sequence 0 keeps its prompt rows, 3 starts later.
    # Layer 3: sequence 3's row too.
    for layer, kept in ((1, [0, 2, 3]), (3, [0, 2])):
        rows = plan.rows_at(layer)
        assert rows is not None
        found = stock_rows(md, rows.batch_row, **kw)  # type: ignore[arg-type]
        assert found is not None and found.metadata is not None
        want_tokens = torch.cat([torch.arange(int(qsl[b]), int(qsl[b + 1])) for b in kept])
        assert torch.equal(found.tokens, want_tokens)
        assert found.metadata.seq_lens.tolist() == seq[kept].tolist()
        assert torch.equal(found.metadata.block_table, table[kept])
        part = _stock_attention(query.index_select(0, found.tokens), cache, found.metadata)
        torch.testing.assert_close(part, full[found.tokens], rtol=1e-6, atol=1e-6)
        assert found.span is None  # rows of several sequences with an aligned one between: gathered
    # Only the prefill chunk keeps unaligned rows (the decode rows all aligned): one range, read in place.
    chunk = stock_rows(md, torch.tensor([0, 1, 2, 3]), **kw)  # type: ignore[arg-type]
    assert chunk is not None and chunk.span == (0, 15) and torch.equal(chunk.tokens, torch.arange(15))
    torch.testing.assert_close(_stock_attention(query[:15], cache, chunk.metadata), full[:15], rtol=1e-6, atol=1e-6)
    # Every sequence keeps an unaligned row: the stock call as is; every row aligned: no stock rows.
    assert stock_rows(md, torch.tensor([0]), **kw) is None  # type: ignore[arg-type]
    none_left = stock_rows(md, torch.tensor([0] * 15 + [1, 2, 3]), **kw)  # type: ignore[arg-type]
    assert none_left is not None and none_left.tokens.numel() == 0 and none_left.metadata is None


PREPARED_TENSORS = ("key_bias", "semantic_keys", "other_keys", "kappa", "blend", "on")


def _assert_same_rows(moved: StepPlan, fresh: StepPlan) -> None:
    """A plan moved on in place selects the same rows as one built afresh, with the same masks over every row's
    keys (the widths may differ: each is the widest row plus the room the plan had when built)."""
    assert torch.equal(moved.key_count, fresh.key_count) and torch.equal(moved.blocks, fresh.blocks)
    width = int(moved.key_count.max())
    for plan in (moved, fresh):
        past = torch.arange(plan.num_keys)[None, :] >= plan.key_count[:, None]
        assert not (plan.valid & past).any() and not (plan.semantic & past).any() and not (plan.other & past).any()
    for name in ("valid", "semantic", "other"):
        assert torch.equal(getattr(moved, name)[:, :width], getattr(fresh, name)[:, :width]), name
    for layer in (1, 3):
        ra, rb = moved.rows_at(layer), fresh.rows_at(layer)
        assert ra is not None and rb is not None and ra.identity == rb.identity
        assert torch.equal(ra.token_index, rb.token_index) and torch.equal(ra.block_index, rb.block_index)
        assert torch.equal(ra.key_count, rb.key_count)
        for name in ("key_bias", "semantic_keys", "other_keys"):
            assert torch.equal(getattr(ra.prepared, name)[..., :width], getattr(rb.prepared, name)[..., :width])
        assert torch.equal(ra.prepared.kappa, rb.prepared.kappa) and torch.equal(ra.prepared.blend, rb.prepared.blend)


@pytest.mark.parametrize("joined", [False, True], ids=["after-decode", "after-prefill"])
def test_decode_steps_move_the_plan_on_in_place_as_a_fresh_one_would_be(joined: bool) -> None:
    """Decode over the same rows: the last step's plan, moved on in place (one more key per row), selects and
    masks what a plan built from scratch does, its row sets and their bound calls kept until its room is
    spent (then block ids read again); a step it cannot take (not one more decode token per row, a changed
    batch) is built afresh.
    joined: the first step is the one where row 2 joined (its whole prompt one chunk, beside the other rows'
    decode tokens)."""
    proc = processor()
    knobs = dict(omega=2.0, kappa=0.6)
    early = to_extra_args(resolve_alignment(None, 4, start_layer=1, **knobs))  # type: ignore[arg-type]
    late = to_extra_args(resolve_alignment(None, 4, start_layer=3, **knobs))  # type: ignore[arg-type]
    prompt = [1] + [IMAGE] * 8 + [7, 8, 9]  # 12 tokens, e = 8
    add_rows(proc, [(0, early, prompt, [11] * 19), (1, None, prompt, [4]), (2, late, prompt, [11] * 3),
                (3, early, [1, 7, 8], [5])], 4)
    table = torch.randperm(24, generator=torch.Generator().manual_seed(3))[:12].view(4, 3).int()
    bs = 32
    qsl = torch.arange(5, dtype=torch.int32)
    seq = torch.tensor([31, 14, 16, 4], dtype=torch.int32)
    first_qsl = qsl
    if joined:  # row 2 joins: its whole prompt is its chunk, its last prompt row the one aligned
        seq[2] = len(prompt)
        first_qsl = torch.tensor([0, 1, 2, 2 + len(prompt), 3 + len(prompt)], dtype=torch.int32)
    plan = build_plan(STATE, first_qsl, seq, table, bs, torch.device("cpu"))
    assert plan is not None and plan.decode is not None
    assert plan.token_index.tolist() == ([0, 1 + len(prompt)] if joined else [0, 2])  # row 3 has no image
    assert plan.room == 1  # row 0 fills its first block of 32 with the next key
    bound = None if joined else plan.rows_at(1)
    seq = seq + 1
    moved = build_plan(STATE, qsl, seq, table, bs, torch.device("cpu"), previous=plan)
    assert moved is plan and plan.room == 0
    assert joined or plan.rows_at(1) is bound  # kept: the rows did not move in the query
    _assert_same_rows(moved, build_plan(STATE, qsl, seq, table, bs, torch.device("cpu")))
    # No room left (row 0's next key starts a block the plan never read): the block ids are read again, the
    # masks widened, the row sets built again; then it moves on as before.
    seq = seq + 1
    kept = plan.rows_at(1)
    again = build_plan(STATE, qsl, seq, table, bs, torch.device("cpu"), previous=plan)
    assert again is plan and again.blocks.shape[1] == 2 and again.rows_at(1) is not kept
    assert again.room == min(GROWTH, 32 - int(seq[2]))  # row 2 comes to its block end first
    _assert_same_rows(again, build_plan(STATE, qsl, seq, table, bs, torch.device("cpu")))
    for _ in range(3):
        seq = seq + 1
        assert build_plan(STATE, qsl, seq, table, bs, torch.device("cpu"), previous=again) is again
        _assert_same_rows(again, build_plan(STATE, qsl, seq, table, bs, torch.device("cpu")))
    # A step that is not one more decode token per row, or a changed batch, is not one to move on to.
    assert not again.advance(STATE, qsl, seq + 2, table, bs)
    assert not again.advance(STATE, torch.tensor([0, 1, 2, 3, 5]), seq + 1, table, bs)
    add_rows(proc, [(1, early, prompt, [4])], 4)
    assert not again.advance(STATE, qsl, seq + 1, table, bs)
    # A prefill that aligns several rows of a sequence (recomputed after a preemption) is not one to move on.
    redo = build_plan(STATE, torch.tensor([0, 31, 32, 33, 34], dtype=torch.int32), torch.tensor([31, 14, 16, 4]),
                      table, bs, torch.device("cpu"))
    assert redo is not None and redo.token_index.shape[0] > 4 and redo.decode is None


def test_a_row_reaching_a_new_block_reads_its_id_even_when_the_widest_row_does_not() -> None:
    """vLLM writes a new block's id into the block table when a sequence's keys reach it. A shorter row
    crossing into its next block while the widest row stays within its blocks must read the new id, not
    whatever the table held there when the plan was built."""
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, omega=2.0, start_layer=1))
    prompt = [1] + [IMAGE] * 8 + [7, 8, 9]
    add_rows(proc, [(0, on, prompt, [11] * 30), (1, on, prompt, [11] * 3)], 2)
    table = torch.tensor([[1, 2, 3], [4, 99, 98]], dtype=torch.int32)  # row 1's second block: not yet allocated
    qsl = torch.arange(3, dtype=torch.int32)
    seq = torch.tensor([40, 14], dtype=torch.int32)
    plan = build_plan(STATE, qsl, seq, table, 16, torch.device("cpu"))
    assert plan is not None
    for _ in range(4):
        seq = seq + 1
        if int(seq[1]) == 17:
            table[1, 1] = 5  # the step that brings row 1's 17th key
        plan = build_plan(STATE, qsl, seq, table, 16, torch.device("cpu"), previous=plan)
        assert plan is not None
        fresh = build_plan(STATE, qsl, seq, table, 16, torch.device("cpu"))
        assert fresh is not None
        _assert_same_rows(plan, fresh)
        rows = plan.rows_at(1)
        assert rows is not None and rows.block_index.view(2, -1)[1, : -(-int(seq[1]) // 16)].tolist() == (
            [4, 5] if int(seq[1]) > 16 else [4])


def test_step_plan_is_built_once_per_step_and_only_with_alignment_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first attention layer of a step builds the plan (and keeps the step's seq_lens); the others get
    the same plan by one lookup; the next decode step derives its plan from it; a batch without aligned
    rows never builds one."""
    import models.vllm_plugin.plan as step_plans

    built: list[object] = []
    build = step_plans.build_plan
    monkeypatch.setattr(step_plans, "build_plan", lambda *a, **k: built.append(1) or build(*a, **k))
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, start_layer=1, omega=2.0, kappa=0.6))
    prompt = [1] + [IMAGE] * 8 + [7, 8, 9]
    add_rows(proc, [(0, on, prompt, [11] * 3), (1, None, prompt, [4])], 2)

    def md(seq: list[int]) -> SimpleNamespace:
        return SimpleNamespace(query_start_loc=torch.arange(3, dtype=torch.int32), seq_lens=torch.tensor(seq),
                               block_table=torch.arange(4).view(2, 2).int(), num_actual_tokens=2)

    STATE.begin_step(False)
    first = md([15, 13])
    plan = step_plan(STATE, first, 16, torch.device("cpu"))
    assert plan is not None and built == [1] and STATE.seq_lens is not None and int(STATE.seq_lens[0]) == 15
    for _ in range(3):  # the step's other layers
        assert step_plan(STATE, first, 16, torch.device("cpu")) is plan
    assert built == [1]
    STATE.begin_step(False)
    keys = plan.key_count.clone()
    nxt = step_plan(STATE, md([16, 14]), 16, torch.device("cpu"))
    assert nxt is plan and torch.equal(nxt.key_count, keys + 1) and built == [1, 1]  # moved on: a key more
    add_rows(proc, [(0, None, prompt, [11] * 4)], 2)  # alignment off for the whole batch
    STATE.begin_step(True)
    built.clear()
    assert step_plan(STATE, md([17, 15]), 16, torch.device("cpu")) is None and built == []


def test_decode_steps_read_nothing_back_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path's steady state: with the step's row counts on the host (StepMetadata, from vLLM's host
    copies), decode steps move the plan on, re-read block ids and widen masks without reading any tensor back
    (on a GPU each read would make the host wait for the device). Checked by making every read-back raise for
    200 decode steps that cross blocks of 16 and the masks' room many times."""
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, start_layer=1, omega=2.0, kappa=0.6))
    prompt = [1] + [IMAGE] * 8 + [7, 8, 9]
    add_rows(proc, [(0, on, prompt, [11]), (1, on, prompt[:-1], [4])], 2)
    table = torch.arange(64, dtype=torch.int32).view(2, 32)

    def step(seq: list[int]) -> StepPlan | None:
        STATE.begin_step(False)
        md = StepMetadata(torch.arange(3, dtype=torch.int32), torch.tensor(seq), table, 2)
        return step_plan(STATE, md, 16, torch.device("cpu"))

    first = step([13, 12])
    assert first is not None
    with monkeypatch.context() as m:
        for name in ("cpu", "tolist", "item", "numpy", "__bool__", "__int__"):
            def refuse(*args: object, _name: str = name, **kwargs: object) -> None:
                raise AssertionError(f"a decode step read a tensor back ({_name})")

            m.setattr(torch.Tensor, name, refuse)
        for n in range(1, 201):
            assert step([13 + n, 12 + n]) is first  # moved on in place, never built afresh
    assert first.key_count.tolist() == [213, 212] and first.key_count_host.tolist() == [213, 212]
    assert first.blocks[0].tolist() == list(range(14))  # the block ids were read again as keys reached them


def test_telemetry_is_counted_late_but_lands_on_the_right_rows() -> None:
    """Layers' telemetry is counted when the batch changes (or many layers are pending), not per step:
    the totals per request must be the same as counting every layer at once, across a move of rows."""
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, omega=2.0, start_layer=1))
    add_rows(proc, [(0, on, [1, IMAGE, 7], []), (1, on, [1, IMAGE, 8], []), (2, on, [1, IMAGE, 9], [])], 3)
    rows = [STATE.rows[i] for i in range(3)]
    stage1 = torch.tensor([[True, False, True, False], [False, False, False, False]])  # 2 and 0 heads
    stage2 = torch.tensor([[False, True, False, False], [True, True, True, False]])  # 1 and 3 heads
    batch_rows = torch.tensor([0, 2])
    steps = 300  # x 3 layers: past the pending bound, so some are counted mid-way
    for _ in range(steps):
        for _ in range(3):
            STATE.record(batch_rows, stage1, stage2)
        proc.update_state(None)  # a step without batch changes
    assert all(r is not None and r.telemetry == [0, 0, 0, 0] for r in rows)  # not folded yet
    # Rows 0 and 2 swap places: the counters must be folded before the indices change.
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)]))
    n = steps * 3
    assert rows[0] is not None and rows[0].telemetry == [n, n, n, 3 * n]
    assert rows[1] is not None and rows[1].telemetry == [0, 0, 0, 0]
    assert rows[2] is not None and rows[2].telemetry == [n, 0, n, 3 * n]
    assert STATE.rows[2] is rows[0] and STATE.step_counts is None and not STATE.pending


def test_telemetry_merged_over_shards_and_stages() -> None:
    """Two pipeline stages of two tensor-parallel shards each: rows (the same on a stage's shards) are counted
    once per stage and the stages added; heads (each shard its own) summed over all four; the contrast
    fields, decided where the logits are, taken once."""
    from models.vllm_plugin.telemetry import merge

    def entry(rows: int, heads: int) -> dict[str, int]:
        return {"aligned_rows": rows, "stage1_rows": rows - 1, "stage2_rows": rows - 2, "heads_reweighted": heads,
                "contrast_steps": 7, "contrast_dissolved": 0}

    replies = [(0, 0, {"r": entry(10, 3)}), (1, 0, {"r": entry(10, 5)}),
               (0, 1, {"r": entry(20, 4), "other": entry(1, 1)}), (1, 1, {"r": entry(20, 6)})]
    assert merge(replies, "r") == {"aligned_rows": 30, "stage1_rows": 28, "stage2_rows": 26, "heads_reweighted": 18,
                                   "contrast_steps": 7, "contrast_dissolved": 0}
    assert merge(replies, "missing") == {}


def test_a_row_replaced_by_a_condensing_move_files_its_telemetry() -> None:
    """vLLM condenses its batch by moving rows into the slots of rows that left without listing those as
    removed (seen with pipeline parallelism, whose two batches take turns in the persistent batch): the
    replaced row's counters must be filed, not dropped, so they come back when it returns or is collected."""
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, omega=2.0, start_layer=1), key="left")
    stay = to_extra_args(resolve_alignment(None, 4, omega=2.0, start_layer=1), key="stays")
    add_rows(proc, [(0, on, [1, IMAGE, 7], []), (1, stay, [1, IMAGE, 8], [])], 2)
    moved = torch.tensor([[False, True, False, False]] * 2)
    STATE.record(torch.tensor([0, 1]), moved, moved)
    # Row 0 left the batch; row 1 moves into its slot; vLLM lists no removal.
    move = (1, 0, MoveDirectionality.UNIDIRECTIONAL)
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[], moved=[move]))
    assert STATE.collect("left") == {"aligned_rows": 1, "stage1_rows": 1, "stage2_rows": 1, "heads_reweighted": 2}
    assert STATE.collect("stays") == {"aligned_rows": 1, "stage1_rows": 1, "stage2_rows": 1, "heads_reweighted": 2}


def test_align_layer_writes_every_row_when_the_stock_kernel_is_skipped(kv_path: str) -> None:
    """A decode step whose every row is aligned: the backend skips the stock kernel, so align_layer alone
    must write the whole output, for sequences of one block and of several (a block and a piece)."""
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, start_layer=1, omega=2.0, kappa=0.6))  # type: ignore[arg-type]
    prompt = [1] + [IMAGE] * 8 + [7, 8, 9]
    for n_out in (10, 60):  # 22 keys: one block; 72 keys: three blocks of 32
        add_rows(proc, [(0, on, prompt, [11] * n_out), (1, on, prompt, [12] * n_out)], 2)
        seq = torch.full((2,), len(prompt) + n_out)
        qsl = torch.arange(3)
        bs, hd, g, heads = 32, 32, 2, 4
        cache, k_t, v_t = _random_cpu_cache(16, g, bs, hd, seed=n_out)
        table = torch.randperm(16, generator=torch.Generator().manual_seed(n_out))[:6].view(2, 3).int()
        plan = build_plan(STATE, qsl, seq, table, bs, torch.device("cpu"))
        assert plan is not None and plan.rows_at(1) is not None and plan.rows_at(1).identity
        query = torch.randn(2, heads, hd, generator=torch.Generator().manual_seed(1))
        out = torch.full((2, heads * hd), float("nan"))  # what an unwritten output would hold
        align_layer(plan, 1, query, out, paged_cpu_kv(cache, k_t, v_t), hd**-0.5, g, None)
        torch.testing.assert_close(out, _dense(plan, 1, query, out, cache, table, k_t, v_t, g), rtol=1e-5, atol=1e-5)
