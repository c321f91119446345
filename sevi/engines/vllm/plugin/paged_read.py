"""Paged reading on the torch path: q.K and p.V of aligned rows against the blocks of vLLM's paged cache.

A backend describes its cache as per-block views (:class:`PagedKV`). On the CPU the C kernel of
sevi/kernels/paged_kv.py reads the blocks in place (:func:`c_kernel_for` says where it applies); elsewhere (GPU,
no compiler) the blocks read are gathered (one `index_select` each for K and V, in the cache's own layout)
and multiplied one batched matmul per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sevi.kernels.paged_kv import PagedKernel, kernel


@dataclass(frozen=True)
class PagedKV:
    """One layer's paged cache as per-block views, without copying (the layout its kernel writes).

    key: `[num_blocks, kv_heads, head_size, block_size]` when `key_transposed` (the AVX2 CPU kernel)
    else `[num_blocks, kv_heads, block_size, head_size]`; value likewise with `value_transposed`.
    Layouts no strided view describes (the AMX kernel's tiles of key pairs) come as flat block regions
    `[num_blocks, kv_heads, block_size * head_size]` with `key_order` / `value_order`: for each (slot, d)
    in row-major order, its place in the region. `amx`: those orders are vLLM's AMX layout exactly
    (:func:`sevi.kernels.paged_kv.amx_order`), which the C kernel reads in place; any other order is read
    by gathering.
    """

    key: torch.Tensor
    value: torch.Tensor
    key_transposed: bool
    value_transposed: bool
    key_order: torch.Tensor | None = None  # long [block_size * head_size]
    value_order: torch.Tensor | None = None
    head_size: int = 0  # with the orders: D of the flat regions
    amx: bool = False  # the orders are vLLM's AMX bfloat16 layout (the C kernel reads it in place)

    @property
    def amx_head_dim(self) -> int:
        """D of flat AMX regions for the C kernel's calls; 0 for a strided view."""
        return self.head_size if self.amx else 0

    @property
    def block_size(self) -> int:
        if self.key_order is not None:
            return self.key.shape[-1] // self.head_size
        return self.key.shape[-1] if self.key_transposed else self.key.shape[-2]


def _blocks(
    view: torch.Tensor,
    transposed: bool,
    index: torch.Tensor,
    width: int,
    order: torch.Tensor | None = None,
    head_size: int = 0,
) -> torch.Tensor:
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


def f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


_ZEROS: dict[torch.device, torch.Tensor] = {}


def _zero(device: torch.device) -> torch.Tensor:
    """A float32 0-d zero (baddbmm's ignored input with beta=0), one per device."""
    z = _ZEROS.get(device)
    if z is None:
        z = _ZEROS[device] = torch.zeros((), device=device)
    return z


def c_kernel_for(cache: PagedKV) -> PagedKernel | None:
    """The C kernel where it applies (a cache in CPU memory of a dtype it reads, and the kernel built)."""
    if cache.key.device.type != "cpu":
        return None  # before kernel(): a GPU never builds the CPU kernel
    kern = kernel()
    if kern is None or cache.key.dtype not in kern.cache_dtypes or cache.value.dtype != cache.key.dtype:
        return None
    if cache.key_order is not None and not (cache.amx and kern.reads_amx):
        return None  # an order the kernel does not know: gathered
    return kern


def block_scores(
    q: torch.Tensor,
    cache: PagedKV,
    block_index: torch.Tensor,
    num_keys: int,
    scale: float,
    use_kernel: bool = True,
    key_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pre-softmax scores `[R, H, num_keys]` of rows `q` (`[R, G, rep, D]`, float32) against the keys of
    the blocks `block_index` (`[R * nb]`, row-major: row r reads blocks r*nb .. r*nb+nb-1).
    key_counts (long `[R]`): the keys each row needs; the rest of its scores are left to the key mask
    (the kernel writes 0 there and reads nothing past them; the torch path computes them all).

    On CPU, the C kernel of sevi/kernels/paged_kv.py reads the blocks in place. Otherwise, in torch: the query
    heads of a KV head are grouped along the row axis of one matmul (GQA without repeating K), and K
    is read in the cache's own layout (transposed or not), block by block: the full blocks in one
    batch, the last block only up to the last key (one copy of just what is read).
    """
    return scores_by(c_kernel_for(cache) if use_kernel else None, q, cache, block_index, num_keys, scale, key_counts)


def scores_by(
    kern: PagedKernel | None,
    q: torch.Tensor,
    cache: PagedKV,
    block_index: torch.Tensor,
    num_keys: int,
    scale: float,
    key_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`block_scores` by the C kernel `kern` (chosen by the caller: :func:`c_kernel_for`), or torch (None)."""
    if kern is not None:
        return kern.scores(q, cache.key, cache.key_transposed, block_index, num_keys, scale, key_counts, cache.amx)
    r = q.shape[0]
    nb = block_index.shape[0] // max(r, 1)
    if nb == 1:
        return _scores_on(q, cache, block_index, 1, num_keys, scale)
    bs = cache.block_size
    full, tail = nb - 1, num_keys - (nb - 1) * bs
    index = block_index.view(r, nb)
    head = _scores_on(q, cache, index[:, :full].reshape(-1), full, bs, scale)
    return torch.cat([head, _scores_on(q, cache, index[:, full], 1, tail, scale)], -1)


def _scores_on(
    q: torch.Tensor, cache: PagedKV, block_index: torch.Tensor, nb: int, width: int, scale: float
) -> torch.Tensor:
    """Scores `[R, H, nb * width]` against `nb` blocks per row, each read up to `width` keys."""
    r, g, rep, d = q.shape
    k = f32(_blocks(cache.key, cache.key_transposed, block_index, width, cache.key_order, cache.head_size))
    k = k.view(r * nb * g, d, width) if cache.key_transposed else k.view(r * nb * g, width, d).transpose(1, 2)
    qb = q if nb == 1 else q.unsqueeze(1).expand(r, nb, g, rep, d)
    s = torch.baddbmm(_zero(q.device), qb.reshape(r * nb * g, rep, d), k, beta=0.0, alpha=scale)
    if nb == 1:
        return s.view(r, g * rep, width)
    # [R, nb, G, rep, width] -> [R, H, nb * width]: the blocks side by side.
    return s.view(r, nb, g, rep, width).permute(0, 2, 3, 1, 4).reshape(r, g * rep, nb * width)


def block_values(
    probs: torch.Tensor,
    cache: PagedKV,
    block_index: torch.Tensor,
    num_kv_heads: int,
    out: torch.Tensor | None = None,
    use_kernel: bool = True,
    key_counts: torch.Tensor | None = None,
    softmax: bool = False,
) -> torch.Tensor:
    """`probs @ V`: probs `[R, H, num_keys]` float32 -> `[R, G, rep, D]`, written into `out` (`[R, H, D]`
    float32, contiguous) when given. Blocks are read like :func:`block_scores` reads them; with
    key_counts, probabilities past a row's count must be 0 (the kernel does not read those keys).
    softmax: `probs` are scores (masked keys at MASKED) and the output is p.V of their softmax, taken by
    the kernel while each row is in cache (`probs` is then overwritten: scratch), or by torch."""
    kern = c_kernel_for(cache) if use_kernel else None
    return values_by(kern, probs, cache, block_index, num_kv_heads, out, key_counts, softmax)


def values_by(
    kern: PagedKernel | None,
    probs: torch.Tensor,
    cache: PagedKV,
    block_index: torch.Tensor,
    num_kv_heads: int,
    out: torch.Tensor | None = None,
    key_counts: torch.Tensor | None = None,
    softmax: bool = False,
) -> torch.Tensor:
    """:func:`block_values` by the C kernel `kern` (chosen by the caller), or torch (None)."""
    if kern is not None and (not softmax or (probs.is_contiguous() and probs.dtype == torch.float32)):
        return kern.values(
            probs,
            cache.value,
            cache.value_transposed,
            block_index,
            num_kv_heads,
            out,
            key_counts,
            softmax,
            cache.amx_head_dim,
        )
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


def _values_on(
    probs: torch.Tensor, cache: PagedKV, block_index: torch.Tensor, nb: int, num_kv_heads: int, out: torch.Tensor | None
) -> torch.Tensor:
    """`probs @ V` over `nb` blocks per row, each read up to `probs.shape[-1] / nb` keys."""
    r, h, n = probs.shape
    g, rep = num_kv_heads, h // num_kv_heads
    width = n // nb
    v = f32(_blocks(cache.value, cache.value_transposed, block_index, width, cache.value_order, cache.head_size))
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
