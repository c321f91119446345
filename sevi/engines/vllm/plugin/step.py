"""SEVI's part of a step's attention metadata, built once per step where vLLM builds its own.

vLLM builds each step's attention metadata in its backend's metadata builder (`build()`, once per step and
KV cache group, after the logits processors' `update_state` filed the step's rows) and hands the same object
to every layer of the group. The SEVI backends' builders (cpu_backend.py, gpu_backend.py) call
:meth:`StepBuilder.build` there and carry the result as a typed field of their metadata class
(`SeviCPUAttentionMetadata.sevi`, `SeviFlashAttentionMetadata.sevi`): the step plan (plan.py: the aligned
rows, their row sets, what the device needs uploaded) and the table the layers record their telemetry in.
A layer reads its metadata and nothing else; this module is the only reader of the row table on the
attention side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sevi.engines.vllm.plugin.plan import StepMetadata, StepPlan, build_plan
from sevi.engines.vllm.plugin.state import STATE, WorkerState


@dataclass(frozen=True)
class SeviStep:
    """What SEVI's layers read of one step: its plan (None: no row of the batch is aligned this step) and the
    row table their telemetry is recorded in (:meth:`WorkerState.record`)."""

    plan: StepPlan | None
    table: WorkerState


class StepBuilder:
    """Builds a step's :class:`SeviStep`, one per vLLM metadata builder: it keeps the builder's last plan, which
    the next decode step over the same rows moves on in place (:meth:`StepPlan.advance`) instead of building
    afresh. `table`: the logits processor's row table (the process's, by default)."""

    def __init__(self, table: WorkerState | None = None) -> None:
        self._table = table if table is not None else STATE
        self._previous: StepPlan | None = None

    def build(self, md: StepMetadata, block_size: int, device: torch.device) -> SeviStep | None:
        """This step's SEVI metadata from vLLM's view of it `md` (query_start_loc and seq_lens on the host where
        vLLM keeps host copies, the block table on the device); None when the batch has no SEVI row at all.
        Also keeps the step's seq_lens in the table: the logits processor checks pair lockstep with them."""
        table = self._table
        if not table.rows:
            return None
        table.observe_seq_lens(md.seq_lens)
        plan = None
        if table.arrays().any_enabled:
            plan = build_plan(
                table,
                md.query_start_loc,
                md.seq_lens,
                md.block_table,
                block_size,
                device,
                None,  # the scheduled tokens from query_start_loc: vLLM pads num_actual_tokens to a graph size
                self._previous,
            )
        self._previous = plan
        return SeviStep(plan, table)
