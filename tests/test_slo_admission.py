"""SLO-aware plugins and the admission queue, on constructed snapshots and a real event loop."""

from __future__ import annotations

import asyncio

import pytest
from support.waiting import wait_until_async

from pdgate.gateway.admission import AdmissionController
from pdgate.gateway.config import AdmissionConfig, SloConfig
from pdgate.gateway.requests import GatewayError
from pdgate.gateway.slo import SloResolver
from pdgate.scheduler.costmodel.latency import LatencyModel, PriorSpec
from pdgate.scheduler.costmodel.model import CostModel
from pdgate.scheduler.framework import Admitter, Verdict
from pdgate.scheduler.plugins.slo import (
    SloAdmitter,
    SloAdmitterParams,
    SloTpotFilter,
    SloTtftScorer,
)
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo, SloTarget

pytestmark = pytest.mark.unit

GROUP = "sim/m/default"


@pytest.fixture(scope="module")
def costs() -> CostModel:
    return CostModel(LatencyModel.from_priors({GROUP: PriorSpec()}), None)  # type: ignore[arg-type]


def view(id: str, role: str = "prefill", **kw) -> InstanceView:
    return InstanceView(id=id, url=f"http://{id}", role=role, model="m", cost_group=GROUP, **kw)  # type: ignore[arg-type]


def request(
    prompt: int = 2048,
    ttft: float | None = 1.0,
    tpot: float | None = 0.1,
    *,
    arrival: float = 0.0,
    priority: int = 0,
    rid: str = "r",
) -> RequestInfo:
    return RequestInfo(rid, "m", prompt, 128, slo=SloTarget(ttft, tpot, priority), arrival=arrival)


def snapshot(costs: CostModel, *instances: InstanceView, hits: dict[str, int] | None = None) -> ClusterSnapshot:
    return ClusterSnapshot(instances, 0.0, hits or {}, costs)


def admitter() -> SloAdmitter:
    return SloAdmitter("admission", SloAdmitterParams())


def test_idle_fleet_dispatches_with_a_prediction_close_to_the_profile(costs):
    snap = snapshot(costs, view("p0"), view("p1"), view("d0", "decode"))
    verdict = admitter().assess(request(), snap, now=0.0, work_ahead_s=0.0)
    assert verdict.action == "dispatch"
    # H100 / Llama-3-8B: a 2048-token prefill takes ~55 ms; plus ~20 ms of hand-off
    assert 0.04 < verdict.predicted_ttft_s < 0.15
    assert 0.005 < verdict.predicted_tpot_s < 0.02


def test_backlog_beyond_the_deadline_is_rejected_and_a_moderate_one_waits(costs):
    busy = snapshot(costs, view("p0", prefill_wait_s=5.0), view("d0", "decode"))
    assert admitter().assess(request(ttft=1.0), busy, 0.0, 0.0).reason == "ttft-infeasible"
    queued = snapshot(costs, view("p0", prefill_wait_s=0.7), view("d0", "decode"))
    verdict = admitter().assess(request(ttft=1.0), queued, 0.0, 0.0)
    assert verdict.action == "wait"  # it would make it, but the engine queue is past half the SLO
    # and time spent waiting counts against the deadline
    late = admitter().assess(request(ttft=1.0, arrival=0.0), queued, 0.5, 0.0)
    assert late.action == "reject"
    # what it compared: its own least TTFT is under the SLO, but not after the 0.5 s it waited
    assert late.predicted_ttft_s < 1.0 and late.ttft_limit_s == pytest.approx(0.9)
    assert late.earliest_ttft_s == pytest.approx(0.5 + late.predicted_ttft_s) and late.earliest_ttft_s > 0.9
    # work queued ahead at the gateway counts too
    assert (
        admitter().assess(request(ttft=1.0), snapshot(costs, view("p0"), view("d0", "decode")), 0.0, 3.0).action
        == "reject"
    )


def test_tpot_slo_below_an_empty_batch_is_infeasible_and_a_full_batch_waits(costs):
    idle = snapshot(costs, view("p0"), view("d0", "decode"))
    assert admitter().assess(request(tpot=0.001), idle, 0.0, 0.0).reason == "tpot-infeasible"
    full = snapshot(costs, view("p0"), view("d0", "decode", decode_inflight=400, decode_context_tokens=400 * 3000))
    verdict = admitter().assess(request(tpot=0.03), full, 0.0, 0.0)
    assert (verdict.action, verdict.reason) == ("wait", "decode-saturated")
    assert admitter().assess(request(ttft=None, tpot=None), full, 0.0, 0.0).action == "dispatch"  # best effort


