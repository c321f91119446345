"""Per-request alignment telemetry read from vLLM's workers, wherever they run: the one channel from the
workers' row tables (sevi/engines/vllm/plugin/state.py) to the server.

Each worker counts what its own attention layers did in its row table. An engine asks every worker at once
through vLLM's `collective_rpc` by name, :data:`TELEMETRY_RPC`, a method of the worker extension
:class:`TelemetryExtension` (:data:`EXTENSION`, given to vLLM as `worker_extension_cls`): in-process with the
`uni` executor, over vLLM's message queues with `mp` or `ray` or an engine core in another process (a name
crosses them; a function would need insecure pickling). Each worker answers a :class:`WorkerTelemetry` (sent as
plain data: vLLM's message queues carry tuples, lists and dicts) and :func:`request_telemetry` merges the
replies: with tensor parallelism the workers of one pipeline stage run the same layers and rows (the shards
agree on which rows each stage moved) but hold different heads, so rows are counted once per stage and heads
summed over all workers; pipeline stages hold different layers, so their counts add up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from sevi.engines.vllm.plugin.state import STATE
from sevi.engines.vllm.plugin.tensor_parallel import ranks
from sevi.method.telemetry import HEAD_FIELDS, PAIR_FIELDS, ROW_FIELDS

TELEMETRY_RPC = "sevi_telemetry"  # the worker extension's method, called by name through collective_rpc
EXTENSION = "sevi.engines.vllm.plugin.telemetry.TelemetryExtension"  # EngineArgs(worker_extension_cls=...)


class WorkerTelemetry(NamedTuple):
    """One worker's reply: its tensor- and pipeline-parallel ranks and the telemetry of the requests asked for
    that it holds (filed when they left the batch, or live; see :meth:`WorkerState.collect`), by request id."""

    tp: int
    pp: int
    found: dict[str, dict[str, Any]]


def collect_on_worker(keys: list[str]) -> WorkerTelemetry:
    """This worker's telemetry of the requests `keys`."""
    found = {k: entry for k in keys if (entry := STATE.collect(k)) is not None}
    tp, pp = ranks()
    return WorkerTelemetry(tp, pp, found)


def request_telemetry(replies: Iterable[Sequence[Any]], key: str) -> dict[str, int]:
    """One request's telemetry from every worker's reply to :data:`TELEMETRY_RPC` (each a
    :class:`WorkerTelemetry`, or the plain tuple or list it travelled as)."""
    out: dict[str, int] = {}
    for reply in replies:
        tp, _, found = WorkerTelemetry(*reply)
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
    """A vLLM worker extension (`worker_extension_cls`): the telemetry read by name, so that every engine asks
    for it the same way, `collective_rpc(TELEMETRY_RPC, args=([request id],))`, whether its workers share its
    process or not."""

    def sevi_telemetry(self, keys: list[str]) -> WorkerTelemetry:
        return collect_on_worker(keys)
