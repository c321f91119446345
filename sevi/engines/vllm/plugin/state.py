"""The row table: what only the logits processor can hand over to the attention side of a vLLM worker.

vLLM keeps request data away from the model forward. The one hook that sees each batch row's
`SamplingParams` before the forward of the same step is a logits processor's `update_state` (called
after the persistent batch was condensed and reordered, so its indices are the rows of the attention
metadata). It files a :class:`Row` per batch index here. Everything per step is built from this table where
vLLM builds its own per-step data: in the attention metadata builder (step.py), which carries the step plan
and this table to the layers in typed metadata; the layers record their telemetry back into the rows, and
the server reads it through the worker extension's one RPC (telemetry.py). Nothing outside this package
imports this module (an import-linter contract in pyproject.toml).

One instance per worker process (module global: vLLM builds the logits processor and the metadata builders
with no reference to each other): with tensor parallelism every worker has its own model runner, its own
logits processor and its own attention layers, so each fills and reads its own. A new engine's logits
processor starts it afresh (:meth:`WorkerState.configure`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sevi.engines.vllm.plugin.params import RowRequest
from sevi.method.telemetry import COUNTERS

# Counters per row, summed over every aligned (row, layer). A request's telemetry leaves the worker as a dict by
# these names and sevi.method.telemetry.PAIR_FIELDS (plain data for vLLM's message queues); the engine makes it a
# sevi.method.telemetry.Telemetry.
TELEMETRY_FIELDS = COUNTERS
_MAX_FILED = 4096  # finished requests' telemetry kept for the engine to collect (oldest dropped first)
_MAX_PENDING = 512  # aligned layers recorded before they are counted


@dataclass
class Row:
    """One request in the persistent batch. `output_ids` is vLLM's live list of generated ids."""

    request: RowRequest
    prompt_len: int
    last_image: int  # e: index of the last image token, -1 without an image
    image_mask: np.ndarray  # bool [prompt_len]: which prompt positions are image tokens
    output_ids: list[int]
    temperature: float
    top_p: float
    seed: int | None
    presence_penalty: float = 0.0  # a contrast pair's penalties are applied where its logits are combined
    frequency_penalty: float = 0.0
    # vLLM's sampling extensions, applied to a pair's combined logits as the reference engine applies them.
    repetition_penalty: float = 1.0
    prompt_ids: list[int] = field(default_factory=list)  # kept only under a repetition penalty
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    stop_ids: list[int] = field(default_factory=list)  # blocked until min_tokens tokens
    telemetry: list[int] = field(default_factory=lambda: [0] * len(TELEMETRY_FIELDS))
    generator: torch.Generator | None = None  # contrast pairs sample here (see logits_processor)

    @property
    def aligned(self) -> bool:
        return self.request.aligned and self.last_image >= 0


@dataclass
class RowArrays:
    """Dense per-batch-row arrays of the rows, rebuilt only when the batch changes.

    numpy, not torch: the step plan's index arithmetic on these few dozen numbers runs at every batch
    change, where a torch op costs 2-4x a numpy one (plan.build_plan)."""

    enabled: np.ndarray  # bool [B]
    omega: np.ndarray  # float32 [B]
    kappa: np.ndarray  # float32 [B]
    start_layer: np.ndarray  # int64 [B]
    last_image: np.ndarray  # int64 [B]
    align_from: np.ndarray  # int64 [B]: the last prompt row; every later row is aligned too
    image_keys: np.ndarray  # bool [B, P]: image positions of each prompt, padded with False
    any_enabled: bool


