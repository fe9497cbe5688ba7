"""SLO-aware plugins: they place and admit by the cost model's predicted TTFT and TPOT.

All of them read the cost model from the snapshot (``snapshot.costs``) and compute through
:mod:`scheduler.estimates`; without a cost model they are neutral (score 1, keep all, dispatch).
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field

from pdgate.scheduler.estimates import TtftEstimate, tpot_estimate, tpot_limit, ttft_estimates
from pdgate.scheduler.framework import Admitter, Filter, PluginParams, Scorer, Verdict
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo


class SloTtftScorer(Scorer):
    """Lower predicted TTFT is better (Mooncake's prefill choice).

    ``ttft_i = wait_i + prefill(prompt - hit_i, hit_i) + hand-off``, where ``wait_i`` is the
    predicted time to drain what the gateway already sent to ``i`` and ``hit_i`` its cached
    prefix; ``score_i = min_j ttft_j / ttft_i`` (1 for the best instance).
    """

    type_name = "slo-ttft"

    def score(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> Mapping[str, float]:
        costs = snapshot.costs
        if costs is None:
            return {i.id: 1.0 for i in candidates}
        estimates = {
            e.instance_id: e.total_s for e in ttft_estimates(request, snapshot, candidates, costs, handoff_s=0.0)
        }
        best = min(estimates.values(), default=0.0)
        return {k: (best / v if v > 0 else 1.0) for k, v in estimates.items()}


class SloTpotScorer(Scorer):
    """Lower predicted TPOT after joining is better: ``score_j = min_k tpot_k / tpot_j``,
    with ``tpot_j = step(batch_j + 1, context_j + prompt + expected_output / 2)``."""

    type_name = "slo-tpot"

    def score(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> Mapping[str, float]:
        costs = snapshot.costs
        if costs is None:
            return {i.id: 1.0 for i in candidates}
        tpots = {i.id: tpot_estimate(request, i, costs) for i in candidates}
        best = min(tpots.values(), default=0.0)
        return {k: (best / v if v > 0 else 1.0) for k, v in tpots.items()}


class SloTpotFilter(Filter):
    """Keeps decode instances whose batch, with this request added, stays within the strictest
    TPOT SLO of the request and of the requests already on it.

    Soft: when no instance qualifies it keeps the ones with the lowest predicted TPOT
    (admission already decided the request goes; this only chooses the least harmful place).
    """

    type_name = "slo-tpot-filter"

    def filter(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> list[InstanceView]:
        costs = snapshot.costs
        if costs is None or not candidates:
            return candidates
        tpots = {i.id: tpot_estimate(request, i, costs) for i in candidates}
        fits = [i for i in candidates if (limit := tpot_limit(request, i)) is None or tpots[i.id] <= limit]
        if fits:
            return fits
        best = min(tpots.values())
        return [i for i in candidates if tpots[i.id] <= best * 1.000001]


class SloAdmitterParams(PluginParams):
    engine_queue_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="dispatch while the best prefill instance's predicted wait is at most "
        "this fraction of the request's TTFT SLO (the rest waits at the gateway, in EDF order)",
    )
    best_effort_wait_s: float = Field(0.5, gt=0, description="the same bound for requests without a TTFT SLO")
    slack: float = Field(0.9, gt=0, description="aim at slack x the SLO: below 1 leaves room for prediction error")
    max_queue_wait_s: float = Field(60.0, gt=0, description="nobody waits at the gateway longer than this")


class SloAdmitter(Admitter):
    """Admits a request when its predicted TTFT and TPOT meet its SLO, queues it while it still can,
    rejects it when it cannot.

    * **reject** (``ttft-infeasible``) when even starting after the work queued ahead of it
      (``max(min wait, work ahead / prefill instances)``) plus its own unloaded prefill and
      hand-off exceeds the time left to its TTFT deadline; ``tpot-infeasible`` when an empty
      decode batch is already slower than its TPOT SLO, or when no decode batch keeps the TPOT
      SLOs with it added (its own and those of the streams already there, at ``slack`` x the
      SLO) and the first decode stream predicted to end there ends too late for its TTFT
      deadline; ``queue-timeout`` after ``max_queue_wait_s``;
    * **dispatch** when the best prefill instance's wait is short (``engine_queue_fraction`` of
      its TTFT SLO), the predicted TTFT meets the deadline and some decode instance keeps the
      TPOT SLOs of its batch;
    * **wait** otherwise (the gateway holds it, earliest deadline first within priority).
    """

    type_name = "slo-admitter"
    Params = SloAdmitterParams

    def assess(self, request: RequestInfo, snapshot: ClusterSnapshot, now: float, work_ahead_s: float) -> Verdict:
        p: SloAdmitterParams = self.params  # type: ignore[assignment]
        costs = snapshot.costs
        prefills: list[InstanceView] = []
        decoders: list[InstanceView] = []
        for i in snapshot.instances:
            if i.available:
                if i.serves("prefill"):
                    prefills.append(i)
                if i.serves("decode"):
                    decoders.append(i)
        if costs is None or not prefills or not decoders:
            return Verdict("dispatch", "no-prediction")
        best_now, best_case, min_wait, work = _least_ttft_terms(ttft_estimates(request, snapshot, prefills, costs))
        tpot_now: float | None = None
        decode_ok = False
        tpot_bound: float | None = None  # the limit the least-TPOT instance's batch would have to keep
        for d in decoders:  # the least TPOT, and whether any decode instance keeps its batch's SLOs
            tpot = tpot_estimate(request, d, costs)
            limit = tpot_limit(request, d)
            if tpot_now is None or tpot < tpot_now:
                tpot_now, tpot_bound = tpot, limit
            if not decode_ok:
                decode_ok = limit is None or tpot <= limit * p.slack
        slo = request.slo
        elapsed = now - request.arrival
        start = max(min_wait, work_ahead_s / len(prefills))
        limit = slo.ttft_s * p.slack if slo.ttft_s is not None else None

        free_in = min(d.decode_free_in_s for d in decoders)  # the first decode stream predicted to end

        def verdict(action: str, reason: str) -> Verdict:
            return Verdict(
                action,  # type: ignore[arg-type]
                reason,
                best_now,
                best_case,
                tpot_now,
                work,
                elapsed + start + best_case,
                limit,
                tpot_bound * p.slack if tpot_bound is not None else None,
                None if decode_ok else free_in,
            )

        if elapsed > p.max_queue_wait_s:
            return verdict("reject", "queue-timeout")
        if slo.tpot_s is not None:
            floor = min([costs.decode_step_s(d, 1, request.prompt_tokens) for d in decoders])
            if floor > slo.tpot_s * p.slack:
                return verdict("reject", "tpot-infeasible")
        if slo.ttft_s is not None:
            remaining = slo.ttft_s * p.slack - elapsed
            if start + best_case > remaining:
                return verdict("reject", "ttft-infeasible" if decode_ok else "decode-saturated")
            if not decode_ok and max(start, free_in) + best_case > remaining:
                # no decode batch takes it within its TPOT SLO before its first token is due
                return verdict("reject", "tpot-infeasible")
            window = p.engine_queue_fraction * slo.ttft_s
            if min_wait <= window and best_now <= remaining and decode_ok:
                return verdict("dispatch", "slo-met")
        elif min_wait <= p.best_effort_wait_s and (decode_ok or slo.tpot_s is None):
            return verdict("dispatch", "capacity")
        return verdict("wait", "decode-saturated" if not decode_ok else "engine-queue")


def _least_ttft_terms(estimates: list[TtftEstimate]) -> tuple[float, float, float, float]:
    """``min`` over ``estimates`` of the total TTFT, the unloaded TTFT, the wait and the prefill
    time (in one pass; ``min``'s own result, NaN included)."""
    first = estimates[0]
    total = first.wait_s + first.prefill_s + first.handoff_s
    unloaded = first.prefill_s + first.handoff_s
    wait, prefill = first.wait_s, first.prefill_s
    for e in estimates[1:]:
        if (v := e.wait_s + e.prefill_s + e.handoff_s) < total:
            total = v
        if (v := e.prefill_s + e.handoff_s) < unloaded:
            unloaded = v
        if e.wait_s < wait:
            wait = e.wait_s
        if e.prefill_s < prefill:
            prefill = e.prefill_s
    return total, unloaded, wait, prefill


class AlwaysAdmit(Admitter):
    """Dispatches every request at once (no gateway queue, no shedding)."""

    type_name = "always-admit"

    def assess(self, request: RequestInfo, snapshot: ClusterSnapshot, now: float, work_ahead_s: float) -> Verdict:
        return Verdict("dispatch", "always")
