"""CPU_ATTN with SEVI: vLLM's fused CPU kernel for every row, then the aligned rows recomputed.

Registered over `CPU_ATTN` for every model by :func:`sevi.engines.vllm.plugin.register`; `get_name()` stays
"CPU_ATTN" because vLLM keys platform checks on it. Batches without aligned rows cost one attribute
check per layer; in a layer the stock kernel computes only the rows that are not aligned there
(skipped when every row is, run on the other sequences when some sequences' whole query is: cpu_stock.py).

The paged cache is `[num_blocks, kv_heads, block_size, 2 * head_size]`: per (block, head) a K region
then a V region of `block_size * head_size` values each. How the kernel orders values inside a region
depends on its ISA (on the AVX2 build K is stored transposed, `[head_size, block_size]`, V row-major),
so the layout is probed once per (ISA, dtype, block, head size) by writing known K/V through
`cpu_attn_reshape_and_cache` and reading them back. Layouts that are no strided view (the AMX
kernel's, for bfloat16 on CPUs with AMX) are learned as a permutation of each block region: where it is the
AMX layout the C kernel knows (sevi/kernels/paged_kv.py: amx_order) the kernel reads it in place, any other
permutation is read by gathering; anything else refuses to run rather than align against garbage.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from sevi.engines.vllm.plugin.aligned_impl import AlignedImpl
from sevi.engines.vllm.plugin.cpu_stock import NO_STOCK_ROWS, StockRows, stock_rows
from sevi.engines.vllm.plugin.paged_read import PagedKV
from sevi.engines.vllm.plugin.plan import RowSet, StepMetadata
from sevi.engines.vllm.plugin.rows import align_layer, cache_reader
from sevi.engines.vllm.plugin.step import SeviStep, StepBuilder
from sevi.engines.vllm.plugin.tensor_parallel import head_shards
from sevi.kernels.alignment_dispatch import compiled_operator, compiled_sharded
from sevi.kernels.paged_kv import amx_order, kernel


def _write_probe(
    isa: str, dtype: torch.dtype, block_size: int, head_size: int, k: torch.Tensor, v: torch.Tensor, first_slot: int = 1
) -> torch.Tensor:
    """Block regions `[n_blocks, kv_heads, 2, block_size * head_size]` after the kernel's own cache writer
    stored `k`, `v` (`[n, kv_heads, head_size]`) at slots first_slot .. first_slot + n - 1."""
    n, kv_heads = k.shape[0], k.shape[1]
    n_blocks = -(-(n + first_slot) // block_size)
    cache = torch.zeros(n_blocks, kv_heads, block_size, 2 * head_size, dtype=dtype)
    key_cache, value_cache = cache.view(n_blocks, kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        k.to(dtype), v.to(dtype), key_cache, value_cache, torch.arange(n, dtype=torch.long) + first_slot, isa
    )
    return cache.view(n_blocks, kv_heads, 2, block_size * head_size)


@functools.lru_cache(maxsize=16)
def cache_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> tuple[bool, bool] | None:
    """(K transposed, V transposed) inside a block region, measured with the kernel's own cache writer;
    None when neither is the layout (see :func:`cache_order`)."""
    kv_heads, n = 2, block_size + 3
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(n, kv_heads, head_size, generator=gen).to(dtype)
    v = torch.randn(n, kv_heads, head_size, generator=gen).to(dtype)
    regions = _write_probe(isa, dtype, block_size, head_size, k, v)
    n_blocks, slots = regions.shape[0], torch.arange(n) + 1

    def read(part: int, transposed: bool) -> torch.Tensor:
        r = regions[:, :, part]
        blk = (
            r.view(n_blocks, kv_heads, head_size, block_size).transpose(-1, -2)
            if transposed
            else r.view(n_blocks, kv_heads, block_size, head_size)
        )
        return blk.transpose(0, 1).reshape(kv_heads, n_blocks * block_size, head_size)[:, slots].transpose(0, 1)

    found = []
    for part, want in ((0, k), (1, v)):
        options = [t for t in (False, True) if torch.equal(read(part, t), want)]
        if not options:
            return None
        found.append(options[0])
    return found[0], found[1]


@functools.lru_cache(maxsize=16)
def cache_order(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a layout that is not a strided view (the AMX kernel keeps K in tiles of 16 keys x pairs of
    dims, V in pairs of keys): where each (slot, d) of a block lies in its region, K's then V's, long
    `[block_size * head_size]` in row-major (slot, d) order. Learned by writing each slot's and each
    dim's number (in base-128 digits, exact in 16-bit floats; 0 marks what was not written) through the
    kernel's own writer, then checked on random values; anything but a permutation refuses to run."""
    digits, size = 128, block_size * head_size
    slot = torch.arange(block_size)[:, None].expand(block_size, head_size)
    dim = torch.arange(head_size)[None, :].expand(block_size, head_size)

    def written(number: torch.Tensor) -> torch.Tensor:  # [block_size, head_size] -> K's and V's regions
        x = number.to(torch.float32)[:, None, :]  # one KV head, the slots of block 0
        return _write_probe(isa, dtype, block_size, head_size, x, x, first_slot=0)[0, 0].to(torch.float32)

    lo_s, hi_s, lo_d, hi_d = (
        written(x) for x in (slot % digits + 1, slot // digits + 1, dim % digits + 1, dim // digits + 1)
    )
    unknown = RuntimeError(f"SEVI: unknown CPU KV cache layout for isa={isa} dtype={dtype}; cannot read K/V")
    orders = []
    for part in (0, 1):
        if bool((lo_s[part] == 0).any()):
            raise unknown
        slot_at = (lo_s[part] - 1) + (hi_s[part] - 1) * digits  # the (slot, d) stored at each region position
        index = (slot_at * head_size + (lo_d[part] - 1) + (hi_d[part] - 1) * digits).long()
        if not torch.equal(index.sort().values, torch.arange(size)):
            raise unknown
        order = torch.empty(size, dtype=torch.long)
        order[index] = torch.arange(size)
        orders.append(order)
    gen = torch.Generator().manual_seed(1)  # check: random values in a second, full block
    k = torch.randn(2 * block_size, 1, head_size, generator=gen).to(dtype)
    v = torch.randn(2 * block_size, 1, head_size, generator=gen).to(dtype)
    regions = _write_probe(isa, dtype, block_size, head_size, k, v, first_slot=0)
    for part, want in ((0, k), (1, v)):
        if not torch.equal(regions[1, 0, part][orders[part]].view(block_size, head_size), want[block_size:, 0]):
            raise unknown
    return orders[0], orders[1]


def read_cpu_kv(
    kv_cache: torch.Tensor, blocks: torch.Tensor, k_t: bool, v_t: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V `[S, kv_heads, nb * block_size, head_size]` of the sequences whose blocks are given.

    Materialises whole sequences (gather, then permute): the hot path reads blocks in place instead
    (:func:`paged_cpu_kv`); this is the plain reading the tests check it against."""
    n_blocks, kv_heads, block_size, two_d = kv_cache.shape
    head_size = two_d // 2
    regions = kv_cache.view(n_blocks, kv_heads, 2, block_size * head_size)[blocks]  # [S, nb, G, 2, bs*D]
    s, nb = blocks.shape

    def unpack(part: int, transposed: bool) -> torch.Tensor:
        r = regions[:, :, :, part]
        x = (
            r.view(s, nb, kv_heads, head_size, block_size).transpose(-1, -2)
            if transposed
            else r.view(s, nb, kv_heads, block_size, head_size)
        )
        return x.permute(0, 2, 1, 3, 4).reshape(s, kv_heads, nb * block_size, head_size)

    return unpack(0, k_t), unpack(1, v_t)


def paged_cpu_kv(kv_cache: torch.Tensor, k_t: bool, v_t: bool) -> PagedKV:
    """Per-block views of the CPU cache, no copy: region (block, head, 0) is K, (block, head, 1) is V."""
    n_blocks, kv_heads, block_size, two_d = kv_cache.shape
    head_size = two_d // 2
    regions = kv_cache.view(n_blocks, kv_heads, 2, block_size * head_size)

    def part(i: int, transposed: bool) -> torch.Tensor:
        return regions[:, :, i].unflatten(-1, (head_size, block_size) if transposed else (block_size, head_size))

    return PagedKV(part(0, k_t), part(1, v_t), k_t, v_t)


def ordered_cpu_kv(kv_cache: torch.Tensor, k_order: torch.Tensor, v_order: torch.Tensor) -> PagedKV:
    """The CPU cache as flat block regions with the orders of :func:`cache_order` (layouts that are not a
    strided view), marked `amx` where they are the AMX layout the C kernel reads in place."""
    n_blocks, kv_heads, block_size, two_d = kv_cache.shape
    head_size = two_d // 2
    regions = kv_cache.view(n_blocks, kv_heads, 2, block_size * head_size)
    amx_k, amx_v = amx_order(block_size, head_size)
    amx = (
        kv_cache.dtype == torch.bfloat16
        and head_size % 16 == 0
        and block_size % 16 == 0
        and torch.equal(k_order, amx_k)
        and torch.equal(v_order, amx_v)
    )
    return PagedKV(regions[:, :, 0], regions[:, :, 1], False, False, k_order, v_order, head_size, amx)


def cpu_kv(kv_cache: torch.Tensor, isa: str, head_size: int) -> PagedKV:
    """This layer's cache as the aligned rows read it: strided views where the layout is one, else orders."""
    layout = cache_layout(isa, kv_cache.dtype, kv_cache.shape[2], head_size)
    if layout is not None:
        return paged_cpu_kv(kv_cache, *layout)
    return ordered_cpu_kv(kv_cache, *cache_order(isa, kv_cache.dtype, kv_cache.shape[2], head_size))


def describe_cache(dtype: torch.dtype, block_size: int, head_size: int) -> dict[str, str]:
    """What vLLM's CPU attention keeps in its paged cache on this machine and how SEVI's aligned rows read it,
    for /ready and the start-up log: `kv_cache_isa` (the kernel vLLM picks: amx, vec, vec16, ...),
    `kv_cache_layout`, and `aligned_read` ("in place" by the C kernel, or "gather" by torch)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_size)
    layout = cache_layout(isa, dtype, block_size, head_size)
    placeholder = torch.empty(1, 1, block_size, 2 * head_size, dtype=dtype)
    if layout is not None:
        k_t, v_t = layout
        name = f"K {'[D, block]' if k_t else '[block, D]'}, V {'[D, block]' if v_t else '[block, D]'}"
        paged = paged_cpu_kv(placeholder, k_t, v_t)
    else:
        paged = ordered_cpu_kv(placeholder, *cache_order(isa, dtype, block_size, head_size))
        name = "AMX tiles (K: 16 keys x dim pairs, V: 16 dims x key pairs)" if paged.amx else "other (learned order)"
    reads = {"c": "in place (C kernel)", "triton": "in place (Triton)"}.get(cache_reader(paged)[0], "gather (torch)")
    return {"kv_cache_isa": isa, "kv_cache_layout": name, "aligned_read": reads}


class SeviCPUAttentionImpl(AlignedImpl, CPUAttentionBackendImpl):
    _paged: tuple[torch.Tensor, PagedKV] | None = None  # this layer's cache tensor and its block views

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Build (or load) the paged K/V kernel and the compiled operator while the model loads, not in the
        # first aligned request.
        kernel()
        compiled_operator()
        self._shards = head_shards()  # None with one worker: no collective
        if self._shards is not None:
            compiled_sharded()  # the operator's halves on either side of the workers' exchange

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,  # type: ignore[no-untyped-def]
        output_scale=None,
        output_block_scale=None,
    ) -> torch.Tensor:
        step = getattr(attn_metadata, "sevi", None)  # None: no metadata (profiling), or no SEVI row in the batch
        plan, rows = self._plan_rows(layer, step)
        # The stock kernel computes only the rows that are not aligned here (the cache write is a separate
        # op, do_kv_cache_update): when every row is aligned it is skipped, when some sequences' whole
        # query is aligned it runs on the others (cpu_stock.py), else on every row.
        stock = (
            None
            if rows is None or not self._plain or output_scale is not None
            else self._stock(layer, query, attn_metadata, rows)
        )
        if stock is None:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        elif stock.span is not None:
            first, end = stock.span
            super().forward(layer, query[first:end], key, value, kv_cache, stock.metadata, output[first:end])
        elif stock.tokens.shape[0]:
            part = output.new_empty((stock.tokens.shape[0], *output.shape[1:]))
            super().forward(layer, query.index_select(0, stock.tokens), key, value, kv_cache, stock.metadata, part)
            output.index_copy_(0, stock.tokens, part)
        if rows is None:
            return output
        assert plan is not None and self._layer is not None
        if self._paged is None or self._paged[0] is not kv_cache:
            self._paged = (kv_cache, cpu_kv(kv_cache, layer.isa, self.head_size))
        assert step is not None
        align_layer(
            plan,
            self._layer,
            query,
            output,
            self._paged[1],
            self.scale,
            self.num_kv_heads,
            step.table,
            rows,
            self._shards,
        )
        return output

    def _stock(self, layer: Any, query: torch.Tensor, md: Any, rows: RowSet) -> StockRows | None:
        """The stock kernel's rows for this step and row set (built by the first layer that asks; the row set
        belongs to the plan built from this step's metadata `md`)."""
        if rows.identity:
            return NO_STOCK_ROWS
        if "stock" not in rows.derived:
            rows.derived["stock"] = stock_rows(
                md,
                rows.batch_row,
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_size,
                dtype=query.dtype,
                isa=layer.isa,
                kv_cache_dtype=self.kv_cache_dtype,
            )
        return rows.derived["stock"]  # type: ignore[no-any-return]


@dataclasses.dataclass
class SeviCPUAttentionMetadata(CPUAttentionMetadata):
    """vLLM's CPU attention metadata with SEVI's part of the step (None: no SEVI row in the batch)."""

    sevi: SeviStep | None = None


class SeviCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's builder, then SEVI's step plan from the same step (once per step, for every layer of the group)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sevi = StepBuilder()

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        # The CPU's tensors are the host's: the plan reads query_start_loc and seq_lens as they are.
        view = StepMetadata(md.query_start_loc, md.seq_lens, md.block_table, md.num_actual_tokens)
        step = self._sevi.build(view, self.kv_cache_spec.block_size, self.device)
        fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        return SeviCPUAttentionMetadata(**fields, sevi=step)


class SeviCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_builder_cls() -> type[SeviCPUAttentionMetadataBuilder]:
        return SeviCPUAttentionMetadataBuilder

    @staticmethod
    def get_impl_cls() -> type[SeviCPUAttentionImpl]:
        return SeviCPUAttentionImpl
