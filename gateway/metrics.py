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
    from gateway.admission import AdmissionController, Outcome
    from gateway.cluster import Cluster
    from gateway.costs import CostModelService
    from gateway.proxy import Observation, Routed
    from scheduler.snapshot import RequestInfo

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)


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
        self.admission = Counter("pdgate_admission_decisions", "Admission outcomes (dispatch, reject, degraded, forced) and why.",
                                 ["model", "outcome", "reason"], registry=r)
        self.queue_length = Gauge("pdgate_admission_queue_length", "Requests waiting in the gateway's admission queue.",
                                  ["model"], registry=r)
        self.queue_wait = LightHistogram("pdgate_admission_queue_wait_seconds", "Time a request waited at the gateway before placement.",
                                         ("model",), LATENCY_BUCKETS)
        r.register(self.queue_wait)
        self.ttft = LightHistogram("pdgate_ttft_seconds", "Time to first token seen by the gateway (arrival to first chunk).",
                                   ("model", "slo_class"), LATENCY_BUCKETS)
        self.tpot = LightHistogram("pdgate_tpot_seconds", "Time per output token after the first, per request.",
                                   ("model", "slo_class"), TPOT_BUCKETS)
        for histogram in (self.ttft, self.tpot):
            r.register(histogram)
        self.slo = Counter("pdgate_slo_requests", "Streamed requests by SLO class and whether they met their TTFT and TPOT SLOs.",
                           ["model", "slo_class", "met"], registry=r)
        self.prediction_ratio = LightHistogram(
            "pdgate_prediction_ratio", "Actual / predicted, per quantity (prefill_s, handoff_s, ttft_s, tpot_s, output_tokens) and instance.",
            ("quantity", "instance"), RATIO_BUCKETS)
        r.register(self.prediction_ratio)
        self.prediction_abs_error = Counter("pdgate_prediction_abs_error", "Sum of |actual - predicted| per quantity and instance "
                                            "(divide by the ratio histogram's count for the mean absolute error).",
                                            ["quantity", "instance"], registry=r)
        self.cost_model_refits = Gauge("pdgate_cost_model_refits", "Cost-model refits done (and failed) since start.",
                                       ["result"], registry=r)
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

    def observe_admission(self, info: RequestInfo, outcome: Outcome) -> None:
        self._child(self.admission, info.model, outcome.action, outcome.reason).inc()
        if outcome.queued_s > 0:
            self.queue_wait.observe((info.model,), outcome.queued_s)

    def observe_request(self, info: RequestInfo, obs: Observation, timing: dict[str, float | None], tokens: int | None) -> None:
        """A completed request: its latencies, SLO attainment and each prediction against the actual."""
        labels = (info.model, info.slo.slo_class)
        ttft, tpot = timing.get("ttft_s"), timing.get("tpot_s")
        if ttft is not None:
            self.ttft.observe(labels, ttft)
            met = (info.slo.ttft_s is None or ttft <= info.slo.ttft_s) and (
                info.slo.tpot_s is None or tpot is None or tpot <= info.slo.tpot_s)
            self._child(self.slo, info.model, info.slo.slo_class, "true" if met else "false").inc()
        if tpot is not None:
            self.tpot.observe(labels, tpot)
        predicted = obs.predicted
        pairs = (("prefill_s", obs.prefill_id, obs.prefill_s if obs.prefill_idle else None),
                 ("handoff_s", obs.decode_id, timing.get("handoff_s")),
                 ("ttft_s", obs.prefill_id, ttft), ("tpot_s", obs.decode_id, tpot),
                 ("output_tokens", obs.decode_id, tokens))
        for quantity, instance, actual in pairs:
            guess = predicted.get("output_median" if quantity == "output_tokens" else quantity)
            if actual is None or guess is None or guess <= 0 or instance is None:
                continue
            self.prediction_ratio.observe((quantity, instance), actual / guess)
            self._child(self.prediction_abs_error, quantity, instance).inc(abs(actual - guess))

    def render(self, cluster: Cluster, admission: AdmissionController | None = None,
               costs: CostModelService | None = None) -> bytes:
        if admission is not None:
            for model in admission.queues:
                self.queue_length.labels(model=model).set(admission.queue_length(model))
        if costs is not None:
            self.cost_model_refits.labels(result="ok").set(costs.refits)
            self.cost_model_refits.labels(result="failed").set(costs.refit_failures)
        now = cluster.clock()
        for instance_id, state in cluster.instances.items():
            self.inflight.labels(instance=instance_id).set(state.inflight_requests)
            self.inflight_tokens.labels(instance=instance_id, phase="prefill").set(state.inflight_prefill_tokens)
            self.inflight_tokens.labels(instance=instance_id, phase="decode").set(state.inflight_decode_tokens)
            self.healthy.labels(instance=instance_id).set(1 if state.breaker.allows(now) else 0)
        return generate_latest(self.registry)
