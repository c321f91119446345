"""The aligned rows of one layer written over the stock kernel's output, and the stock kernel kept to the other
sequences (sevi/engines/vllm/plugin/rows.py, cpu_stock.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from sevi.engines.vllm.plugin.cpu_backend import paged_cpu_kv, read_cpu_kv  # noqa: E402
from sevi.engines.vllm.plugin.params import to_extra_args  # noqa: E402
from sevi.engines.vllm.plugin.plan import StepMetadata, build_plan  # noqa: E402
from sevi.engines.vllm.plugin.rows import align_layer, layer_kernel  # noqa: E402
from sevi.engines.vllm.plugin.state import STATE  # noqa: E402
from sevi.method.alignment import align_scores  # noqa: E402
from sevi.method.knob import resolve_alignment  # noqa: E402
from tests.support.vllm_plugin import PLUGIN_IMAGE, add_rows, processor, random_cpu_cache  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_state")


def _dense(
    plan: Any,
    layer: int,
    query: torch.Tensor,
    stock: torch.Tensor,
    cache: torch.Tensor,
    table: torch.Tensor,
    k_t: bool,
    v_t: bool,
    g: int,
) -> torch.Tensor:
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
        aligned, _ = align_scores(
            scores,
            plan.valid[i : i + 1],
            plan.semantic[i : i + 1],
            plan.other[i : i + 1],
            plan.omega[i : i + 1],
            plan.kappa[i : i + 1],
        )
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
    prompt = [1] + [PLUGIN_IMAGE] * 8 + [7, 8, 9]  # 12 tokens, e = 8
    long_out = [11] * 60  # 72 keys: three blocks of 32
    add_rows(
        proc,
        [
            (0, early, prompt, [11, 12, 13]),  # prefill of prompt + outputs: rows 11..14 aligned
            (1, early, prompt, long_out),
            (2, None, prompt, [4]),
            (3, late, prompt, long_out[:40]),
        ],
        4,
    )
    q_len = torch.tensor([15, 1, 1, 1])
    seq = torch.tensor([15, 73, 14, 53])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q_len.cumsum(0)])
    bs, hd, g, heads = 32, 32, 2, 4
    cache, k_t, v_t = random_cpu_cache(16, g, bs, hd, seed=7, dtype=dtype)
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
        # With the C kernel the layer runs bound calls (kernel + compiled operator), else the general path: chosen
        # once for the row set and this cache's layout, and that choice is what the layer runs.
        rows = plan.rows_at(layer)
        assert rows is not None
        kernel = layer_kernel(rows, paged, hd**-0.5, g, heads, hd, None)
        assert kernel.name == ("torch" if kv_path == "torch" else "c")
        align_layer(plan, layer, query, out, paged, hd**-0.5, g, STATE)
        assert list(rows.kernels.values()) == [kernel]
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
        query=query[: md.num_actual_tokens],
        key_cache=key_cache,
        value_cache=value_cache,
        output=out,
        query_start_loc=md.query_start_loc,
        seq_lens=md.seq_lens,
        scale=query.shape[2] ** -0.5,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=md.block_table,
        softcap=0,
        scheduler_metadata=md.scheduler_metadata,
        s_aux=None,
        dynamic_causal=None,
        k_scale=1.0,
        v_scale=1.0,
        kv_cache_dtype="auto",
    )
    return out


def test_stock_kernel_runs_only_on_the_sequences_not_wholly_aligned() -> None:
    """A step with a prefill chunk (its last rows aligned), an aligned decode row, an unaligned one and one
    whose start layer comes later: per layer the stock kernel's metadata keeps the sequences with an
    unaligned row, and its output on them equals the full call's at the same rows."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    from sevi.engines.vllm.plugin.cpu_stock import stock_rows

    proc = processor()
    knobs = dict(omega=2.0, kappa=0.6)
    early = to_extra_args(resolve_alignment(None, 4, start_layer=1, **knobs))  # type: ignore[arg-type]
    late = to_extra_args(resolve_alignment(None, 4, start_layer=3, **knobs))  # type: ignore[arg-type]
    prompt = [1] + [PLUGIN_IMAGE] * 8 + [7, 8, 9]
    add_rows(
        proc,
        [
            (0, early, prompt, [11, 12, 13]),
            (1, early, prompt, [11] * 60),
            (2, None, prompt, [4]),
            (3, late, prompt, [11] * 40),
        ],
        4,
    )
    q_len = torch.tensor([15, 1, 1, 1])
    seq = torch.tensor([15, 73, 14, 53], dtype=torch.int32)
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q_len.cumsum(0)]).int()
    bs, hd, g, heads = 32, 32, 2, 4
    cache, _, _ = random_cpu_cache(16, g, bs, hd, seed=7)
    table = torch.randperm(16, generator=torch.Generator().manual_seed(3))[:12].view(4, 3).int()
    plan = build_plan(STATE, qsl, seq, table, bs, torch.device("cpu"))
    assert plan is not None
    n_tokens = int(qsl[-1])
    md = CPUAttentionMetadata(
        num_actual_tokens=n_tokens,
        max_query_len=15,
        query_start_loc=qsl,
        max_seq_len=73,
        seq_lens=seq,
        block_table=table,
        slot_mapping=torch.arange(n_tokens),
        causal=True,
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=4,
            num_heads=heads,
            num_kv_heads=g,
            head_dim=hd,
            seq_lens=seq,
            dtype=torch.float32,
            query_start_loc=qsl,
            causal=True,
            sliding_window_size=-1,
            isa="vec",
            enable_kv_split=True,
        ),
    )
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


