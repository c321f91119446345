"""Per-request telemetry counted by the aligned layers, merged and filed to the right rows
(sevi/engines/vllm/plugin/telemetry.py, state.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from sevi.engines.vllm.plugin.params import to_extra_args  # noqa: E402
from sevi.engines.vllm.plugin.state import STATE  # noqa: E402
from sevi.method.knob import resolve_alignment  # noqa: E402
from tests.support.vllm_plugin import PLUGIN_IMAGE, add_rows, processor  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_state")


def test_telemetry_is_counted_late_but_lands_on_the_right_rows() -> None:
    """Layers' telemetry is counted when the batch changes (or many layers are pending), not per step:
    the totals per request must be the same as counting every layer at once, across a move of rows."""
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, omega=2.0, start_layer=1))
    add_rows(proc, [(i, on, [1, PLUGIN_IMAGE, 7 + i], []) for i in range(3)], 3)
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
    fields, decided where the logits are, taken once. Replies as they arrive: typed in process, plain lists and
    tuples from workers in other processes (vLLM's message queues)."""
    from sevi.engines.vllm.plugin.telemetry import WorkerTelemetry, request_telemetry

    def entry(rows: int, heads: int) -> dict[str, int]:
        return {
            "aligned_rows": rows,
            "stage1_rows": rows - 1,
            "stage2_rows": rows - 2,
            "heads_reweighted": heads,
            "contrast_steps": 7,
            "contrast_dissolved": 0,
        }

    replies = [
        WorkerTelemetry(0, 0, {"r": entry(10, 3)}),
        [1, 0, {"r": entry(10, 5)}],
        (0, 1, {"r": entry(20, 4), "other": entry(1, 1)}),
        (1, 1, {"r": entry(20, 6)}),
    ]
    assert request_telemetry(replies, "r") == {
        "aligned_rows": 30,
        "stage1_rows": 28,
        "stage2_rows": 26,
        "heads_reweighted": 18,
        "contrast_steps": 7,
        "contrast_dissolved": 0,
    }
    assert request_telemetry(replies, "missing") == {}


def test_a_row_replaced_by_a_condensing_move_files_its_telemetry() -> None:
    """vLLM condenses its batch by moving rows into the slots of rows that left without listing those as
    removed (seen with pipeline parallelism, whose two batches take turns in the persistent batch): the
    replaced row's counters must be filed, not dropped, so they come back when it returns or is collected."""
    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, omega=2.0, start_layer=1), key="left")
    stay = to_extra_args(resolve_alignment(None, 4, omega=2.0, start_layer=1), key="stays")
    add_rows(proc, [(0, on, [1, PLUGIN_IMAGE, 7], []), (1, stay, [1, PLUGIN_IMAGE, 8], [])], 2)
    moved = torch.tensor([[False, True, False, False]] * 2)
    STATE.record(torch.tensor([0, 1]), moved, moved)
    # Row 0 left the batch; row 1 moves into its slot; vLLM lists no removal.
    move = (1, 0, MoveDirectionality.UNIDIRECTIONAL)
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[], moved=[move]))
    assert STATE.collect("left") == {"aligned_rows": 1, "stage1_rows": 1, "stage2_rows": 1, "heads_reweighted": 2}
    assert STATE.collect("stays") == {"aligned_rows": 1, "stage1_rows": 1, "stage2_rows": 1, "heads_reweighted": 2}


def test_a_finished_row_is_collected_outside_inference_mode_after_counting_inside_it() -> None:
    """vLLM runs the forward and update_state under torch.inference_mode, and the engine thread collects a
    finished request's telemetry outside it. Once a long unchanged batch has counted its pending layers
    (inside inference mode), the last step's layers are added at collection: this raised "Inplace update to
    inference tensor outside InferenceMode" and killed the server's engine thread (a 16-layer model at 32
    tokens; LLaVA-1.5's 32 layers at 16)."""
    from sevi.engines.vllm.plugin import state

    proc = processor()
    on = to_extra_args(resolve_alignment(None, 4, omega=2.0, start_layer=1), key="done")
    add_rows(proc, [(0, on, [1, PLUGIN_IMAGE, 7], [])], 1)
    moved = torch.tensor([[True, False, True, False]])
    steps = state._MAX_PENDING // 3 + 2  # past the pending bound: counted mid-way, under inference mode
    for _ in range(steps):
        with torch.inference_mode():
            for _ in range(3):
                STATE.record(torch.tensor([0]), moved, moved)
            proc.update_state(None)
    assert STATE.step_counts is not None and STATE.pending  # counted once, the last layers still pending
    n = 3 * steps
    assert STATE.collect("done") == {"aligned_rows": n, "stage1_rows": n, "stage2_rows": n, "heads_reweighted": 4 * n}
