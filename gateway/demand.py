"""Each model's demand on its instances, measured every interval and forecast for the next one.

Shared by the role balancer and the scaling plan (each keeps its own meter, at its own interval):

* **prefill work**: predicted prefill seconds the gateway sent per second, this replica's
  (:attr:`Cluster.prefill_work_sent`) plus the other replicas' (their running totals come with
  their in-flight load, :attr:`Cluster.remote_prefill_work`), so the leader plans for the whole
  gateway's load;
* **decode streams** running now and their mean context, from the snapshot (which counts every
  replica's when they share their load);
* the next interval forecast with Holt's smoothing (level and trend) of each series.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import GatewayConfig
from pdgate.scheduler.role_planner import Holt, PoolDemand
from pdgate.scheduler.snapshot import ClusterSnapshot

DEFAULT_TPOT_S = 0.1


def tpot_target_s(config: GatewayConfig, override_ms: float | None = None) -> float:
    """The TPOT decode pools are sized for: ``override_ms``, else the role balancer's, else the
    default SLO's, else 100 ms."""
    ms = override_ms or config.role_balancer.tpot_target_ms or config.slo.default.tpot_ms
    return ms / 1000 if ms else DEFAULT_TPOT_S


def ttft_target_s(config: GatewayConfig) -> float | None:
    """The TTFT prefill pools are sized for: the role balancer's, else the default SLO's (None: none)."""
    ms = config.role_balancer.ttft_target_ms or config.slo.default.ttft_ms
    return ms / 1000 if ms else None


@dataclass
class _ModelSeries:
    work: Holt = field(default_factory=Holt)
    streams: Holt = field(default_factory=Holt)
    mean_prefill_s: float | None = None  # predicted prefill seconds of one leg, smoothed over intervals
    totals: dict[str, tuple[float, int]] = field(default_factory=dict)  # source (replica) -> its totals, last seen


class DemandMeter:
    """Measures and forecasts each model's :class:`PoolDemand`; call :meth:`measure` once per interval."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._series: dict[str, _ModelSeries] = {}
        self._at: dict[str, float] = {}

    def measure(self, model: str, snapshot: ClusterSnapshot) -> PoolDemand | None:
        """This interval's demand of ``model`` added to its forecast; the forecast of the next
        interval (None on the first call, which only sets the baselines)."""
        now = self.cluster.clock()
        series = self._series.setdefault(model, _ModelSeries())
        sent, legs = self._work_sent(model, series)
        streams = sum(v.decode_inflight for v in snapshot.instances)
        context = sum(v.decode_context_tokens for v in snapshot.instances) / max(1, streams)
        before, self._at[model] = self._at.get(model), now
        if before is None or now <= before:
            return None
        if legs:
            series.mean_prefill_s = (
                sent / legs if series.mean_prefill_s is None else (series.mean_prefill_s + sent / legs) / 2
            )
        return PoolDemand(
            series.work.update(sent / (now - before)),
            series.streams.update(float(streams)),
            context,
            series.mean_prefill_s,
        )

    def _work_sent(self, model: str, series: _ModelSeries) -> tuple[float, int]:
        """Predicted prefill seconds and legs sent since the last call, by every replica heard from
        (a source seen for the first time only sets its baseline; a total that went down restarted)."""
        sources = {"": (self.cluster.prefill_work_sent.get(model, 0.0), self.cluster.prefill_legs_sent.get(model, 0))}
        for replica, totals in self.cluster.remote_prefill_work.items():
            sources[replica] = totals.get(model, (0.0, 0))
        sent, legs = 0.0, 0
        for source, total in sources.items():
            before = series.totals.get(source)
            if before is not None and total[0] >= before[0] and total[1] >= before[1]:
                sent += total[0] - before[0]
                legs += total[1] - before[1]
            series.totals[source] = total
        for gone in set(series.totals) - set(sources):
            del series.totals[gone]
        return sent, legs
