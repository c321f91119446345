"""The step plan: which flattened query rows of a vLLM batch SEVI aligns, and what their layers share.

Which rows (spec section 2): for each sequence with alignment on, the query positions at or past its
last prompt row. At prefill that is the last prompt row; in decode, the one new row; after a
preemption vLLM recomputes prompt and outputs in one prefill, and every row from the last prompt row on
is aligned again over its own causal keys, which the spec says equals the cached run.

Cost model (the reason for the shapes below): each torch op costs microseconds of dispatch whatever its
size, and the step runs every aligned layer, so everything that does not depend on the layer (row indices,
block indices, masks, the alignment's prepared inputs) is built once per step, in the backend's metadata
builder (step.py: :class:`StepPlan`; a layer's :class:`RowSet` by the first layer that needs it), and the
decode steps that follow over the same rows move it on in place (a key more per row: three small ops; a row
entering a new block has that one block id read in place) until the masks' room runs out (every GROWTH
steps). Backend-agnostic: both backends share one plan (on a GPU built from vLLM's host copies of the row
counts, :class:`StepMetadata`, so a decode step reads nothing back from the device).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sevi.engines.vllm.plugin.state import RowArrays, WorkerState
from sevi.method.alignment import PreparedRows, add_key_, prepare_rows, select_rows, span_masks, widen

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder layer number from a vLLM layer name (`language_model.model.layers.3.self_attn.attn`)."""
    found = _LAYER_RE.findall(name)
    return int(found[-1]) if found else None


@dataclass
class RowSet:
    """The rows aligned in a layer (all of the step's, or those whose start layer is reached), with
    everything their layers share: indices into the query, batch and cache, and the prepared masks."""

    token_index: torch.Tensor  # long [R]: row in the flattened query / output
    batch_row: torch.Tensor  # long [R]: batch index of each row (telemetry)
    block_index: torch.Tensor  # long [R * nb]: cache block read by (row, block); a row reads its sequence's
    key_count: torch.Tensor  # long [R]: keys each row reads (its causal ones; the plan's K is the widest)
    prepared: PreparedRows  # masks / knobs in the alignment's kernel shapes, [R, ...] with K = num_keys
    identity: bool  # token_index == arange(R): the rows are the whole query, in order
    # The kernel chosen for these rows, by cache shape and layout, with its arguments bound (rows.py: layer_kernel).
    kernels: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    # What a backend derives once per row set and step and shares across the step's layers (the CPU backend:
    # the rows its stock kernel still computes); cleared when the plan moves on to the next step.
    derived: dict[str, Any] = field(default_factory=dict)


# Keys a plan's masks grow by at a time: each column past a row's keys costs the operator a little on every
# aligned layer (8 rows x 8 heads: 64 columns, about 2.4 us), each widening a few ops and the row sets rebuilt.
GROWTH = 64