def test_ttft_scorer_prefers_the_cached_prefix_and_the_shorter_queue(costs):
    scorer = SloTtftScorer("ttft", SloTtftScorer.Params())
    a, b = view("a"), view("b")
    scores = scorer.score(request(8192), snapshot(costs, a, b, hits={"a": 6144}), [a, b])
    assert scores["a"] == 1.0 and scores["b"] < 0.6
    a, b = view("a", prefill_wait_s=1.0), view("b")
    scores = scorer.score(request(8192), snapshot(costs, a, b, hits={"a": 6144}), [a, b])
    assert scores["b"] == 1.0 and scores["a"] < 0.5  # the hit does not pay for a second of queue


def test_tpot_filter_keeps_batches_within_everyone_s_slo(costs):
    flt = SloTpotFilter("fit", SloTpotFilter.Params())
    light = view("light", "decode", decode_inflight=2, decode_context_tokens=4000)
    heavy = view("heavy", "decode", decode_inflight=300, decode_context_tokens=300 * 4000)
    strict = view("strict", "decode", decode_inflight=20, decode_context_tokens=20 * 2000, tightest_tpot_s=0.005)
    kept = flt.filter(request(tpot=0.03), snapshot(costs, light, heavy, strict), [light, heavy, strict])
    assert [i.id for i in kept] == ["light"]
    # nobody fits: the least bad one is kept rather than failing the request
    kept = flt.filter(request(tpot=0.001), snapshot(costs, heavy, strict), [heavy, strict])
    assert [i.id for i in kept] == ["strict"]


def test_slo_resolution_from_classes_and_headers():
    resolver = SloResolver(
        SloConfig.model_validate(
            {
                "default": {"ttft_ms": 2000, "tpot_ms": 100},
                "classes": [
                    {"name": "batch", "apps": ["nightly"], "ttft_ms": 60000, "priority": -1},
                    {"name": "vip", "api_keys": ["k-vip"], "ttft_ms": 300, "tpot_ms": 30, "priority": 5},
                ],
            }
        )
    )
    assert resolver.resolve({}, "/v1/completions") == SloTarget(2.0, 0.1, 0, "default")
    assert resolver.resolve({"x-pdgate-app": "nightly"}, "/v1/completions") == SloTarget(60.0, None, -1, "batch")
    assert resolver.resolve({"authorization": "Bearer k-vip"}, "/v1/completions").slo_class == "vip"
    assert resolver.resolve({"x-slo-ttft-ms": "250", "x-priority": "3"}, "/v1/chat/completions") == SloTarget(
        0.25, 0.1, 3, "default"
    )
    assert resolver.resolve({"x-slo-tpot-ms": "none"}, "/v1/completions").tpot_s is None
    for header, value in (
        ("x-slo-ttft-ms", "soon"),
        ("x-slo-ttft-ms", "-5"),
        ("x-slo-tpot-ms", "nan"),
        ("x-priority", "high"),
    ):
        with pytest.raises(GatewayError) as err:
            resolver.resolve({header: value}, "/v1/completions")
        assert err.value.status == 400 and header in err.value.message


def test_the_gateway_api_inference_extensions_slo_headers_are_read_too():
    """llm-d's names (the Gateway API Inference Extension's) for the same limits, so that clients
    written for an llm-d gateway keep their SLOs behind pdgate."""
    resolver = SloResolver(SloConfig.model_validate({"default": {"ttft_ms": 2000, "tpot_ms": 100}}))
    headers = {"x-llm-d-slo-ttft-ms": "300", "x-llm-d-slo-tpot-ms": "25"}
    assert resolver.resolve(headers, "/v1/chat/completions") == SloTarget(0.3, 0.025, 0, "default")
    same = {"x-llm-d-slo-ttft-ms": "300", "x-slo-ttft-ms": " 300.0"}
    assert resolver.resolve(same, "/v1/completions").ttft_s == 0.3  # both names, one value: fine
    with pytest.raises(GatewayError) as err:
        resolver.resolve({"x-llm-d-slo-tpot-ms": "fast"}, "/v1/completions")
    assert err.value.status == 400 and "x-llm-d-slo-tpot-ms" in err.value.message
    with pytest.raises(GatewayError) as err:
        resolver.resolve({"x-slo-ttft-ms": "300", "x-llm-d-slo-ttft-ms": "900"}, "/v1/completions")
    assert err.value.status == 400 and "conflicting" in err.value.message and "x-llm-d-slo-ttft-ms" in err.value.message