def _cpu_metadata(qsl: torch.Tensor, seq: torch.Tensor, table: torch.Tensor, heads: int, g: int, hd: int) -> Any:
    """vLLM's CPU attention metadata for a step, as its builder makes it."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    n_tokens = int(qsl[-1])
    return CPUAttentionMetadata(
        num_actual_tokens=n_tokens,
        max_query_len=int((qsl[1:] - qsl[:-1]).max()),
        query_start_loc=qsl,
        max_seq_len=int(seq.max()),
        seq_lens=seq,
        block_table=table,
        slot_mapping=torch.arange(n_tokens),
        causal=True,
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq.shape[0],
            num_heads=heads,
            num_kv_heads=g,
            head_dim=hd,
            seq_lens=seq,
            dtype=torch.float32,
            query_start_loc=qsl,
            causal=True,
            sliding_window_size=-1,
            isa="vec",
            enable_kv_split=True,
        ),
    )


def test_a_request_without_sevi_args_after_aligned_rows_keeps_its_rows_in_the_stock_kernel() -> None:
    """A `vllm serve` request without `vllm_xargs` carries no SEVI row. Joining while aligned requests decode,
    it is filed after them: its prompt rows, then its decode rows, are the stock kernel's, which the CPU backend
    must run on them (vllm-serve knob test, "none/4" and "none/7": when the row table stopped at the last SEVI
    row the step looked all-aligned, the stock kernel was skipped and the request's attention never computed)."""
    from types import SimpleNamespace

    from sevi.engines.vllm.plugin.cpu_backend import SeviCPUAttentionImpl
    from sevi.engines.vllm.plugin.cpu_stock import NO_STOCK_ROWS
    from sevi.engines.vllm.plugin.step import StepBuilder

    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, start_layer=1, omega=2.0, kappa=0.6))  # type: ignore[arg-type]
    prompt = [1] + [PLUGIN_IMAGE] * 8 + [7, 8, 9]
    add_rows(proc, [(0, on, prompt, [11] * 3), (1, None, prompt, [])], 2)
    bs, hd, g, heads = 32, 32, 2, 4
    impl = SimpleNamespace(num_heads=heads, num_kv_heads=g, head_size=hd, kv_cache_dtype="auto")
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    builder = StepBuilder()
    n = len(prompt)
    # The step it joins (its whole prompt beside row 0's decode row), then two decode steps (the plan moved on).
    steps = [([0, 1, 1 + n], [16, n]), ([0, 1, 2], [17, n + 1]), ([0, 1, 2], [18, n + 2])]
    for i, (qsl_list, seq_list) in enumerate(steps):
        qsl, seq = torch.tensor(qsl_list, dtype=torch.int32), torch.tensor(seq_list, dtype=torch.int32)
        STATE.begin_step(False)
        md = _cpu_metadata(qsl, seq, table, heads, g, hd)
        step = builder.build(StepMetadata(qsl, seq, table, int(qsl[-1])), bs, torch.device("cpu"))
        assert step is not None and step.plan is not None
        plan = step.plan
        rows = plan.rows_at(1)
        assert rows is not None and rows.token_index.tolist() == [0], i
        query = torch.zeros(int(qsl[-1]), heads, hd)
        stock = SeviCPUAttentionImpl._stock(impl, SimpleNamespace(isa="vec"), query, md, rows)  # type: ignore[arg-type]
        assert stock is not None and stock is not NO_STOCK_ROWS, i  # the stock kernel is not skipped
        assert stock.tokens.tolist() == list(range(1, int(qsl[-1]))), i  # row 1's rows, all of them
        assert plan.num_tokens == int(qsl[-1]) and not plan.covers_all_tokens and not rows.identity, i
    assert STATE.batch_size == 2 and STATE.rows[1] is None  # the table spans the batch: its last row has no row