class WorkerState:
    def __init__(self) -> None:
        self.rows: list[Row | None] = []
        self.other_is_image_only = False
        self.image_token_id = -1
        self.num_layers = 0
        self.eos_token_id: int | None = None
        self.step = 0
        self._arrays: RowArrays | None = None
        # Scratch written by the attention backend, folded into the rows when the batch changes.
        self.step_counts: torch.Tensor | None = None  # long [B, 4], telemetry since the last fold (see counts())
        # Per-layer (batch rows, stage-1 heads, stage-2 heads), counted in batches by counts().
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.seq_lens: torch.Tensor | None = None  # this step's seq_lens per row (lockstep checks)
        self.filed: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.dissolved_pairs: set[str] = set()
        self.contrast_steps: dict[str, int] = {}

    def reset(self) -> None:
        """Forget everything (an engine stopped; the next one configures afresh)."""
        self.__init__()  # type: ignore[misc]

    # ---- model facts (set once by the logits processor from the vLLM config) ----
    def configure(
        self,
        *,
        num_layers: int,
        image_token_id: int,
        other_is_image_only: bool,
        eos_token_id: int | None,
    ) -> None:
        """A new engine's logits processor: the table starts empty (an engine stopped in this process before
        left its rows and filed telemetry here; nothing reads them any more)."""
        self.reset()
        self.num_layers = num_layers
        self.image_token_id = image_token_id
        self.other_is_image_only = other_is_image_only
        self.eos_token_id = eos_token_id

    def observe_seq_lens(self, seq_lens: torch.Tensor) -> None:
        """Keep this step's seq_lens (the step's first metadata build): the logits processor checks pair lockstep
        with them."""
        if self.seq_lens is None:
            self.seq_lens = seq_lens[: self.batch_size].to("cpu", copy=True)

    # ---- batch bookkeeping ----
    def begin_step(self, batch_changed: bool) -> None:
        """Called first thing in update_state. Counting telemetry costs a few ops, so it is deferred:
        the counters are folded into the rows only when the batch is about to change (rows added,
        removed or moved, which reassigns batch indices), or when many layers are pending."""
        if batch_changed or len(self.pending) >= _MAX_PENDING:
            step_counts = self.counts()
            if batch_changed and step_counts is not None:
                counts = step_counts.tolist()
                for row, c in zip(self.rows, counts, strict=False):
                    if row is not None and any(c):
                        row.telemetry = [a + b for a, b in zip(row.telemetry, c, strict=True)]
                self.step_counts = None
        self.seq_lens = None
        self.step += 1

    def record(
        self,
        batch_row: torch.Tensor,
        stage1: torch.Tensor,
        stage2: torch.Tensor,
        rows_moved: torch.Tensor | None = None,
    ) -> None:
        """Note one layer's aligned rows (`[R]` batch indices) and the heads `[R, H]` each stage moved.
        rows_moved (bool `[R, 2]`): whether each stage moved any head of the layer, where this worker
        holds only some of its heads (tensor parallelism); else it is read from the stage masks."""
        self.pending.append((batch_row, stage1, stage2, rows_moved))

    def counts(self) -> torch.Tensor | None:
        """Telemetry `[B, 4]` not yet folded into the rows (None if nothing was aligned since): the
        pending layers are counted here, one reduction per set of rows (the layers of a step share
        one, and so do the decode steps of an unchanged batch)."""
        by_rows: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
        for item in self.pending:
            by_rows.setdefault(id(item[0]), []).append(item)
        self.pending = []
        for items in by_rows.values():
            rows = items[0][0]
            moved = torch.stack([m for _, s1, s2, _ in items for m in (s1, s2)]).unflatten(0, (len(items), 2))
            flags = [f for *_, f in items if f is not None]
            # Rows a stage moved: from this worker's heads, or as the layer's shards agreed (tensor parallel).
            stage_rows = torch.stack(flags).sum(0) if flags else moved.any(-1).sum(0).t()
            per_row = torch.cat(
                [
                    torch.full((rows.shape[0], 1), len(items), dtype=torch.long, device=rows.device),
                    stage_rows,
                    moved.sum((0, 1, 3))[:, None],
                ],
                1,
            )  # [R, 4]
            if self.step_counts is None:
                self.step_counts = torch.zeros(
                    self.batch_size, len(TELEMETRY_FIELDS), dtype=torch.long, device=rows.device
                )
            # Out of place: vLLM's update_state runs under inference mode, so a tensor made there is an
            # inference tensor, and `collect` (the engine thread, outside inference mode) may not add to it.
            self.step_counts = self.step_counts.index_add(0, rows, per_row)
        return self.step_counts

    def remove(self, index: int) -> None:
        row = self.rows[index] if index < len(self.rows) else None
        if row is not None:
            self._file(row)
            self.rows[index] = None
            self._arrays = None
            pair = row.request.pair
            if pair is not None and not any(r is not None and r.request.pair == pair for r in self.rows):
                self.dissolved_pairs.discard(pair)  # both rows gone: nothing reads the mark any more

    def add(self, index: int, row: Row) -> None:
        while len(self.rows) <= index:
            self.rows.append(None)
        key = row.request.key
        if key is not None and key in self.filed:  # resumed after preemption: keep counting
            earlier = self.filed.pop(key)
            row.telemetry = [int(earlier.get(n, 0)) for n in TELEMETRY_FIELDS]
            pair = row.request.pair
            if pair is not None and "contrast_steps" in earlier:  # a pair resumed together (scheduler.py)
                self.contrast_steps[pair] = self.contrast_steps.get(pair, 0) + int(earlier["contrast_steps"])
        self.rows[index] = row
        self._arrays = None

    def move(self, a: int, b: int, swap: bool) -> None:
        while len(self.rows) <= max(a, b):
            self.rows.append(None)
        if swap:
            self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
        else:
            # vLLM condenses its batch by moving rows into the slots of rows that left, and does not list those
            # as removed ("added or moved requests may replace existing requests"): file the one replaced.
            self.remove(b)
            self.rows[b], self.rows[a] = self.rows[a], None
        self._arrays = None

    def resize(self, batch_size: int) -> None:
        """One entry per batch index, after a batch update: rows past the batch filed and dropped, and None for
        the batch's last rows when they carry no SEVI row (a `vllm serve` request without `vllm_xargs`). The
        step plan reads the step's size from here (`batch_size`: its rows of query_start_loc, seq_lens and the
        scheduled tokens): a table that stopped at the last SEVI row made a step of aligned decode rows followed
        by such a request look all-aligned, and the backends skipped the stock kernel that computes its rows."""
        for i in range(batch_size, len(self.rows)):
            if self.rows[i] is not None:
                self.remove(i)
        del self.rows[batch_size:]
        self.rows.extend([None] * (batch_size - len(self.rows)))
        self._arrays = None

    def _file(self, row: Row) -> None:
        key = row.request.key
        if key is None:
            return
        entry: dict[str, Any] = dict(zip(TELEMETRY_FIELDS, row.telemetry, strict=True))
        if row.request.role == "main" and row.request.pair is not None:
            entry["contrast_steps"] = self.contrast_steps.pop(row.request.pair, 0)
            entry["contrast_dissolved"] = row.request.pair in self.dissolved_pairs
        self.filed[key] = entry
        while len(self.filed) > _MAX_FILED:
            self.filed.popitem(last=False)

    def collect(self, key: str) -> dict[str, Any] | None:
        """A request's telemetry (in-process engines only): filed when it left the batch, else live.

        A request that just finished is still in the batch until the next step's update_state; its
        last step's counters are still in `step_counts`, so they are added here.
        """
        if key in self.filed:
            return self.filed.pop(key)
        for i, row in enumerate(self.rows):
            if row is not None and row.request.key == key:
                step_counts = self.counts()
                pending = step_counts[i].tolist() if step_counts is not None else [0] * 4
                entry: dict[str, Any] = {
                    n: a + b for n, a, b in zip(TELEMETRY_FIELDS, row.telemetry, pending, strict=True)
                }
                pair = row.request.pair
                if row.request.role == "main" and pair is not None:
                    entry["contrast_steps"] = self.contrast_steps.get(pair, 0)
                    entry["contrast_dissolved"] = pair in self.dissolved_pairs
                return entry
        return None

    # ---- dense views for the backend ----
    @property
    def batch_size(self) -> int:
        """The batch's size at its last update (every batch index has an entry: see :meth:`resize`)."""
        return len(self.rows)

    def arrays(self) -> RowArrays:
        if self._arrays is None:
            self._arrays = self._build()
        return self._arrays

    def _build(self) -> RowArrays:
        n = len(self.rows)
        live = [(i, r) for i, r in enumerate(self.rows) if r is not None and r.aligned]
        index = np.array([i for i, _ in live], dtype=np.int64)
        params = [r.request.alignment for _, r in live if r.request.alignment is not None]  # all: r.aligned

        def per_row(values: list[Any], dtype: Any, fill: Any = 0) -> np.ndarray:
            out = np.full(n, fill, dtype=dtype)
            out[index] = values
            return out

        width = max((r.prompt_len for _, r in live), default=0)
        image_keys = np.zeros((n, width), dtype=bool)
        for i, r in live:
            image_keys[i, : r.prompt_len] = r.image_mask
        return RowArrays(
            enabled=per_row([True] * len(live), bool, False),
            omega=per_row([p.omega for p in params], np.float32),
            kappa=per_row([p.kappa for p in params], np.float32),
            start_layer=per_row([p.start_layer for p in params], np.int64),
            last_image=per_row([r.last_image for _, r in live], np.int64, -1),
            align_from=per_row([r.prompt_len - 1 for _, r in live], np.int64),
            image_keys=image_keys,
            any_enabled=bool(live),
        )


STATE = WorkerState()