class GateAdmitter(Admitter):
    """Waits while ``closed``; rejects requests with an SLO whose id starts with 'late'."""

    type_name = "test-gate"

    def __init__(self) -> None:
        super().__init__("gate", Admitter.Params())
        self.closed = True

    def assess(self, request, snapshot, now, work_ahead_s):
        if request.request_id.startswith("late") and not request.slo.best_effort:
            return Verdict("reject", "ttft-infeasible", predicted_ttft_s=2.5)
        return Verdict("wait" if self.closed else "dispatch", "gate", prefill_work_s=0.1)


async def _controller(gate: Admitter, **config) -> AdmissionController:
    ctl = AdmissionController(AdmissionConfig(recheck_ms=5, **config), gate)
    ctl.start()
    return ctl


async def test_queue_dispatches_by_priority_then_deadline_and_forgets_cancelled_clients():
    gate = GateAdmitter()
    ctl = await _controller(gate)
    order: list[str] = []

    async def one(info: RequestInfo) -> None:
        admitted, _ = await ctl.admit(info, lambda i: None)
        order.append(admitted.request_id)

    try:
        tasks = [
            asyncio.create_task(one(request(ttft=t, priority=p, rid=rid)))
            for rid, t, p in (
                ("loose", 9.0, 0),
                ("tight", 1.0, 0),
                ("vip", 9.0, 2),
                ("best-effort", None, 0),
                ("gone", 0.5, 0),
            )
        ]
        await wait_until_async(lambda: ctl.queue_length("m") == 5, timeout=5, message="5 requests queued")
        tasks[4].cancel()  # the client went away while queued
        await wait_until_async(lambda: ctl.queue_length("m") == 4, timeout=5, message="the cancelled one gone")
        gate.closed = False
        ctl.wake()
        await asyncio.wait_for(asyncio.gather(*tasks[:4]), 5)
        assert order == ["vip", "tight", "loose", "best-effort"]
    finally:
        await ctl.close()


async def test_full_queue_turns_away_the_lowest_ranked_and_rejections_carry_retry_after():
    gate = GateAdmitter()
    ctl = await _controller(gate, max_queue=2)
    try:
        waiting = [asyncio.create_task(ctl.admit(request(ttft=t, rid=f"r{t}"), lambda i: None)) for t in (5.0, 3.0)]
        await wait_until_async(lambda: ctl.queue_length("m") == 2, timeout=5, message="the queue full")
        urgent = asyncio.create_task(ctl.admit(request(ttft=1.0, rid="urgent"), lambda i: None))
        await wait_until_async(waiting[0].done, timeout=5, message="the loosest request turned away")
        assert ctl.queue_length("m") == 2 and not waiting[1].done() and not urgent.done()
        with pytest.raises(GatewayError) as err:
            await waiting[0]  # the loosest deadline made room
        assert err.value.status == 429 and err.value.headers["x-pdgate-reject-reason"] == "queue-full"
        with pytest.raises(GatewayError) as err:
            await ctl.admit(request(rid="late-1"), lambda i: None)
        assert err.value.headers == {"Retry-After": "3", "x-pdgate-reject-reason": "ttft-infeasible"}
        assert err.value.body()["error"]["type"] == "rate_limit_error"
        gate.closed = False
        ctl.wake()
        await asyncio.wait_for(asyncio.gather(urgent, waiting[1]), 5)
    finally:
        await ctl.close()


async def test_infeasible_modes_degrade_or_admit_and_close_fails_the_queue():
    ctl = await _controller(GateAdmitter(), on_infeasible="admit")
    try:
        info, outcome = await ctl.admit(request(rid="late-2"), lambda i: None)
        assert outcome.action == "forced" and info.slo.ttft_s == 1.0
    finally:
        await ctl.close()
    gate = GateAdmitter()
    ctl = await _controller(gate, on_infeasible="best-effort")
    task = asyncio.create_task(ctl.admit(request(rid="late-3"), lambda i: None))
    # degraded to best effort, waiting for capacity
    await wait_until_async(lambda: ctl.queue_length("m") == 1, timeout=5, message="the request queued")
    await ctl.close()
    with pytest.raises(GatewayError) as err:
        await task
    assert err.value.status == 503


async def test_disabled_admission_dispatches_everything():
    ctl = await _controller(GateAdmitter(), enabled=False)
    try:
        _, outcome = await ctl.admit(request(rid="late-4"), lambda i: None)
        assert outcome.reason == "admission-off"
    finally:
        await ctl.close()
