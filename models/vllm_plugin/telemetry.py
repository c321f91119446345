"""Per-request alignment telemetry read from vLLM's workers, wherever they run.

Each worker counts what its own attention layers did (:data:`models.vllm_plugin.state.STATE`). The
engine asks every worker at once through vLLM's `collective_rpc` (in-process with the `uni` executor,
over vLLM's message queues with `mp` or `ray`) and merges the replies: with tensor parallelism the
workers of one pipeline stage run the same layers and rows (the shards agree on which rows each stage
moved) but hold different heads, so rows are counted once per stage and heads summed over all workers;
pipeline stages hold different layers, so their counts add up.
"""

from __future__ import annotations

from typing import Any

from models.telemetry import HEAD_FIELDS, PAIR_FIELDS, ROW_FIELDS
from models.vllm_plugin.state import STATE
from models.vllm_plugin.tensor_parallel import ranks

Reply = tuple[int, int, dict[str, dict[str, Any]]]


def collect_on_worker(worker: Any, keys: list[str]) -> Reply:
    """`collective_rpc` target: this worker's (tp rank, pp rank) and its telemetry of the requests `keys`
    (filed when they left the batch, or live; see :meth:`WorkerState.collect`)."""
    found = {k: entry for k in keys if (entry := STATE.collect(k)) is not None}
    tp, pp = ranks()
    return tp, pp, found


def merge(replies: list[Reply], key: str) -> dict[str, int]:
    """One request's telemetry from every worker's reply."""
    out: dict[str, int] = {}
    for tp, _, found in replies:
        entry = found.get(key)
        if entry is None:
            continue
        for name, value in entry.items():
            if name in PAIR_FIELDS:  # decided where the logits are: the same on each worker
                out[name] = max(out.get(name, 0), int(value))
            elif name in HEAD_FIELDS or (name in ROW_FIELDS and tp == 0):  # heads: each shard's; rows: once a stage
                out[name] = out.get(name, 0) + int(value)
    return out


class TelemetryExtension:
    """A vLLM worker extension (`worker_extension_cls`): the telemetry read by name, so that an engine whose core
    runs in another process asks for it with `collective_rpc("sevi_telemetry", ...)` (a function cannot cross
    vLLM's message queue without insecure pickling)."""

    def sevi_telemetry(self, keys: list[str]) -> Reply:
        return collect_on_worker(self, keys)
