"""vLLM's tensor-parallel group as SEVI sees it: the workers that hold the other heads of each layer.

With tensor parallelism each worker's attention holds a shard of a layer's query heads, while SEVI's
stages need the global heads' mean and the core heads' max over all of them. :func:`head_shards` gives
the backends an all-gather over vLLM's tensor-parallel group for that exchange (one per aligned layer,
only in steps with aligned rows; the alignment module combines what it gathers); with one worker there
is none, and the layer runs the single-device path untouched.
"""

from __future__ import annotations

import torch
from vllm.distributed import parallel_state

from sevi.method.alignment import ShardGather


def head_shards() -> ShardGather | None:
    """The gather over this worker's tensor-parallel group (`[R, C]` -> `[workers, R, C]`, in rank order,
    the same on every worker), or None with one worker or outside a distributed vLLM worker."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_tp_group()
    world = group.world_size
    if world == 1:
        return None

    def gather(t: torch.Tensor) -> torch.Tensor:
        return group.all_gather(t.contiguous(), dim=0).view(world, *t.shape)

    return gather


def ranks() -> tuple[int, int]:
    """(tensor-parallel rank, pipeline-parallel rank) of this worker; (0, 0) outside a distributed worker."""
    if not parallel_state.model_parallel_is_initialized():
        return 0, 0
    return parallel_state.get_tp_group().rank_in_group, parallel_state.get_pp_group().rank_in_group
