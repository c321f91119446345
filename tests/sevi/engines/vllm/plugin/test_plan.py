"""The step plan: which rows align, their masks, and moving it on in place (sevi/engines/vllm/plugin/plan.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from sevi.engines.vllm.plugin.params import to_extra_args  # noqa: E402
from sevi.engines.vllm.plugin.plan import GROWTH, StepMetadata, StepPlan, build_plan, layer_index  # noqa: E402
from sevi.engines.vllm.plugin.state import STATE  # noqa: E402
from sevi.engines.vllm.plugin.step import StepBuilder  # noqa: E402
from sevi.method.knob import resolve_alignment  # noqa: E402
from tests.support.vllm_plugin import PLUGIN_IMAGE, add_rows, processor  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_state")


def test_layer_index_from_vllm_layer_names() -> None:
    assert layer_index("language_model.model.layers.3.self_attn.attn") == 3
    assert layer_index("vision_tower.encoder.layers.1.attn") == 1
    assert layer_index("lm_head") is None


def test_plan_picks_last_prompt_row_at_prefill_and_each_decode_row() -> None:
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, omega=2.0, start_layer=1))
    prompt = [1, PLUGIN_IMAGE, PLUGIN_IMAGE, 7, 8, 9]
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
    # GROWTH keys past the widest row, within the block table's width (2 blocks of 32 here)
    assert plan.num_keys == 64 and not plan.valid[:, 8:].any()
    assert plan.semantic[0, :8].tolist() == [False] * 3 + [True] * 3 + [False] * 2  # e=2 < j <= 5
    assert plan.other[1, :8].tolist() == [True] * 3 + [False] * 5  # LLaVA: every key up to e
    # A partial prefill chunk that stops before the last prompt row aligns nothing.
    assert (
        build_plan(STATE, torch.tensor([0, 3, 3, 3, 3]), torch.tensor([3, 0, 0, 0]), table, 32, torch.device("cpu"))
        is None
    )


PREPARED_TENSORS = ("key_bias", "semantic_keys", "other_keys", "kappa", "blend", "on")


def _used_blocks(block_index: torch.Tensor, key_count: torch.Tensor, bs: int) -> list[list[int]]:
    """Each row's block ids over its own keys (past them a plan holds ids it never reads)."""
    per_row = block_index.view(key_count.shape[0], -1)
    return [per_row[i, : -(-int(n) // bs)].tolist() for i, n in enumerate(key_count)]


def _assert_same_rows(moved: StepPlan, fresh: StepPlan, bs: int) -> None:
    """A plan moved on in place selects the same rows as one built afresh, with the same masks and block ids
    over every row's keys (the widths may differ: each is the widest row plus the room the plan had when built)."""
    assert torch.equal(moved.key_count, fresh.key_count)
    assert _used_blocks(moved.blocks, moved.key_count, bs) == _used_blocks(fresh.blocks, fresh.key_count, bs)
    width = int(moved.key_count.max())
    for plan in (moved, fresh):
        past = torch.arange(plan.num_keys)[None, :] >= plan.key_count[:, None]
        assert not (plan.valid & past).any() and not (plan.semantic & past).any() and not (plan.other & past).any()
    for name in ("valid", "semantic", "other"):
        assert torch.equal(getattr(moved, name)[:, :width], getattr(fresh, name)[:, :width]), name
    for layer in (1, 3):
        ra, rb = moved.rows_at(layer), fresh.rows_at(layer)
        assert ra is not None and rb is not None and ra.identity == rb.identity
        assert torch.equal(ra.token_index, rb.token_index) and torch.equal(ra.key_count, rb.key_count)
        assert _used_blocks(ra.block_index, ra.key_count, bs) == _used_blocks(rb.block_index, rb.key_count, bs)
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
    prompt = [1] + [PLUGIN_IMAGE] * 8 + [7, 8, 9]  # 12 tokens, e = 8
    add_rows(
        proc,
        [
            (0, early, prompt, [11] * 19),
            (1, None, prompt, [4]),
            (2, late, prompt, [11] * 3),
            (3, early, [1, 7, 8], [5]),
        ],
        4,
    )
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
    # Masks GROWTH keys past the widest row (row 0: 31 keys), the block ids for that width
    assert plan.room == GROWTH and plan.num_keys == 31 + GROWTH and plan.blocks.shape[1] == 3
    bound = None if joined else plan.rows_at(1)
    seq = seq + 1
    moved = build_plan(STATE, qsl, seq, table, bs, torch.device("cpu"), previous=plan)
    assert moved is plan and plan.room == GROWTH - 1
    assert joined or plan.rows_at(1) is bound  # kept: the rows did not move in the query
    _assert_same_rows(moved, build_plan(STATE, qsl, seq, table, bs, torch.device("cpu")), bs)
    # Row 0's next key opens its second block: that one id is read in place (room per row, not a re-read of
    # the table), and the row sets holding their own copies (rows past a later start layer) are built again.
    seq = seq + 1
    kept, full = plan.rows_at(1), plan.rows_at(3)
    table[0, 1] = 23  # vLLM writes the id when the keys reach the block
    again = build_plan(STATE, qsl, seq, table, bs, torch.device("cpu"), previous=plan)
    assert again is plan and again.rows_at(1) is not kept and again.room == GROWTH - 2
    assert joined or again.rows_at(3) is full  # the set of every row reads the plan's ids: kept
    assert again.blocks[0, 1] == 23 and again.rows_at(3).block_index.view(2, -1)[0, 1] == 23  # type: ignore[union-attr]
    _assert_same_rows(again, build_plan(STATE, qsl, seq, table, bs, torch.device("cpu")), bs)
    for _ in range(3):
        seq = seq + 1
        assert build_plan(STATE, qsl, seq, table, bs, torch.device("cpu"), previous=again) is again
        _assert_same_rows(again, build_plan(STATE, qsl, seq, table, bs, torch.device("cpu")), bs)
    # A step that is not one more decode token per row, or a changed batch, is not one to move on to.
    assert not again.advance(STATE, qsl, seq + 2, table, bs)
    assert not again.advance(STATE, torch.tensor([0, 1, 2, 3, 5]), seq + 1, table, bs)
    add_rows(proc, [(1, early, prompt, [4])], 4)
    assert not again.advance(STATE, qsl, seq + 1, table, bs)
    # A prefill that aligns several rows of a sequence (recomputed after a preemption) is not one to move on.
    redo = build_plan(
        STATE,
        torch.tensor([0, 31, 32, 33, 34], dtype=torch.int32),
        torch.tensor([31, 14, 16, 4]),
        table,
        bs,
        torch.device("cpu"),
    )
    assert redo is not None and redo.token_index.shape[0] > 4 and redo.decode is None


def test_a_row_reaching_a_new_block_reads_its_id_even_when_the_widest_row_does_not() -> None:
    """vLLM writes a new block's id into the block table when a sequence's keys reach it. A shorter row
    crossing into its next block while the widest row stays within its blocks must read the new id, not
    whatever the table held there when the plan was built."""
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, omega=2.0, start_layer=1))
    prompt = [1] + [PLUGIN_IMAGE] * 8 + [7, 8, 9]
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
        _assert_same_rows(plan, fresh, 16)
        rows = plan.rows_at(1)
        assert rows is not None and rows.block_index.view(2, -1)[1, : -(-int(seq[1]) // 16)].tolist() == (
            [4, 5] if int(seq[1]) > 16 else [4]
        )


def _plan(builder: StepBuilder, md: StepMetadata, device: torch.device) -> StepPlan | None:
    """The plan a backend's metadata builder carries in this step's metadata."""
    step = builder.build(md, 16, device)
    assert step is not None and step.table is STATE
    return step.plan


def test_the_metadata_builder_builds_each_steps_plan_once_and_moves_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend's metadata builder builds the step's SEVI part once per step (vLLM hands the same metadata to
    every layer of the step), keeping the step's seq_lens for the logits processor; the next decode step moves
    the plan on; a batch without aligned rows gets no plan, and one without SEVI rows no SEVI part at all."""
    import sevi.engines.vllm.plugin.step as steps

    built: list[object] = []
    build = steps.build_plan
    monkeypatch.setattr(steps, "build_plan", lambda *a, **k: built.append(1) or build(*a, **k))
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, start_layer=1, omega=2.0, kappa=0.6))
    prompt = [1] + [PLUGIN_IMAGE] * 8 + [7, 8, 9]
    add_rows(proc, [(0, on, prompt, [11] * 3), (1, None, prompt, [4])], 2)
    builder = StepBuilder()

    def md(seq: list[int]) -> StepMetadata:
        return StepMetadata(torch.arange(3, dtype=torch.int32), torch.tensor(seq), torch.arange(4).view(2, 2).int(), 2)

    STATE.begin_step(False)
    plan = _plan(builder, md([15, 13]), torch.device("cpu"))
    assert plan is not None and built == [1] and STATE.seq_lens is not None and int(STATE.seq_lens[0]) == 15
    STATE.begin_step(False)
    keys = plan.key_count.clone()
    nxt = _plan(builder, md([16, 14]), torch.device("cpu"))
    assert nxt is plan and torch.equal(nxt.key_count, keys + 1) and built == [1, 1]  # moved on: a key more
    add_rows(proc, [(0, None, prompt, [11] * 4)], 2)  # alignment off for the whole batch
    STATE.begin_step(True)
    built.clear()
    assert _plan(builder, md([17, 15]), torch.device("cpu")) is None and built == []
    STATE.reset()
    assert builder.build(md([18, 16]), 16, torch.device("cpu")) is None  # no SEVI row: vLLM's metadata alone


def test_decode_steps_read_nothing_back_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path's steady state: with the step's row counts on the host (StepMetadata, from vLLM's host
    copies), decode steps move the plan on, re-read block ids and widen masks without reading any tensor back
    (on a GPU each read would make the host wait for the device). Checked by making every read-back raise for
    200 decode steps that cross blocks of 16 and the masks' room many times."""
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, start_layer=1, omega=2.0, kappa=0.6))
    prompt = [1] + [PLUGIN_IMAGE] * 8 + [7, 8, 9]
    add_rows(proc, [(0, on, prompt, [11]), (1, on, prompt[:-1], [4])], 2)
    table = torch.arange(64, dtype=torch.int32).view(2, 32)
    builder = StepBuilder()

    def step(seq: list[int]) -> StepPlan | None:
        STATE.begin_step(False)
        md = StepMetadata(torch.arange(3, dtype=torch.int32), torch.tensor(seq), table, 2)
        return _plan(builder, md, torch.device("cpu"))

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
    assert first.blocks[0, :14].tolist() == list(range(14))  # the block ids were read as keys reached them