@dataclass
class StepPlan:
    """Layer-independent parts of one step's alignment work, built once per step by the metadata builder and
    moved on in place by the decode steps that follow (:meth:`advance`)."""

    token_index: torch.Tensor  # long [R]: row in the flattened query / output
    batch_row: torch.Tensor  # long [R]: batch index of each aligned row
    seq_slot: torch.Tensor  # long [R]: index into `blocks` (one slot per distinct sequence)
    blocks: torch.Tensor  # long [S, nb]: block ids covering the masks' width (past a row's keys: not read)
    num_keys: int  # K: the masks' width, the widest row's keys and room to grow in place; a row reads its own
    key_count: torch.Tensor  # long [R]: each row's own keys (position + 1), at most K
    key_count_host: np.ndarray  # the same on the host, moved on alongside: read without a device sync
    prepared: PreparedRows  # every aligned row's masks / knobs in the alignment's kernel shapes
    omega: torch.Tensor  # float32 [R]
    kappa: torch.Tensor  # float32 [R]
    start_layer: torch.Tensor  # long [R]
    start_layer_host: np.ndarray  # the same on the host: row sets are chosen there (no nonzero on the device)
    on_host: np.ndarray  # bool [R]: omega > 0, on the host (prepared rows' all_on without a read-back)
    min_start: int
    max_start: int
    starts: list[int]  # distinct start layers, ascending: each opens a larger set of rows
    num_tokens: int  # rows in the flattened query (the step's scheduled tokens)
    # For :meth:`advance`, set when each aligned sequence has one aligned row and every row with alignment on
    # is aligned (a decode step, or a prefill step's last prompt row beside decode rows): (row arrays, the
    # next step's seq_lens, the sequences' batch rows). Each row's position is its key count - 1: its next
    # key lies at column key_count.
    decode: tuple[RowArrays, torch.Tensor, torch.Tensor] | None = None
    # Decode steps :meth:`advance` takes before it widens the masks and reads the block table again: every
    # row's next key must lie within the masks' width. A row whose next key opens a block has that block's id
    # read in place (vLLM writes a new block's id into the table only when the keys reach it): room per row.
    room: int = 0
    seqs_host: np.ndarray | None = None  # decode plans: each row's batch index (rows and sequences one to one)
    _sets: dict[int, RowSet | None] = field(default_factory=dict)
    _by_layer: dict[int, RowSet | None] = field(default_factory=dict)

    @property
    def valid(self) -> torch.Tensor:
        """bool [R, K]: causal keys of each row."""
        return self.prepared.key_bias[:, 0] == 0

    @property
    def semantic(self) -> torch.Tensor:
        """bool [R, K]: semantic keys (valid ones)."""
        return self.prepared.semantic_keys[:, 0] > 0

    @property
    def other(self) -> torch.Tensor:
        """bool [R, K]: "other" keys (valid ones)."""
        return self.prepared.other_keys[:, 0] > 0

    @property
    def covers_all_tokens(self) -> bool:
        """Every scheduled token is an aligned row (decode with alignment on for the whole batch)."""
        return self.token_index.shape[0] == self.num_tokens

    def rows_at(self, layer: int) -> RowSet | None:
        """The rows aligned in `layer`, built on first use and shared by every layer with the same set."""
        if layer in self._by_layer:  # every aligned layer asks, every step: one lookup
            return self._by_layer[layer]
        opened = sum(1 for s in self.starts if s <= layer)  # the row set grows with the layer
        if opened not in self._sets:
            self._sets[opened] = self._row_set(layer) if opened else None
        self._by_layer[layer] = self._sets[opened]
        return self._sets[opened]

    def _row_set(self, layer: int) -> RowSet | None:
        keep = None
        if layer < self.max_start:  # chosen on the host: a nonzero on the device would wait for it
            chosen = np.flatnonzero(self.start_layer_host <= layer)
            if chosen.shape[0] == 0:
                return None
            keep = upload(self.token_index.device, chosen)[0]
            all_on = bool(self.on_host[chosen].all())

        def pick(x: torch.Tensor) -> torch.Tensor:
            return x if keep is None else x[keep]

        tok = pick(self.token_index)
        p = self.prepared
        # A decode plan's rows are its sequences in order: the full set's block ids are the plan's own (a view:
        # the ids read in place as rows enter new blocks reach it, and its bound calls' pointers stay valid).
        in_place = keep is None and self.seqs_host is not None
        return RowSet(
            token_index=tok,
            batch_row=pick(self.batch_row),
            block_index=self.blocks.view(-1) if in_place else self.blocks[pick(self.seq_slot)].reshape(-1),
            key_count=pick(self.key_count),
            prepared=p if keep is None else select_rows(p, keep, all_on),
            identity=keep is None and self.covers_all_tokens,
        )

    def advance(
        self,
        state: WorkerState,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        block_size: int,
    ) -> bool:
        """Move this plan on to this step, in place, when it is one decode token per batch row over the same
        rows and every seq_len one more; False when it is not (then build afresh).

        Each aligned row is then its sequence's new token, and its masks gain that one key: valid, semantic
        (it lies past the image and the prompt), not "other" (:func:`add_key_`); its key count grows by
        one. The row sets and their bound calls hold the same tensors, so they move on with the plan (a
        row set's own copies, for rows past a later start layer, are moved on likewise). When the room is
        spent the block ids are read again and the masks widened if needed (:meth:`_make_room`); after a
        prefill step (a request joined) the rows keep their order but move in the query (row b is now
        token b). Either way the row sets are built again at their first layer.
        """
        if self.decode is None:
            return False
        arrays, expect, seqs = self.decode
        n = expect.shape[0]
        if (
            state.arrays() is not arrays
            or seq_lens.shape[0] < n
            or query_start_loc.shape[0] < n + 1
            or not torch.equal(query_start_loc[: n + 1], _arange(n + 1, query_start_loc))
            or not torch.equal(seq_lens[:n], expect)
        ):
            return False
        if self.room == 0:
            self._make_room(block_table, block_size, seqs)
        else:
            self._enter_blocks(block_table, block_size)
        if self.num_tokens != n:
            self.token_index, self.num_tokens = self.batch_row, n
            self._forget_row_sets()
        for rows in self._sets.values():
            if rows is None:
                continue
            rows.derived.clear()  # e.g. the stock kernel's metadata, which holds this step's seq_lens
            if rows.key_count is not self.key_count:
                add_key_(rows.prepared, rows.key_count)
                rows.key_count.add_(1)
        add_key_(self.prepared, self.key_count)
        self.key_count.add_(1)
        self.key_count_host += 1
        expect.add_(1)
        self.room -= 1
        return True

    def _make_room(self, block_table: torch.Tensor, block_size: int, seqs: torch.Tensor) -> None:
        """Before this step's keys are added: the masks widened by GROWTH keys past the widest row, the
        sequences' block ids read again for that width, and the room that gives (at least this step)."""
        widest = int(self.key_count_host.max()) + 1  # the widest row's keys this step
        num_keys, nb = _width(widest, block_size, block_table.shape[1])
        self.blocks = block_table[seqs, :nb].to(torch.long)
        if num_keys > self.num_keys:
            self.num_keys = num_keys
            self.prepared = widen(self.prepared, num_keys)
        self.room = self.num_keys - widest + 1
        self._forget_row_sets()

    def _enter_blocks(self, block_table: torch.Tensor, block_size: int) -> None:
        """Before this step's keys are added: the rows whose new key opens a block (chosen on the host) get that
        block's id from the table, in place on the device (no read-back)."""
        assert self.seqs_host is not None
        new_key = self.key_count_host  # each row's new key's index
        entering = np.flatnonzero(new_key % block_size == 0)
        if entering.shape[0] == 0:
            return
        cols = new_key[entering] // block_size
        rows_t, cols_t, seqs_t = upload(self.blocks.device, entering, cols, self.seqs_host[entering])
        self.blocks[rows_t, cols_t] = block_table[seqs_t, cols_t].to(torch.long)
        # Row sets of the rows past a later start layer hold their own copies of the ids: built again.
        if len(self.starts) > 1:
            self._forget_row_sets(keep_full=True)

    def _forget_row_sets(self, keep_full: bool = False) -> None:
        """The row sets (and their kernels) are built again at their first layer: they hold token
        indices, block indices and mask tensors that just changed (keep_full: all but the set of every row,
        whose block ids are the plan's own)."""
        full = self._sets.get(len(self.starts)) if keep_full else None
        self._sets.clear()
        self._by_layer.clear()
        if full is not None:
            self._sets[len(self.starts)] = full


