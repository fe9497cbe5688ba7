"""The role balancer's planning (issue 17): the split of prefill and decode instances a demand needs,
and the one flex instance moved toward it, on constructed views and the cost model's priors."""

from __future__ import annotations

import pytest

from pdgate.scheduler.costmodel.latency import LatencyModel, PriorSpec
from pdgate.scheduler.costmodel.model import CostModel
from pdgate.scheduler.role_planner import (
    Holt,
    PoolDemand,
    decode_capacity,
    plan_roles,
    prefill_busy_limit,
    tpot_in_force,
)
from pdgate.scheduler.snapshot import InstanceView

pytestmark = pytest.mark.unit

GROUP = "sim/m/default"


@pytest.fixture(scope="module")
def costs() -> CostModel:
    return CostModel(LatencyModel.from_priors({GROUP: PriorSpec()}), None)  # type: ignore[arg-type]


def view(id: str, role: str, flexible: bool = True, **kw) -> InstanceView:
    return InstanceView(id=id, url=f"http://{id}", role=role, model="m", flexible=flexible, cost_group=GROUP, **kw)  # type: ignore[arg-type]


def plan(costs, fleet, demand, movable=None, **kw):
    settings = {"tpot_target_s": 0.05, "prefill_utilisation": 0.7, "hysteresis": 0.2, **kw}
    return plan_roles(fleet, demand, costs, movable={i.id for i in fleet} if movable is None else movable, **settings)


def test_prefill_heavy_load_moves_the_least_busy_flex_decoder_to_prefill(costs):
    fleet = [view("p0", "prefill"), view("d0", "decode", decode_inflight=3), view("d1", "decode", decode_inflight=1)]
    heavy = PoolDemand(prefill_work_s_per_s=1.2, decode_streams=4, context_tokens_per_stream=1500)
    decided = plan(costs, fleet, heavy)
    assert (decided.prefill, decided.decode, decided.current_prefill) == (2, 1, 1)
    assert decided.move == ("d1", "prefill") and decided.prefill_utilisation == pytest.approx(1.2 / 1.4)
    # one whose dwell time is not over is not moved; nor is anything when the other is fixed
    assert plan(costs, fleet, heavy, movable={"d0"}).move == ("d0", "prefill")
    assert plan(costs, fleet, heavy, movable=set()).move is None
    fixed = [view("p0", "prefill"), view("d0", "decode", False), view("d1", "decode")]
    assert plan(costs, fixed, heavy).move == ("d1", "prefill")


def test_decode_heavy_load_moves_a_flex_prefill_instance_to_decode(costs):
    batch = decode_capacity(view("x", "decode"), costs, 0.05, 2000)
    fleet = [view("p0", "prefill", prefill_inflight=2), view("p1", "prefill"), view("d0", "decode")]
    heavy = PoolDemand(prefill_work_s_per_s=0.1, decode_streams=1.5 * batch, context_tokens_per_stream=2000)
    decided = plan(costs, fleet, heavy)
    assert (decided.prefill, decided.decode) == (1, 2) and decided.move == ("p1", "decode")


def test_no_move_within_the_hysteresis_or_without_flex_instances(costs):
    fleet = [view("p0", "prefill"), view("d0", "decode"), view("d1", "decode")]
    light = PoolDemand(prefill_work_s_per_s=0.5, decode_streams=2, context_tokens_per_stream=1000)
    decided = plan(costs, fleet, light, hysteresis=0.6)  # 2 prefill would drop 71 % to 36 %: less than 60 % of it
    assert decided.prefill == 2 and decided.move is None
    assert plan(costs, fleet, light).move == ("d0", "prefill")
    fixed = [view("p0", "prefill", False), view("d0", "decode", False)]
    assert plan(costs, fixed, light) is None
    # every pool keeps one instance, whatever the demand
    assert plan(costs, fleet, PoolDemand(50.0, 0, 1000)).decode == 1


def test_decode_capacity_is_the_largest_batch_within_the_tpot_target(costs):
    inst = view("d", "decode")
    batch = decode_capacity(inst, costs, 0.05, 2000)
    assert (
        costs.decode_step_s(inst, batch, batch * 2000)
        <= 0.05
        < costs.decode_step_s(inst, batch + 1, (batch + 1) * 2000)
    )
    assert decode_capacity(inst, costs, 1e-6, 2000) == 1


def test_holt_follows_a_trend():
    holt = Holt()
    forecasts = [holt.update(v) for v in (1.0, 2.0, 3.0, 4.0, 5.0)]
    assert forecasts[0] == 1.0 and forecasts[-1] > 5.0  # a rising series is forecast to go on rising
    assert Holt().update(-1.0) == 0.0


def test_prefill_instances_are_kept_as_busy_as_their_ttft_target_allows():
    # no target, or nothing measured: the cap alone
    assert prefill_busy_limit(0.85, None, 0.1) == 0.85 and prefill_busy_limit(0.85, 0.4, None) == 0.85
    # 80 ms prefills under a 400 ms target: the tail wait may be 320 ms, rho / (1 - rho) <= 320 / (2.3 x 80)
    room = 0.32 / (2.302585 * 0.08)
    assert prefill_busy_limit(0.85, 0.4, 0.08) == pytest.approx(room / (1 + room), rel=1e-4)
    assert prefill_busy_limit(0.85, 0.4, 0.01) == 0.85  # short prefills: the cap binds
    assert prefill_busy_limit(0.85, 0.4, 0.5) == 0.05  # a prefill longer than the target: hardly any queue
    assert prefill_busy_limit(0.85, 0.4, 0.08) < prefill_busy_limit(0.85, 0.4, 0.04)


def test_a_stricter_tpot_slo_in_flight_sizes_the_decode_batches(costs):
    fleet = [view("p0", "prefill"), view("d0", "decode", tightest_tpot_s=0.02), view("d1", "decode")]
    assert tpot_in_force(0.05, fleet) == 0.02 and tpot_in_force(0.01, fleet) == 0.01
    batch_loose = decode_capacity(fleet[1], costs, 0.05, 1000)
    demand = PoolDemand(prefill_work_s_per_s=0.1, decode_streams=1.5 * batch_loose, context_tokens_per_stream=1000)
    strict = plan(costs, fleet, demand)
    loose = plan(costs, [view("p0", "prefill"), view("d0", "decode"), view("d1", "decode")], demand)
    assert strict.decode_utilisation > loose.decode_utilisation and "20 ms TPOT" in strict.reason


def test_a_long_prefill_mix_needs_more_prefill_instances_at_the_same_work(costs):
    fleet = [view("p0", "prefill"), view("p1", "prefill"), view("d0", "decode"), view("d1", "decode")]
    streams = 1.6 * decode_capacity(fleet[2], costs, 0.05, 1000)
    short = PoolDemand(0.6, streams, 1000, mean_prefill_s=0.02)
    long = PoolDemand(0.6, streams, 1000, mean_prefill_s=0.15)
    # short prefills: one instance at 0.6 / 0.85 = 71 % busy keeps the target; 150 ms ones may queue
    # only up to 42 % busy, so the same work takes two
    assert plan(costs, fleet, short, ttft_target_s=0.4, prefill_utilisation=0.85).prefill == 1
    assert plan(costs, fleet, long, ttft_target_s=0.4, prefill_utilisation=0.85).prefill == 2
