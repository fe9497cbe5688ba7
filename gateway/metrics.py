"""The gateway's Prometheus metrics (``pdgate_`` prefix), one registry per gateway."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from pdgate.common.version import package_version
from pdgate.gateway.process_metrics import ProcessMetrics
from pdgate.gateway.recent import RecentActivity
from pdgate.scheduler.plugins.profile_handlers import REASONS

if TYPE_CHECKING:
    from pdgate.gateway.admission import AdmissionController, Outcome
    from pdgate.gateway.cluster import Cluster
    from pdgate.gateway.costs import CostModelService
    from pdgate.gateway.observation import Observation
    from pdgate.scheduler.snapshot import RequestInfo

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
CIRCUIT_STATES = ("closed", "open", "half-open")
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

    def remove_where(self, label: str, value: str) -> None:
        """Drop every series whose ``label`` is ``value`` (an instance that left the fleet)."""
        at = self.labelnames.index(label)
        for labels in [k for k in self._series if k[at] == value]:
            del self._series[labels]


class LightCounter(Collector):
    """A counter for the request path, like :class:`LightHistogram`: ``inc`` is one dict update
    (``prometheus_client.Counter`` takes a lock per increment); exported as ``<name>_total``."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self._values.items():
            family.add_metric(list(labels), value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def remove_where(self, label: str, value: str) -> None:
        """Drop every series whose ``label`` is ``value`` (an instance that left the fleet)."""
        at = self.labelnames.index(label)
        for labels in [k for k in self._values if k[at] == value]:
            del self._values[labels]

    def mirror(self, values: Mapping[tuple[str, ...], float]) -> None:
        """Take every series from counts kept elsewhere (which only grow, while their owner lives)."""
        self._values = dict(values)


class GatewayMetrics:
    """Every metric of one gateway; names and labels are documented in docs/observability.md."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        Info("pdgate_build", "The gateway's version.", registry=r).info({"version": package_version() or "unknown"})
        self.process = ProcessMetrics(r)
        self.recent = RecentActivity()  # the last minutes' requests and fleet events (the ops console)
        # ---- requests
        self.requests = Counter(
            "pdgate_requests",
            "Requests answered, by route, model and HTTP status "
            "(499: the client went away first; model empty when the request named none we serve).",
            ["route", "model", "status"],
            registry=r,
        )
        self.retries = Counter(
            "pdgate_retries", "Requests retried on another instance before their first byte.", ["model"], registry=r
        )
        self.prompt_tokens = LightCounter("pdgate_prompt_tokens", "Prompt tokens of the requests served.", ("model",))
        self.generation_tokens = LightCounter(
            "pdgate_generation_tokens", "Output tokens of the requests served.", ("model",)
        )
        self.ttft = LightHistogram(
            "pdgate_time_to_first_token_seconds",
            "Time to first token seen by the gateway (arrival to first chunk; streamed requests).",
            ("model", "slo_class"),
            LATENCY_BUCKETS,
        )
        self.tpot = LightHistogram(
            "pdgate_request_time_per_output_token_seconds",
            "Mean time per output token after the first, per streamed request.",
            ("model", "slo_class"),
            TPOT_BUCKETS,
        )
        self.e2e = LightHistogram(
            "pdgate_e2e_request_latency_seconds",
            "Arrival to last byte of the answer, per request.",
            ("model", "slo_class"),
            LATENCY_BUCKETS,
        )
        self.slo = Counter(
            "pdgate_slo_requests",
            "Streamed requests by SLO class, path (split or colocated) and whether they met their TTFT and TPOT SLOs.",
            ["model", "slo_class", "path", "met"],
            registry=r,
        )
        # ---- admission
        self.admission = Counter(
            "pdgate_admission_decisions",
            "Admission outcomes (dispatch, reject, degraded, forced) and why.",
            ["model", "outcome", "reason"],
            registry=r,
        )
        self.queue_length = Gauge(
            "pdgate_admission_queue_length", "Requests waiting in the gateway's admission queue.", ["model"], registry=r
        )
        self.queue_wait = LightHistogram(
            "pdgate_request_queue_time_seconds",
            "Time a request waited in the gateway's admission queue before placement.",
            ("model",),
            LATENCY_BUCKETS,
        )
        # ---- scheduling
        self.plugin_seconds = LightHistogram(
            "pdgate_plugin_duration_seconds",
            "Latency of one scheduling plugin call.",
            ("profile", "plugin"),
            (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2),
        )
        self.prefix_queries = LightCounter(
            "pdgate_prefix_cache_queried_tokens",
            "Prompt tokens placed on an instance (the first leg's), by instance.",
            ("instance",),
        )
        self.prefix_hits = LightCounter(
            "pdgate_prefix_cache_hit_tokens",
            "Of those, tokens the prefix index expected the instance to hold in its KV cache.",
            ("instance",),
        )
        self.prediction_ratio = LightHistogram(
            "pdgate_prediction_ratio",
            "Actual / predicted, per quantity (prefill_s, handoff_s, ttft_s, tpot_s, output_tokens) and instance.",
            ("quantity", "instance"),
            RATIO_BUCKETS,
        )
        self.prediction_abs_error = Counter(
            "pdgate_prediction_abs_error",
            "Sum of |actual - predicted| per quantity and instance "
            "(divide by the ratio histogram's count for the mean absolute error).",
            ["quantity", "instance"],
            registry=r,
        )
        self.tpot_scale = Gauge(
            "pdgate_cost_model_tpot_scale",
            "The online correction on a decode group's predicted step time (1: the fit is right) since the last refit.",
            ["group"],
            registry=r,
        )
        self.length_scale = Gauge(
            "pdgate_cost_model_length_scale",
            "The online correction on a model's predicted output length (1: the fit is right) since the last refit.",
            ["model"],
            registry=r,
        )
        self.cost_model_refits = Gauge(
            "pdgate_cost_model_refits", "Cost-model refits done (and failed) since start.", ["result"], registry=r
        )
        for light in (
            self.prompt_tokens,
            self.generation_tokens,
            self.prefix_queries,
            self.prefix_hits,
            self.ttft,
            self.tpot,
            self.e2e,
            self.queue_wait,
            self.plugin_seconds,
            self.prediction_ratio,
        ):
            r.register(light)
        # ---- LoRA adapters (counted by each instance's state in the cluster, mirrored at scrape time)
        self.lora_loads = LightCounter(
            "pdgate_lora_loads",
            "LoRA adapters the gateway loaded on demand (POST /v1/load_lora_adapter), by instance, adapter "
            "and outcome (loaded, failed).",
            ("instance", "adapter", "outcome"),
        )
        r.register(self.lora_loads)
        self.lora_adapters = Gauge(
            "pdgate_instance_lora_adapters",
            "LoRA adapters an instance's engine serves (its /v1/models, and those the gateway loaded there).",
            ["instance"],
            registry=r,
        )
        # ---- instances
        self.instance_info = Gauge(
            "pdgate_instance_info",
            "1 per configured instance, with its role, engine kind, model and URL.",
            ["instance", "role", "kind", "model", "url"],
            registry=r,
        )
        self.pd_decisions = Counter(
            "pdgate_pd_decisions",
            "Placements (one per attempt) by the profile handler, by path (split or colocated) and reason "
            "(the in-tree handlers' fixed reasons; 'other' for a third-party handler's).",
            ["model", "path", "reason"],
            registry=r,
        )
        self.role_plan_gauge = Gauge(
            "pdgate_role_plan_instances",
            "The role balancer's planned split of a model's prefill and decode instances (flex ones moved toward it).",
            ["model", "role"],
            registry=r,
        )
        self.scale_plan_gauge = Gauge(
            "pdgate_plan_instances",
            "The scaling plan: instances a model's forecast load needs per serving role (prefill, decode, both).",
            ["model", "role"],
            registry=r,
        )
        self.serving_role = Gauge(
            "pdgate_instance_serving_role",
            "1 for the role an instance serves in now (a flex instance's changes at run time), 0 for the others.",
            ["instance", "role"],
            registry=r,
        )
        self.role_changes = Counter(
            "pdgate_role_changes",
            "Role changes of flex instances, by the role taken and why (admin, the role balancer, another replica).",
            ["instance", "role", "reason"],
            registry=r,
        )
        self.inflight = Gauge(
            "pdgate_instance_inflight_requests",
            "Requests (legs) the gateway has in flight on an instance.",
            ["instance"],
            registry=r,
        )
        self.inflight_tokens = Gauge(
            "pdgate_instance_inflight_tokens",
            "Tokens in flight on an instance, by phase.",
            ["instance", "phase"],
            registry=r,
        )
        self.engine_running = Gauge(
            "pdgate_instance_running_requests",
            "Running requests the engine last reported (absent when its last scrape is stale).",
            ["instance"],
            registry=r,
        )
        self.engine_waiting = Gauge(
            "pdgate_instance_waiting_requests", "Waiting requests the engine last reported.", ["instance"], registry=r
        )
        self.engine_kv = Gauge(
            "pdgate_instance_kv_cache_usage_ratio",
            "KV-cache usage the engine last reported (0-1).",
            ["instance"],
            registry=r,
        )
        self.scrape_age = Gauge(
            "pdgate_instance_scrape_age_seconds",
            "Age of the instance's last successful metrics scrape.",
            ["instance"],
            registry=r,
        )
        self.healthy = Gauge(
            "pdgate_instance_healthy",
            "1 when the instance takes requests (circuit closed, or open with its cooldown over).",
            ["instance"],
            registry=r,
        )
        self.circuit = Gauge(
            "pdgate_instance_circuit_state",
            "1 for the state the instance's circuit breaker is in (closed, open, half-open).",
            ["instance", "state"],
            registry=r,
        )
        self.draining = Gauge(
            "pdgate_instance_draining", "1 while the instance is being drained.", ["instance"], registry=r
        )
        self.upstream_failures = Counter(
            "pdgate_upstream_failures",
            "Engine calls that failed (connection, 5xx, broken reply).",
            ["instance"],
            registry=r,
        )
        # ---- migration
        self.migrations = Counter(
            "pdgate_migrations",
            "Running requests moved to another instance (or attempts that "
            "failed, leaving the request where it was), by reason, mechanism and outcome.",
            ["model", "reason", "mechanism", "outcome"],
            registry=r,
        )
        self.migration_gap = Histogram(
            "pdgate_migration_downtime_seconds",
            "Client-visible gap of a moved stream: its last token before the move to its first after it.",
            ["reason", "mechanism"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.migrating = Gauge(
            "pdgate_instance_streams",
            "Streamed answers the gateway is relaying from an instance (the ones it can move).",
            ["instance"],
            registry=r,
        )
        self.sharing_staleness = Histogram(
            "pdgate_sharing_load_staleness_seconds",
            "Delay from another replica publishing its in-flight load to this replica applying it.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.sharing_replicas = Gauge(
            "pdgate_sharing_replicas",
            "Other gateway replicas whose in-flight load this replica currently counts.",
            registry=r,
        )
        self.sharing_sync = Gauge(
            "pdgate_sharing_sync",
            "1 while this replica shares state through NATS, 0 while it serves on its local view "
            "(degraded: NATS away); absent without sharing.",
            registry=r,
        )
        self.sharing_leader = Gauge(
            "pdgate_sharing_leader",
            "1 while this replica is the leader (migration planning, cost-model refits).",
            registry=r,
        )
        self.sharing_load_divergence = Gauge(
            "pdgate_sharing_load_divergence_requests",
            "How far this replica's count of another replica's in-flight requests was off before "
            "that replica's latest report corrected it (the largest per-instance correction).",
            registry=r,
        )
        self._instance_metrics = (  # labelled by instance (besides the light ones)
            self.prediction_abs_error,
            self.instance_info,
            self.serving_role,
            self.role_changes,
            self.inflight,
            self.inflight_tokens,
            self.engine_running,
            self.engine_waiting,
            self.engine_kv,
            self.scrape_age,
            self.healthy,
            self.circuit,
            self.draining,
            self.upstream_failures,
            self.migrating,
            self.lora_adapters,
        )
        self._children: dict[tuple, object] = {}
        self._gone: set[str] = set()  # instances removed from the fleet: no new series for them
        self._lora_seen: set[str] = set()  # instances that served a LoRA adapter (their gauge stays)

    def _child(self, metric, *values: str):
        """A labelled child, looked up once (``.labels()`` costs microseconds per call)."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def forget_instance(self, instance_id: str) -> None:
        """Remove every series labelled with ``instance_id``: an instance removed from the fleet
        leaves nothing behind in ``/metrics`` (requests that ran there and end later add none)."""
        self._gone.add(instance_id)
        self._lora_seen.discard(instance_id)
        for light in (self.prefix_queries, self.prefix_hits, self.prediction_ratio):
            light.remove_where("instance", instance_id)
        for metric in self._instance_metrics:
            at = list(metric._labelnames).index("instance")
            for labels in [k for k in metric._metrics if k[at] == instance_id]:  # (no public listing)
                metric.remove(*labels)
        self._children = {k: v for k, v in self._children.items() if instance_id not in k[1]}

    def observe_sharing_staleness(self, seconds: float) -> None:
        self.sharing_staleness.observe(seconds)

    def pd_decision(self, model: str, split: bool, reason: str) -> None:
        self._child(
            self.pd_decisions, model, "split" if split else "colocated", reason if reason in REASONS else "other"
        ).inc()

    def role_plan(self, model: str, prefill: int, decode: int) -> None:
        self._child(self.role_plan_gauge, model, "prefill").set(prefill)
        self._child(self.role_plan_gauge, model, "decode").set(decode)

    def scale_plan(self, model: str, prefill: int, decode: int, colocated: int) -> None:
        for role, count in (("prefill", prefill), ("decode", decode), ("both", colocated)):
            self._child(self.scale_plan_gauge, model, role).set(count)

    def role_changed(self, instance_id: str, old: str, new: str, reason: str) -> None:
        """A flex instance changed its role (``old`` to ``new``)."""
        self.role_changes.labels(instance_id, new, reason).inc()
        self.recent.role_change(instance_id, old, new, reason)

    def remember_instance(self, instance_id: str) -> None:
        """An instance (re)joined the fleet: its series are recorded again."""
        self._gone.discard(instance_id)

    def count(self, route: str, model: str, status: int) -> None:
        self._child(self.requests, route, model, str(status)).inc()

    def observe_plugin(self, profile: str, plugin: str, seconds: float) -> None:
        self.plugin_seconds.observe((profile, plugin), seconds)

    def observe_prefix(self, instance: str, prompt_tokens: int, hit_tokens: int) -> None:
        if instance in self._gone:
            return
        key = (instance,)
        self.prefix_queries.inc(key, prompt_tokens)
        if hit_tokens:
            self.prefix_hits.inc(key, hit_tokens)

    def observe_migration(self, model: str, reason: str, mechanism: str, outcome: str) -> None:
        self._child(self.migrations, model, reason, mechanism, outcome).inc()

    def observe_migration_gap(self, reason: str, mechanism: str, seconds: float) -> None:
        self._child(self.migration_gap, reason, mechanism).observe(seconds)

    def observe_failure(self, instance: str) -> None:
        if instance not in self._gone:
            self._child(self.upstream_failures, instance).inc()

    def observe_admission(self, info: RequestInfo, outcome: Outcome) -> None:
        self._child(self.admission, info.model, outcome.action, outcome.reason).inc()
        if outcome.action == "reject":
            self.recent.requests.rejected()
        if outcome.queued_s > 0:
            self.queue_wait.observe((info.model,), outcome.queued_s)

    def observe_request(
        self, info: RequestInfo, obs: Observation, timing: Mapping[str, float | None], tokens: int | None
    ) -> None:
        """A completed request: its latencies, tokens, SLO attainment and each prediction against the actual."""
        labels = (info.model, info.slo.slo_class)
        ttft, tpot, e2e = timing.get("ttft_s"), timing.get("tpot_s"), timing.get("e2e_s")
        self.prompt_tokens.inc((info.model,), info.prompt_tokens)
        if tokens:
            self.generation_tokens.inc((info.model,), tokens)
        if e2e is not None:
            self.e2e.observe(labels, e2e)
        met = None if ttft is None else info.slo.met(ttft, tpot)
        self.recent.requests.finished(met)
        if ttft is not None:
            self.ttft.observe(labels, ttft)
            verdict = "true" if met else "false"
            self._child(self.slo, info.model, info.slo.slo_class, "split" if obs.split else "colocated", verdict).inc()
        if tpot is not None:
            self.tpot.observe(labels, tpot)
        predicted = obs.predicted
        pairs = (
            ("prefill_s", obs.prefill_id, obs.prefill_s if obs.prefill_idle else None),
            ("handoff_s", obs.decode_id, timing.get("handoff_s")),
            ("ttft_s", obs.prefill_id, ttft),
            ("tpot_s", obs.decode_id, tpot),
            ("output_tokens", obs.decode_id, tokens),
        )
        for quantity, instance, actual in pairs:
            guess = predicted.get("output_median" if quantity == "output_tokens" else quantity)
            if actual is None or guess is None or guess <= 0 or instance is None or instance in self._gone:
                continue
            self.prediction_ratio.observe((quantity, instance), actual / guess)
            self._child(self.prediction_abs_error, quantity, instance).inc(abs(actual - guess))

    def render(
        self, cluster: Cluster, admission: AdmissionController | None = None, costs: CostModelService | None = None
    ) -> bytes:
        """The exposition, with the gauges that mirror live state set from it first."""
        if admission is not None:
            for model in admission.queues:
                self.queue_length.labels(model=model).set(admission.queue_length(model))
        if costs is not None:
            self.cost_model_refits.labels(result="ok").set(costs.refits)
            self.cost_model_refits.labels(result="failed").set(costs.refit_failures)
            scales = costs.current.tpot_scale if costs.current is not None else {}
            for group in costs.calibration.groups_seen:
                self.tpot_scale.labels(group).set(scales.get(group, 1.0))
            lengths = costs.current.length_scale if costs.current is not None else {}
            for model in costs.length_calibration.keys_seen:
                self.length_scale.labels(model).set(lengths.get(model, 1.0))
        now = cluster.clock()
        stale = cluster.config.stale_after_s
        for instance_id, state in cluster.instances.items():
            spec = state.spec
            self.instance_info.labels(instance_id, spec.role, spec.kind, spec.model, spec.url).set(1)
            for role in ("prefill", "decode", "both"):
                self.serving_role.labels(instance_id, role).set(1 if state.role == role else 0)
            self.inflight.labels(instance=instance_id).set(state.inflight_requests)
            self.inflight_tokens.labels(instance=instance_id, phase="prefill").set(state.inflight_prefill_tokens)
            self.inflight_tokens.labels(instance=instance_id, phase="decode").set(state.inflight_decode_tokens)
            self.healthy.labels(instance=instance_id).set(1 if state.breaker.allows(now) else 0)
            for circuit_state in CIRCUIT_STATES:
                self.circuit.labels(instance_id, circuit_state).set(1 if state.breaker.state == circuit_state else 0)
            self.draining.labels(instance=instance_id).set(1 if state.draining else 0)
            self.migrating.labels(instance=instance_id).set(state.live_streams)
            load = state.load
            if load is not None and now - load.scraped_at <= stale:
                self.engine_running.labels(instance=instance_id).set(load.running)
                self.engine_waiting.labels(instance=instance_id).set(load.waiting)
                self.engine_kv.labels(instance=instance_id).set(load.kv_usage)
            else:
                for gauge in (self.engine_running, self.engine_waiting, self.engine_kv):
                    try:
                        gauge.remove(instance_id)
                    except KeyError:
                        pass
            if load is not None:
                self.scrape_age.labels(instance=instance_id).set(now - load.scraped_at)
            if state.lora.names or instance_id in self._lora_seen:  # (no series for instances that never had one)
                self._lora_seen.add(instance_id)
                self.lora_adapters.labels(instance=instance_id).set(len(state.lora.names))
        self.lora_loads.mirror(
            {
                (instance_id, adapter, outcome): count
                for instance_id, state in cluster.instances.items()
                for (adapter, outcome), count in state.lora.loads.items()
            }
        )
        return generate_latest(self.registry)