def _width(widest: int, block_size: int, table_blocks: int) -> tuple[int, int]:
    """(masks' width, blocks per row) for rows up to `widest` keys moving on in place: GROWTH keys of room,
    within the block table's width."""
    nb = min(-(-(widest + GROWTH) // block_size), table_blocks)
    return min(widest + GROWTH, nb * block_size), nb


_ARANGES: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _arange(n: int, like: torch.Tensor) -> torch.Tensor:
    """0 .. n - 1 in the dtype and device of `like` (query_start_loc of an all-decode step), kept per size."""
    key = (n, like.dtype, like.device)
    found = _ARANGES.get(key)
    if found is None:
        found = _ARANGES[key] = torch.arange(n, dtype=like.dtype, device=like.device)
    return found


def upload(device: torch.device, *arrays: np.ndarray) -> list[torch.Tensor]:
    """Host arrays as tensors on `device`. On the CPU they are the arrays' memory. Elsewhere they travel as one
    buffer (pinned on CUDA, copied with non_blocking: the host does not wait for the device) and come back as
    views of it, each at an 8-byte-aligned offset in its own dtype and shape."""
    arrays = tuple(np.ascontiguousarray(a) for a in arrays)
    if device.type == "cpu":
        return [torch.from_numpy(a) for a in arrays]
    offsets, size = [], 0
    for a in arrays:
        offsets.append(size)
        size += -(-a.nbytes // 8) * 8
    host = torch.empty(max(size, 8), dtype=torch.uint8, pin_memory=device.type == "cuda")
    flat = host.numpy()
    for a, at in zip(arrays, offsets, strict=True):
        flat[at : at + a.nbytes] = a.reshape(-1).view(np.uint8)
    sent = host.to(device, non_blocking=True)
    return [
        sent[at : at + a.nbytes].view(torch.from_numpy(a[:0].reshape(-1)).dtype).view(a.shape)
        for a, at in zip(arrays, offsets, strict=True)
    ]


@dataclass(frozen=True)
class StepMetadata:
    """What the step plan reads of a step's attention metadata, with the batch's row counts on the host.

    On a GPU, vLLM's attention metadata holds query_start_loc and seq_lens on the device; reading them (and
    comparing them from one step to the next) would make the host wait for the device in every step. vLLM
    keeps host copies in its common metadata, which a backend's metadata builder passes on in this form."""

    query_start_loc: torch.Tensor  # long [B + 1], host
    seq_lens: torch.Tensor  # [B], host
    block_table: torch.Tensor  # [B, max blocks], the device's
    num_actual_tokens: int


def build_plan(
    state: WorkerState,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    device: torch.device,
    num_tokens: int | None = None,
    previous: StepPlan | None = None,
) -> StepPlan | None:
    """The rows of this step that need alignment, or None when there are none (stock path only).

    num_tokens: the step's scheduled tokens; default `query_start_loc[batch size]` (not vLLM's
    `num_actual_tokens`, which its GPU runner pads to a CUDA-graph size: `num_tokens_padded`).
    previous: the last step's plan; a decode step over the same rows moves it on in place.
    """
    if previous is not None and previous.advance(state, query_start_loc, seq_lens, block_table, block_size):
        return previous
    t = state.arrays()
    n = state.batch_size
    if not t.any_enabled or n == 0 or seq_lens.shape[0] < n:
        return None
    # Index arithmetic in numpy (a fresh plan runs at every batch change: on a few dozen numbers a numpy op
    # costs a third of a torch one); the masks below are torch, from the alignment's own span_masks.
    seq = seq_lens[:n].cpu().numpy().astype(np.int64)
    qsl = query_start_loc[: n + 1].cpu().numpy().astype(np.int64)
    q_len = qsl[1:] - qsl[:-1]
    # Rows at positions >= align_from are the last `count` rows of each sequence's chunk.
    count = np.minimum(np.where(t.enabled, np.maximum(seq - t.align_from, 0), 0), q_len)
    total = int(count.sum())
    if total == 0:
        return None
    batch_row = np.repeat(np.arange(n), count)  # [R]
    first = np.cumsum(count) - count  # first aligned row of each sequence, within R
    k = np.arange(total) - first[batch_row]
    token_index = qsl[batch_row + 1] - count[batch_row] + k
    position = seq[batch_row] - count[batch_row] + k  # 0-based position of each aligned row

    seqs = np.flatnonzero(count > 0)  # [S]
    slot_of = np.full(n, -1, dtype=np.int64)
    slot_of[seqs] = np.arange(seqs.shape[0])
    widest = int(seq[seqs].max())
    moves_on = total == seqs.shape[0] == int(t.enabled.sum())  # decode steps may move it on (StepPlan.advance)
    if moves_on:
        num_keys, nb = _width(widest, block_size, block_table.shape[1])
    else:
        num_keys, nb = widest, -(-widest // block_size)
    room = num_keys - widest

    width = min(t.image_keys.shape[1], num_keys)
    image_keys = np.zeros((total, num_keys), dtype=bool)
    image_keys[:, :width] = t.image_keys[batch_row, :width]
    pos = torch.from_numpy(position)
    valid = torch.arange(num_keys)[None, :] <= pos[:, None]
    semantic, other = span_masks(
        torch.arange(num_keys),
        pos,
        torch.from_numpy(t.last_image[batch_row]),
        torch.from_numpy(image_keys),
        torch.full((total,), state.other_is_image_only),
    )
    start = t.start_layer[batch_row]
    starts = sorted(set(start.tolist()))
    omega_host = t.omega[batch_row]
    # Everything the device needs, in one upload (one pinned buffer, non-blocking, on a GPU): eleven separate
    # pageable copies would each wait for the device.
    (token_t, batch_t, slot_t, count_t, start_t, seqs_table, omega, kappa, valid_t, semantic_t, other_t) = upload(
        device,
        token_index,
        batch_row,
        slot_of[batch_row],
        position + 1,
        start,
        seqs,
        omega_host,
        t.kappa[batch_row],
        valid.numpy(),
        semantic.numpy(),
        other.numpy(),
    )
    blocks = block_table[seqs_table, :nb].to(torch.long)
    decode = (t, seq_lens[:n] + 1, seqs_table) if moves_on else None
    on_host = omega_host > 0

    return StepPlan(
        token_index=token_t,
        batch_row=batch_t,
        seq_slot=slot_t,
        blocks=blocks,
        num_keys=num_keys,
        key_count=count_t,
        key_count_host=position + 1,
        prepared=prepare_rows(valid_t, semantic_t, other_t, omega, kappa, bool(on_host.all())),
        omega=omega,
        kappa=kappa,
        start_layer=start_t,
        start_layer_host=start,
        on_host=on_host,
        min_start=starts[0],
        max_start=starts[-1],
        starts=starts,
        num_tokens=int(qsl[-1]) if num_tokens is None else num_tokens,
        decode=decode,
        room=room,
        seqs_host=seqs if moves_on else None,
    )