def test_a_fresh_plan_uploads_once_and_reads_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh plan (every batch change) and its row sets for mixed start layers, built for a device: one upload
    of everything the rows need (non-blocking: from a pinned buffer on CUDA), one more per row subset (its row
    indices), and no read-back. On the `meta` device, which holds no data, any read-back (`.item()`, `bool()`,
    `nonzero`) raises, as `torch.cuda.set_sync_debug_mode("error")` would on a GPU."""
    proc = processor()
    early = to_extra_args(resolve_alignment(None, 4, start_layer=1, omega=2.0, kappa=0.6))
    late = to_extra_args(resolve_alignment(None, 4, start_layer=3, omega=0.5, kappa=0.3))
    prompt = [1] + [PLUGIN_IMAGE] * 8 + [7, 8, 9]
    add_rows(proc, [(0, early, prompt, [11]), (1, late, prompt[:-1], [4]), (2, early, prompt, [5, 6])], 3)
    table = torch.zeros(3, 32, dtype=torch.int32, device="meta")
    uploads: list[bool] = []
    to = torch.Tensor.to

    def counting_to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = to(self, *args, **kwargs)  # type: ignore[call-overload]
        if out.device != self.device:
            uploads.append(bool(kwargs.get("non_blocking", False)))
        return out  # type: ignore[no-any-return]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("nonzero on the device: the host would wait for it")

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    monkeypatch.setattr(torch, "nonzero", refuse)
    builder = StepBuilder()
    STATE.begin_step(False)
    md = StepMetadata(torch.arange(4, dtype=torch.int32), torch.tensor([13, 12, 14]), table, 3)
    plan = _plan(builder, md, torch.device("meta"))
    assert plan is not None and plan.key_count.device.type == "meta"
    assert uploads == [True]
    sets = [plan.rows_at(layer) for layer in range(4)]
    assert sets[0] is None and sets[1] is sets[2] and sets[1] is not None and sets[3] is not None
    assert sets[1].token_index.shape[0] == 2 and sets[3].token_index.shape[0] == 3 and sets[3].identity
    assert sets[1].prepared.all_on and uploads == [True, True]  # the subset's row indices
    for n in range(1, 40):  # decode steps: moved on in place, crossing blocks (row sets rebuilt), no read-back
        STATE.begin_step(False)
        md = StepMetadata(torch.arange(4, dtype=torch.int32), torch.tensor([13 + n, 12 + n, 14 + n]), table, 3)
        assert _plan(builder, md, torch.device("meta")) is plan
        assert plan.rows_at(1) is not None and plan.rows_at(3) is not None
    assert all(uploads)


def test_a_fresh_plan_covers_a_step_whose_token_count_vllm_padded() -> None:
    """vLLM's GPU runner pads num_actual_tokens to a CUDA-graph size; the plan counts the scheduled tokens
    (query_start_loc), so an all-decode batch is covered from its first step (FlashAttention skipped)."""
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, start_layer=1, omega=2.0, kappa=0.6))
    prompt = [1] + [PLUGIN_IMAGE] * 8 + [7, 8, 9]
    add_rows(proc, [(0, on, prompt, [11]), (1, on, prompt[:-1], [4])], 2)
    STATE.begin_step(False)
    md = StepMetadata(torch.arange(3, dtype=torch.int32), torch.tensor([13, 12]), torch.arange(4).view(2, 2), 8)
    plan = _plan(StepBuilder(), md, torch.device("cpu"))
    assert plan is not None and plan.num_tokens == 2 and plan.covers_all_tokens
    rows = plan.rows_at(1)
    assert rows is not None and rows.identity
