"""Prometheus metrics, one registry per app (tests run several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, Metric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sevi.engines.api import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector(Collector):
    """Reads the engine's counters at scrape time, so the engine needs no knowledge of Prometheus."""

    def __init__(self, stats: Callable[[], EngineStats | None], up: Callable[[], bool] | None) -> None:
        self._stats = stats
        self._up = up

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self._up is not None:
            yield GaugeMetricFamily(
                "sevi_engine_up",
                "1 while the engine is alive (loading or serving); 0 once it is dead or failed to load. Alert on 0.",
                value=1 if self._up() else 0,
            )
        s = self._stats()
        if s is None:
            return
        yield GaugeMetricFamily("sevi_queue_depth", "Requests waiting for a batch slot.", value=s.queue_depth)
        yield GaugeMetricFamily("sevi_running_requests", "Requests in running batches (batch size).", value=s.running)
        yield CounterMetricFamily(
            "sevi_engine_cancelled_requests",
            "Requests the engine dropped (client gone, deadline).",
            value=s.cancelled_total,
        )
        yield CounterMetricFamily(
            "sevi_engine_failed_batches", "Batches that failed inside the engine.", value=s.failed_batches_total
        )


class _VllmCollector(Collector):
    """Re-exports vLLM's own `vllm:*` metrics, which it registers in prometheus_client's global registry
    when the vLLM engine runs in this process; yields nothing otherwise."""

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if family.name.startswith("vllm:"):
                yield family


class Metrics:
    def __init__(
        self, engine_stats: Callable[[], EngineStats | None], engine_up: Callable[[], bool] | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sevi_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "sevi_request_latency_seconds",
            "End-to-end request latency.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "sevi_time_to_first_token_seconds",
            "Time from request arrival to the first token.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "sevi_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("sevi_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("sevi_completion_tokens", "Tokens generated.", registry=r)
        self.conservativeness = Histogram(
            "sevi_requested_conservativeness",
            "Conservativeness applied per request.",
            buckets=tuple(i / 10 for i in range(11)),
            registry=r,
        )
        self.heads_reweighted = Counter(
            "sevi_heads_reweighted", "Attention heads re-weighted by SEVI (telemetry).", registry=r
        )
        self.contrast_dissolved = Counter(
            "sevi_contrast_pairs_dissolved",
            "Requests whose contrastive decoding pair fell out of lockstep, so part "
            "of the output was decoded without contrast (telemetry contrast_dissolved; the vLLM engine's scheduler "
            "keeps pairs together, so this should stay 0).",
            registry=r,
        )
        self.cancelled = Counter("sevi_cancelled_requests", "Requests cancelled by the server.", ["reason"], registry=r)
        r.register(_EngineCollector(engine_stats, engine_up))
        r.register(_VllmCollector())
