"""The gateway's Prometheus metrics (``pdgate_`` prefix), one registry per gateway."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.cluster import Cluster
    from gateway.proxy import Routed


class LightHistogram(Collector):
    """A histogram for the request path: ``observe`` is a bisect and two additions (no lock, no
    label lookup; the gateway's loop is one thread), exported in Prometheus' form at scrape time.
    ``prometheus_client.Histogram`` costs several times more per observation, and the gateway
    makes one per plugin per request."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = list(buckets)
        self._series: dict[tuple[str, ...], list[float]] = {}  # per-bucket counts (+Inf last), then the sum

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0] * (len(self.bounds) + 2)
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, series in self._series.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip([*map(str, self.bounds), "+Inf"], series[:-1], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(labels), buckets, series[-1])
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("pdgate_requests", "Requests answered, by route, model and HTTP status.",
                                ["route", "model", "status"], registry=r)
        self.retries = Counter("pdgate_retries", "Requests retried on another instance before their first byte.",
                               ["model"], registry=r)
        self.plugin_seconds = LightHistogram("pdgate_plugin_duration_seconds", "Latency of one scheduling plugin call.",
                                             ("profile", "plugin"), (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2))
        r.register(self.plugin_seconds)
        self.inflight = Gauge("pdgate_instance_inflight_requests", "Requests the gateway has in flight on an instance.",
                              ["instance"], registry=r)
        self.inflight_tokens = Gauge("pdgate_instance_inflight_tokens", "Tokens in flight on an instance, by phase.",
                                     ["instance", "phase"], registry=r)
        self.healthy = Gauge("pdgate_instance_healthy", "1 when the instance's circuit is closed.", ["instance"], registry=r)
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *values: str):
        """A labelled child, looked up once (``.labels()`` costs microseconds per call)."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def count(self, routed: Routed, status: int) -> None:
        self._child(self.requests, routed.path, routed.info.model, str(status)).inc()

    def observe_plugin(self, profile: str, plugin: str, seconds: float) -> None:
        self.plugin_seconds.observe((profile, plugin), seconds)

    def render(self, cluster: Cluster) -> bytes:
        now = cluster.clock()
        for instance_id, state in cluster.instances.items():
            self.inflight.labels(instance=instance_id).set(state.inflight_requests)
            self.inflight_tokens.labels(instance=instance_id, phase="prefill").set(state.inflight_prefill_tokens)
            self.inflight_tokens.labels(instance=instance_id, phase="decode").set(state.inflight_decode_tokens)
            self.healthy.labels(instance=instance_id).set(1 if state.breaker.allows(now) else 0)
        return generate_latest(self.registry)
