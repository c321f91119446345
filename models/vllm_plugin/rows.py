"""SEVI on the rows of a vLLM batch: which flattened query rows to align, and the aligned attention.

Backend-agnostic: a backend runs its stock kernel (or skips it when every row is aligned), then calls
:func:`align_layer` with per-block views of its paged cache (:class:`PagedKV`). Everything is
vectorised over the aligned rows (no Python loop over rows, heads or blocks).

Which rows (spec section 2): for each sequence with alignment on, the query positions at or past its
last prompt row. At prefill that is the last prompt row; in decode, the one new row; after a
preemption vLLM recomputes prompt and outputs in one prefill, and every row from the last prompt row on
is aligned again over its own causal keys, which the spec says equals the cached run.

Cost model (the reason for the shapes below): on CPU each torch op costs microseconds of dispatch
whatever its size, and the step runs every aligned layer, so everything that does not depend on the
layer (row indices, block indices, masks, the alignment's prepared inputs) is built by the first aligned
layer (:class:`StepPlan`, :class:`RowSet`), and the decode steps that follow over the same rows move it on
in place (a key more per row: three small ops) until the masks' room or a row's block runs out. On the
CPU a layer then makes three calls with arguments bound once per plan (:class:`BoundLayer`): q.K by the C
kernel reading the blocks in place, the compiled operator, softmax and p.V by the C kernel. Elsewhere (GPU,
no compiler) it gathers the blocks it reads (one `index_select` each for K and V, in the cache's own
layout), one batched matmul per block for q.K, the operator, softmax and p.V, one write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.alignment import (
    PreparedRows,
    ShardGather,
    add_key_,
    align_prepared,
    align_sharded,
    compiled_for,
    operator_inputs,
    prepare_rows,
    select_rows,
    span_masks,
    widen,
)
from models.kernels.choice import aligned_kernel
from models.vllm_plugin.paged_kernel import PagedKernel, kernel
from models.vllm_plugin.state import RowArrays, WorkerState

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder layer number from a vLLM layer name (`language_model.model.layers.3.self_attn.attn`)."""
    found = _LAYER_RE.findall(name)
    return int(found[-1]) if found else None


@dataclass(frozen=True)
class PagedKV:
    """One layer's paged cache as per-block views, without copying (the layout its kernel writes).

    key: `[num_blocks, kv_heads, head_size, block_size]` when `key_transposed` (the AVX2 CPU kernel)
    else `[num_blocks, kv_heads, block_size, head_size]`; value likewise with `value_transposed`.
    Layouts no strided view describes (the AMX kernel's tiles of key pairs) come as flat block regions
    `[num_blocks, kv_heads, block_size * head_size]` with `key_order` / `value_order`: for each (slot, d)
    in row-major order, its place in the region (read by gathering; the C kernel does not take them).
    """

    key: torch.Tensor
    value: torch.Tensor
    key_transposed: bool
    value_transposed: bool
    key_order: torch.Tensor | None = None  # long [block_size * head_size]
    value_order: torch.Tensor | None = None
    head_size: int = 0  # with the orders: D of the flat regions

    @property
    def block_size(self) -> int:
        if self.key_order is not None:
            return self.key.shape[-1] // self.head_size
        return self.key.shape[-1] if self.key_transposed else self.key.shape[-2]


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
    _bound: dict[tuple[Any, ...], BoundLayer | None] = field(default_factory=dict)
    # What a backend derives once per row set and step and shares across the step's layers (the CPU backend:
    # the rows its stock kernel still computes); cleared when the plan moves on to the next step.
    derived: dict[str, Any] = field(default_factory=dict)

    def bound(self, cache: PagedKV, scale: float, num_kv_heads: int, n_heads: int, head_dim: int) -> BoundLayer | None:
        """The calls of this step's layers with all they share bound (:class:`BoundLayer`), built by the
        first layer that reads a cache of this shape and layout; None where the C kernel or the compiled
        operator does not apply (:func:`align_layer` then takes the general path)."""
        k, v = cache.key, cache.value
        key = (k.shape, k.stride(), v.stride(), k.dtype, v.dtype, cache.key_transposed, cache.value_transposed,
               scale, num_kv_heads, n_heads, head_dim)
        if key not in self._bound:
            self._bound[key] = BoundLayer.build(self, cache, scale, num_kv_heads, n_heads, head_dim)
        return self._bound[key]