def test_align_layer_writes_every_row_when_the_stock_kernel_is_skipped(kv_path: str) -> None:
    """A decode step whose every row is aligned: the backend skips the stock kernel, so align_layer alone
    must write the whole output, for sequences of one block and of several (a block and a piece)."""
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, start_layer=1, omega=2.0, kappa=0.6))  # type: ignore[arg-type]
    prompt = [1] + [PLUGIN_IMAGE] * 8 + [7, 8, 9]
    for n_out in (10, 60):  # 22 keys: one block; 72 keys: three blocks of 32
        add_rows(proc, [(0, on, prompt, [11] * n_out), (1, on, prompt, [12] * n_out)], 2)
        seq = torch.full((2,), len(prompt) + n_out)
        qsl = torch.arange(3)
        bs, hd, g, heads = 32, 32, 2, 4
        cache, k_t, v_t = random_cpu_cache(16, g, bs, hd, seed=n_out)
        table = torch.randperm(16, generator=torch.Generator().manual_seed(n_out))[:6].view(2, 3).int()
        plan = build_plan(STATE, qsl, seq, table, bs, torch.device("cpu"))
        assert plan is not None and plan.rows_at(1) is not None and plan.rows_at(1).identity
        query = torch.randn(2, heads, hd, generator=torch.Generator().manual_seed(1))
        out = torch.full((2, heads * hd), float("nan"))  # what an unwritten output would hold
        align_layer(plan, 1, query, out, paged_cpu_kv(cache, k_t, v_t), hd**-0.5, g, None)
        torch.testing.assert_close(out, _dense(plan, 1, query, out, cache, table, k_t, v_t, g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chosen", ["c", "triton", "torch"])
def test_the_kernel_is_chosen_in_one_place_from_the_choice_and_the_cache(
    chosen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rows.cache_reader decides who reads a cache for the aligned rows (what the layers run and what /ready
    reports): the process's choice where it applies to the cache, else the torch gather. The Triton kernels read
    strided views only; the C kernel reads strided views and its AMX tiles, not another learned order."""
    from sevi.engines.vllm.plugin.cpu_backend import ordered_cpu_kv
    from sevi.engines.vllm.plugin.rows import cache_reader
    from sevi.kernels import choice
    from sevi.kernels.paged_kv import kernel

    monkeypatch.setattr(choice, "aligned_kernel", lambda: chosen)  # SEVI_ALIGNED_KERNEL
    cache, k_t, v_t = random_cpu_cache(4, 2, 32, 32, seed=1)
    strided = paged_cpu_kv(cache, k_t, v_t)
    order = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(2))
    learned = ordered_cpu_kv(cache, order, order)  # a permutation that is not the AMX layout
    assert not learned.amx
    reader, kern = cache_reader(strided)
    want = {"c": "c" if kernel() is not None else "torch", "triton": "triton", "torch": "torch"}[chosen]
    assert reader == want and (kern is not None) == (want == "c")
    assert cache_reader(learned) == ("torch", None)