@dataclass
class BoundLayer:
    """An aligned layer as three calls (q.K by the C kernel, the compiled operator, softmax and p.V by the C
    kernel) with everything bound that the step's layers share: kernel shapes, strides, block indices and
    key counts, the operator's masks, and the scores buffer (each layer's q.K writes it, and its operator
    call reads it before the next layer runs). A layer passes only its query, its cache and its output.

    Why: at one row the three calls compute for about 3 us and their argument handling cost 12 more (24.7
    -> 12.3 us per layer cache-hot); every decoder layer past the start layer pays it every step. The
    bound tensors are the plan's: moved on in place (key counts, masks), the calls read the next step's.
    """

    kernel: PagedKernel
    operator: Any  # models.alignment_compiled.CompiledOperator
    scores_args: tuple[Any, ...]
    values_args: tuple[Any, ...]
    operator_args: list[torch.Tensor]  # the scores buffer [R, H, K] float32 first
    keep: tuple[torch.Tensor, ...]  # tensors whose pointers are in the args

    @staticmethod
    def build(rows: RowSet, cache: PagedKV, scale: float, num_kv_heads: int, n_heads: int,
              head_dim: int) -> BoundLayer | None:
        kern = _kernel_for(cache)
        operator = compiled_for(rows.prepared)
        if kern is None or operator is None:
            return None
        # K: the width of the masks the operator takes, which the scores buffer must match
        r, rep, num_keys = rows.token_index.shape[0], n_heads // num_kv_heads, rows.prepared.key_bias.shape[-1]
        blocks, counts = rows.block_index.contiguous(), rows.key_count.contiguous()
        scores = torch.empty(r, n_heads, num_keys, dtype=torch.float32)
        return BoundLayer(
            kern, operator,
            kern.scores_args(cache.key, cache.key_transposed, blocks, counts, num_keys, scale, r, num_kv_heads, rep,
                             head_dim),
            kern.values_args(cache.value, cache.value_transposed, blocks, counts, num_keys, r, num_kv_heads, rep),
            operator_inputs(scores, rows.prepared), (blocks, counts))

    def run(self, q: torch.Tensor, cache: PagedKV, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned attention of the rows' queries q (float32 `[R, H, D]`, contiguous) into out (likewise);
        returns the heads each stage moved (`[R, H]`, for telemetry)."""
        scores = self.operator_args[0]
        self.kernel.run_scores(q.data_ptr(), cache.key.data_ptr(), self.scores_args, scores.data_ptr())
        aligned, _, _, _, stage1, stage2 = self.operator.run(self.operator_args)
        assert aligned.is_contiguous() and aligned.dtype == torch.float32  # the kernel's softmax runs in place
        self.kernel.run_values(aligned.data_ptr(), cache.value.data_ptr(), self.values_args, out.data_ptr(), True)
        return stage1, stage2


# Keys a plan's masks grow by at a time: each column past a row's keys costs the operator a little on every
# aligned layer (8 rows x 8 heads: 64 columns, about 2.4 us), each widening a few ops and the row sets rebuilt.
GROWTH = 64


@dataclass
class StepPlan:
    """Layer-independent parts of one step's alignment work, built once at the first layer and moved on in
    place by the decode steps that follow (:meth:`advance`)."""

    token_index: torch.Tensor  # long [R]: row in the flattened query / output
    batch_row: torch.Tensor  # long [R]: batch index of each aligned row
    seq_slot: torch.Tensor  # long [R]: index into `blocks` (one slot per distinct sequence)
    blocks: torch.Tensor  # long [S, nb]: block ids covering every key of each sequence
    num_keys: int  # K: the masks' width, the widest row's keys and room to grow in place; a row reads its own
    key_count: torch.Tensor  # long [R]: each row's own keys (position + 1), at most K
    key_count_host: np.ndarray  # the same on the host, moved on alongside: read without a device sync
    prepared: PreparedRows  # every aligned row's masks / knobs in the alignment's kernel shapes
    omega: torch.Tensor  # float32 [R]
    kappa: torch.Tensor  # float32 [R]
    start_layer: torch.Tensor  # long [R]
    min_start: int
    max_start: int
    starts: list[int]  # distinct start layers, ascending: each opens a larger set of rows
    num_tokens: int  # rows in the flattened query (the step's scheduled tokens)
    # For :meth:`advance`, set when each aligned sequence has one aligned row and every row with alignment on
    # is aligned (a decode step, or a prefill step's last prompt row beside decode rows): (row arrays, the
    # next step's seq_lens, the sequences' batch rows). Each row's position is its key count - 1: its next
    # key lies at column key_count.
    decode: tuple[RowArrays, torch.Tensor, torch.Tensor] | None = None
    # Decode steps :meth:`advance` takes before it looks at the block table again: every row's next key must
    # lie within the masks' width and in a block the row already had (vLLM writes a new block's id into the
    # table only when the keys reach it).
    room: int = 0
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
        keep = None if layer >= self.max_start else torch.nonzero(self.start_layer <= layer).squeeze(1)
        if keep is not None and keep.numel() == 0:
            return None

        def pick(x: torch.Tensor) -> torch.Tensor:
            return x if keep is None else x[keep]

        tok = pick(self.token_index)
        p = self.prepared
        return RowSet(
            token_index=tok, batch_row=pick(self.batch_row),
            block_index=self.blocks.to(tok.device)[pick(self.seq_slot)].reshape(-1), key_count=pick(self.key_count),
            prepared=p if keep is None else select_rows(p, keep),
            identity=keep is None and self.covers_all_tokens,
        )

    def advance(self, state: WorkerState, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                block_table: torch.Tensor, block_size: int) -> bool:
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
        if (state.arrays() is not arrays or seq_lens.shape[0] < n or query_start_loc.shape[0] < n + 1
                or not torch.equal(query_start_loc[: n + 1], _arange(n + 1, query_start_loc))
                or not torch.equal(seq_lens[:n], expect)):
            return False
        if self.room == 0:
            self._make_room(block_table, block_size, seqs)
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
        """Before this step's keys are added: the sequences' block ids read again (this step's new keys may
        lie in blocks vLLM just allocated), the masks widened when the widest row needs it, and the room
        that gives (at least this step)."""
        keys = self.key_count_host + 1  # each row's keys this step
        widest = int(keys.max())
        nb = -(-widest // block_size)
        self.blocks = block_table[seqs, :nb].to(torch.long)
        room = _room(keys, block_size)
        if widest + room > self.num_keys:
            self.num_keys = widest + room
            self.prepared = widen(self.prepared, self.num_keys)
        self.room = room + 1
        self._forget_row_sets()

    def _forget_row_sets(self) -> None:
        """The row sets (and their bound calls) are built again at their first layer: they hold token
        indices, block indices and mask tensors that just changed."""
        self._sets.clear()
        self._by_layer.clear()


def _room(keys: np.ndarray, block_size: int) -> int:
    """Decode steps a plan may take in place from rows with `keys` keys each: up to GROWTH, and no row's next
    key past the blocks it has (vLLM fills in a block's id when the keys reach it)."""
    return min(GROWTH, int((-keys % block_size).min()))


_ARANGES: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _arange(n: int, like: torch.Tensor) -> torch.Tensor:
    """0 .. n - 1 in the dtype and device of `like` (query_start_loc of an all-decode step), kept per size."""
    key = (n, like.dtype, like.device)
    found = _ARANGES.get(key)
    if found is None:
        found = _ARANGES[key] = torch.arange(n, dtype=like.dtype, device=like.device)
    return found


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


def step_plan(state: WorkerState, md: Any, block_size: int, device: torch.device) -> StepPlan | None:
    """This step's plan from its attention metadata `md` (query_start_loc, seq_lens, block_table,
    num_actual_tokens; a :class:`StepMetadata` on a GPU): built at the step's first attention layer, which also
    keeps the step's seq_lens (pair lockstep checks), and reused by its other layers (one lookup each)."""
    cached = state.plan_cache
    if cached is not None and cached[0] == state.step and cached[1] == id(md):
        return cached[2]  # type: ignore[no-any-return]
    state.observe_seq_lens(md.seq_lens)
    plan = None
    if state.arrays().any_enabled:
        plan = build_plan(state, md.query_start_loc, md.seq_lens, md.block_table, block_size, device,
                          md.num_actual_tokens, cached[2] if cached is not None else None)
    state.plan_cache = (state.step, id(md), plan)
    return plan


def build_plan(state: WorkerState, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
               block_size: int, device: torch.device, num_tokens: int | None = None,
               previous: StepPlan | None = None) -> StepPlan | None:
    """The rows of this step that need alignment, or None when there are none (stock path only).

    num_tokens: the step's scheduled tokens (vLLM's `num_actual_tokens`); default `query_start_loc[-1]`.
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
    nb = -(-widest // block_size)
    seqs_table = torch.from_numpy(seqs).to(block_table.device)
    blocks = block_table[seqs_table, :nb].to(torch.long)
    moves_on = total == seqs.shape[0] == int(t.enabled.sum())  # decode steps may move it on (StepPlan.advance)
    room = _room(position + 1, block_size) if moves_on else 0
    num_keys = widest + room

    width = min(t.image_keys.shape[1], num_keys)
    image_keys = np.zeros((total, num_keys), dtype=bool)
    image_keys[:, :width] = t.image_keys[batch_row, :width]
    pos = torch.from_numpy(position)
    valid = torch.arange(num_keys)[None, :] <= pos[:, None]
    semantic, other = span_masks(torch.arange(num_keys), pos, torch.from_numpy(t.last_image[batch_row]),
                                 torch.from_numpy(image_keys), torch.full((total,), state.other_is_image_only))
    start = t.start_layer[batch_row]
    starts = sorted(set(start.tolist()))
    omega, kappa = (torch.from_numpy(x[batch_row]).to(device) for x in (t.omega, t.kappa))
    decode = (t, seq_lens[:n] + 1, seqs_table) if moves_on else None

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(device)

    return StepPlan(
        token_index=tensor(token_index), batch_row=tensor(batch_row), seq_slot=tensor(slot_of[batch_row]),
        blocks=blocks, num_keys=num_keys, key_count=tensor(position + 1), key_count_host=position + 1,
        prepared=prepare_rows(valid.to(device), semantic.to(device), other.to(device), omega, kappa),
        omega=omega, kappa=kappa, start_layer=tensor(start), min_start=starts[0], max_start=starts[-1],
        starts=starts, num_tokens=int(qsl[-1]) if num_tokens is None else num_tokens, decode=decode, room=room,
    )


def _blocks(view: torch.Tensor, transposed: bool, index: torch.Tensor, width: int,
            order: torch.Tensor | None = None, head_size: int = 0) -> torch.Tensor:
    """The blocks at `index`, each cut to its first `width` keys: `[len(index), G, D, width]` when
    transposed, else `[len(index), G, width, D]`. One copy, of only what is read (two for an `order`ed
    layout: the blocks, then their values put in (slot, d) order)."""
    if order is not None:
        blocks = view.index_select(0, index)[..., order].unflatten(-1, (-1, head_size))
        return blocks if width == blocks.shape[2] else blocks[:, :, :width].contiguous()
    if width == (view.shape[-1] if transposed else view.shape[-2]):
        return view.index_select(0, index)  # whole blocks: no slice
    src = view[..., :width] if transposed else view[:, :, :width]
    return src.index_select(0, index)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


_ZEROS: dict[torch.device, torch.Tensor] = {}


def _zero(device: torch.device) -> torch.Tensor:
    """A float32 0-d zero (baddbmm's ignored input with beta=0), one per device."""
    z = _ZEROS.get(device)
    if z is None:
        z = _ZEROS[device] = torch.zeros((), device=device)
    return z


def _kernel_for(cache: PagedKV) -> PagedKernel | None:
    """The C kernel where it applies (a cache in CPU memory of a dtype it reads, and the kernel built)."""
    if cache.key.device.type != "cpu":
        return None  # before kernel(): a GPU never builds the CPU kernel
    kern = kernel()
    if (kern is None or cache.key.dtype not in kern.cache_dtypes or cache.value.dtype != cache.key.dtype
            or cache.key_order is not None):
        return None
    return kern


def block_scores(q: torch.Tensor, cache: PagedKV, block_index: torch.Tensor, num_keys: int,
                 scale: float, use_kernel: bool = True, key_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-softmax scores `[R, H, num_keys]` of rows `q` (`[R, G, rep, D]`, float32) against the keys of
    the blocks `block_index` (`[R * nb]`, row-major: row r reads blocks r*nb .. r*nb+nb-1).
    key_counts (long `[R]`): the keys each row needs; the rest of its scores are left to the key mask
    (the kernel writes 0 there and reads nothing past them; the torch path computes them all).

    On CPU, the C kernel of paged_kernel.py reads the blocks in place. Otherwise, in torch: the query
    heads of a KV head are grouped along the row axis of one matmul (GQA without repeating K), and K
    is read in the cache's own layout (transposed or not), block by block: the full blocks in one
    batch, the last block only up to the last key (one copy of just what is read).
    """
    kern = _kernel_for(cache) if use_kernel else None
    if kern is not None:
        return kern.scores(q, cache.key, cache.key_transposed, block_index, num_keys, scale, key_counts)
    r = q.shape[0]
    nb = block_index.shape[0] // max(r, 1)
    if nb == 1:
        return _scores_on(q, cache, block_index, 1, num_keys, scale)
    bs = cache.block_size
    full, tail = nb - 1, num_keys - (nb - 1) * bs
    index = block_index.view(r, nb)
    head = _scores_on(q, cache, index[:, :full].reshape(-1), full, bs, scale)
    return torch.cat([head, _scores_on(q, cache, index[:, full], 1, tail, scale)], -1)


def _scores_on(q: torch.Tensor, cache: PagedKV, block_index: torch.Tensor, nb: int, width: int,
               scale: float) -> torch.Tensor:
    """Scores `[R, H, nb * width]` against `nb` blocks per row, each read up to `width` keys."""
    r, g, rep, d = q.shape
    k = _f32(_blocks(cache.key, cache.key_transposed, block_index, width, cache.key_order, cache.head_size))
    k = k.view(r * nb * g, d, width) if cache.key_transposed else k.view(r * nb * g, width, d).transpose(1, 2)
    qb = q if nb == 1 else q.unsqueeze(1).expand(r, nb, g, rep, d)
    s = torch.baddbmm(_zero(q.device), qb.reshape(r * nb * g, rep, d), k, beta=0.0, alpha=scale)
    if nb == 1:
        return s.view(r, g * rep, width)
    # [R, nb, G, rep, width] -> [R, H, nb * width]: the blocks side by side.
    return s.view(r, nb, g, rep, width).permute(0, 2, 3, 1, 4).reshape(r, g * rep, nb * width)


def block_values(probs: torch.Tensor, cache: PagedKV, block_index: torch.Tensor, num_kv_heads: int,
                 out: torch.Tensor | None = None, use_kernel: bool = True,
                 key_counts: torch.Tensor | None = None, softmax: bool = False) -> torch.Tensor:
    """`probs @ V`: probs `[R, H, num_keys]` float32 -> `[R, G, rep, D]`, written into `out` (`[R, H, D]`
    float32, contiguous) when given. Blocks are read like :func:`block_scores` reads them; with
    key_counts, probabilities past a row's count must be 0 (the kernel does not read those keys).
    softmax: `probs` are scores (masked keys at MASKED) and the output is p.V of their softmax, taken by
    the kernel while each row is in cache (`probs` is then overwritten: scratch), or by torch."""
    kern = _kernel_for(cache) if use_kernel else None
    if kern is not None and (not softmax or (probs.is_contiguous() and probs.dtype == torch.float32)):
        return kern.values(probs, cache.value, cache.value_transposed, block_index, num_kv_heads, out, key_counts,
                           softmax)
    if softmax:
        probs = torch.softmax(probs, dim=-1)
    r, _, num_keys = probs.shape
    nb = block_index.shape[0] // max(r, 1)
    if nb == 1:
        return _values_on(probs, cache, block_index, 1, num_kv_heads, out)
    full = (nb - 1) * cache.block_size
    index = block_index.view(r, nb)
    head = _values_on(probs[..., :full], cache, index[:, : nb - 1].reshape(-1), nb - 1, num_kv_heads, None)
    result = head.add_(_values_on(probs[..., full:], cache, index[:, nb - 1], 1, num_kv_heads, None))
    return result if out is None else out.view_as(result).copy_(result)


def _values_on(probs: torch.Tensor, cache: PagedKV, block_index: torch.Tensor, nb: int, num_kv_heads: int,
               out: torch.Tensor | None) -> torch.Tensor:
    """`probs @ V` over `nb` blocks per row, each read up to `probs.shape[-1] / nb` keys."""
    r, h, n = probs.shape
    g, rep = num_kv_heads, h // num_kv_heads
    width = n // nb
    v = _f32(_blocks(cache.value, cache.value_transposed, block_index, width, cache.value_order, cache.head_size))
    d = v.shape[-2] if cache.value_transposed else v.shape[-1]
    v = v.view(r * nb * g, d, width).transpose(1, 2) if cache.value_transposed else v.view(r * nb * g, width, d)
    if nb == 1:
        p = probs.reshape(r * g, rep, width)
        if out is not None:
            torch.bmm(p, v, out=out.view(r * g, rep, d))
            return out.view(r, g, rep, d)
        return torch.bmm(p, v).view(r, g, rep, d)
    # Each block's partial product, summed over the blocks.
    p = probs.reshape(r, g, rep, nb, width).permute(0, 3, 1, 2, 4).reshape(r * nb * g, rep, width)
    return torch.bmm(p, v).view(r, nb, g, rep, d).sum(1)


def align_layer(plan: StepPlan, layer: int, query: torch.Tensor, output: torch.Tensor, cache: PagedKV,
                scale: float, num_kv_heads: int, state: WorkerState | None, rows: RowSet | None = None,
                shards: ShardGather | None = None) -> None:
    """Overwrite `output` rows of this layer's aligned rows with SEVI-aligned attention.

    query: [T, H, D]; output: [T, H * D] or [T, H, D] (written in place); state: where the layer's
    telemetry is recorded (:meth:`WorkerState.record`, counted once per step); rows: `plan.rows_at(layer)`
    where the caller has it already; shards: with tensor parallelism, the gather over the workers that
    hold the layer's other heads (`query` holds this worker's): the operator then exchanges its
    cross-head quantities (:func:`models.alignment.align_sharded`), one collective per aligned layer.
    """
    rows = rows if rows is not None else plan.rows_at(layer)
    if rows is None:
        return
    n_tokens, n_heads, head_dim = query.shape
    r = rows.token_index.shape[0]
    q = _f32(query[:r] if rows.identity else query.index_select(0, rows.token_index)).contiguous()
    out = output.view(n_tokens, n_heads, head_dim)
    direct = rows.identity and out.dtype == torch.float32 and out.is_contiguous()
    new = out[:r] if direct else torch.empty(r, n_heads, head_dim, dtype=torch.float32, device=q.device)
    choice = aligned_kernel()
    bound = rows.bound(cache, scale, num_kv_heads, n_heads, head_dim) if shards is None and choice == "c" else None
    moved = None
    if bound is not None:  # the C kernel and the compiled operator, arguments bound once per plan
        stage1, stage2 = bound.run(q, cache, new)
    elif choice == "triton" and cache.key_order is None:  # the Triton kernels, reading the blocks in place
        from models.kernels.sevi_decode import aligned_decode

        _, groups, moved = aligned_decode(q, cache.key, cache.value, cache.key_transposed, cache.value_transposed,
                                          rows.block_index, rows.key_count, rows.prepared, scale, num_kv_heads,
                                          new, shards=shards)
        assert groups is not None and groups.stage1 is not None and groups.stage2 is not None
        stage1, stage2 = groups.stage1, groups.stage2
    else:
        c_kernel = choice == "c"  # "torch": gather + bmm even where the C kernel is built
        scores = block_scores(q.view(r, num_kv_heads, n_heads // num_kv_heads, head_dim), cache, rows.block_index,
                              plan.num_keys, scale, use_kernel=c_kernel, key_counts=rows.key_count)  # [R, H, K]
        if shards is None:
            aligned, groups = align_prepared(scores, rows.prepared)  # masked keys already at MASKED
        else:
            aligned, groups, moved = align_sharded(scores, rows.prepared, shards)
        block_values(aligned, cache, rows.block_index, num_kv_heads, new, use_kernel=c_kernel,
                     key_counts=rows.key_count, softmax=True)
        assert groups.stage1 is not None and groups.stage2 is not None
        stage1, stage2 = groups.stage1, groups.stage2
    if not direct:
        out.index_copy_(0, rows.token_index, new.to(out.dtype))
    if state is not None:
        state.record(rows.batch_row, stage1, stage2, moved)
