"""The scaling plan (issue 17, item 4): how many prefill, decode and colocated instances a model's
forecast load needs, the scale-down window, and the demand every replica's prefill work adds to."""

from __future__ import annotations

from collections import deque

import pytest

from pdgate.gateway.demand import DemandMeter
from pdgate.gateway.scaling import stabilised
from pdgate.scheduler.costmodel.latency import LatencyModel, PriorSpec
from pdgate.scheduler.costmodel.model import CostModel
from pdgate.scheduler.role_planner import PoolDemand, decode_capacity
from pdgate.scheduler.scaling_planner import ScalePlan, plan_scale
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView

pytestmark = pytest.mark.unit

GROUP = "sim/m/default"
TPOT_S = 0.05


@pytest.fixture(scope="module")
def costs() -> CostModel:
    return CostModel(LatencyModel.from_priors({GROUP: PriorSpec()}), None)  # type: ignore[arg-type]


def view(id: str, role: str, **kw) -> InstanceView:
    return InstanceView(id=id, url=f"http://{id}", role=role, model="m", cost_group=GROUP, **kw)  # type: ignore[arg-type]


def scale(costs, fleet, demand, configured=None, **kw) -> ScalePlan:
    settings = {"tpot_target_s": TPOT_S, "prefill_utilisation": 0.7, "headroom": 0.2, "minimum": {}, "maximum": {}}
    roles = configured or {i.id: i.role for i in fleet}
    plan = plan_scale("m", fleet, roles, demand, costs, **{**settings, **kw})
    assert plan is not None
    return plan


def test_each_pool_is_sized_for_its_own_forecast_with_headroom(costs):
    fleet = [view("p0", "prefill"), view("d0", "decode"), view("d1", "decode")]
    batch = decode_capacity(fleet[1], costs, TPOT_S, 1500)
    demand = PoolDemand(prefill_work_s_per_s=2.0, decode_streams=3.2 * batch, context_tokens_per_stream=1500)
    plan = scale(costs, fleet, demand)
    # prefill: 2.0 s/s at 70 % each, +20 % -> 3.43 -> 4; decode: 3.2 batches + 20 % = 3.84 -> 4
    assert (plan.prefill, plan.decode, plan.colocated) == (4, 4, 0)
    assert plan.streams_per_decode == batch and plan.current["prefill"] == 1 and plan.current["decode"] == 2
    assert "headroom" in plan.reason and f"{batch} per instance" in plan.reason
    # an idle model keeps one of each (its serving path); limits hold either way
    idle = scale(costs, fleet, PoolDemand(0.0, 0.0, 0.0))
    assert (idle.prefill, idle.decode) == (1, 1)
    bounded = scale(costs, fleet, demand, minimum={"decode": 2}, maximum={"prefill": 3})
    assert (bounded.prefill, bounded.decode) == (3, 4)
    assert scale(costs, fleet, PoolDemand(0.0, 0.0, 0.0), minimum={"decode": 2}).decode == 2


def test_colocated_instances_carry_both_shares_and_flex_pools_the_whole_split(costs):
    colocated = [view("c0", "both"), view("c1", "both")]
    batch = decode_capacity(colocated[0], costs, TPOT_S, 1000)
    demand = PoolDemand(prefill_work_s_per_s=0.7, decode_streams=batch, context_tokens_per_stream=1000)
    plan = scale(costs, colocated, demand, headroom=0.0)
    assert (plan.prefill, plan.decode, plan.colocated) == (0, 0, 2)  # 1 + 1 instance's worth
    flex = [view("f0", "prefill", flexible=True), view("f1", "decode", flexible=True)]
    plan = scale(costs, flex, demand, configured={"f0": "flex", "f1": "flex"}, headroom=0.0)
    assert (plan.prefill, plan.decode) == (1, 1) and plan.wanted("flex") == 2 and plan.current["flex"] == 2
    mixed = [view("p0", "prefill"), view("f0", "decode", flexible=True)]
    plan = scale(costs, mixed, PoolDemand(1.4, 2.5 * batch, 1000), configured={"p0": "prefill", "f0": "flex"})
    # 3 prefill and 3 decode wanted; the fixed prefill instance covers one: the flex pool gets 5
    assert (plan.prefill, plan.decode, plan.wanted("flex"), plan.wanted("prefill")) == (3, 3, 5, 3)


def test_a_draining_instance_is_not_counted(costs):
    fleet = [view("p0", "prefill"), view("d0", "decode"), view("d1", "decode", draining=True)]
    plan = scale(costs, fleet, PoolDemand(0.1, 1, 100))
    assert plan.current["decode"] == 1


def test_a_smaller_plan_waits_out_the_scale_down_window(costs):
    def at(decode: int) -> ScalePlan:
        return ScalePlan("m", 1, decode, 0, {}, PoolDemand(0, 0, 0), 8, "r")

    history: deque[tuple[float, ScalePlan]] = deque()
    history.append((0.0, at(4)))
    assert stabilised(history, 0.0, 60).decode == 4
    history.append((30.0, at(2)))
    held = stabilised(history, 30.0, 60)
    assert held.decode == 4 and "decode 2 -> 4" in held.reason
    history.append((70.0, at(2)))  # the 4 is now older than the window: the plan goes down
    assert stabilised(history, 70.0, 60).decode == 2 and len(history) == 2
    history.append((80.0, at(6)))  # up at once
    assert stabilised(history, 80.0, 60).decode == 6


class _Cluster:
    """The part of :class:`pdgate.gateway.cluster.Cluster` the demand meter reads."""

    def __init__(self) -> None:
        self.now = 0.0
        self.prefill_work_sent: dict[str, float] = {}
        self.prefill_legs_sent: dict[str, int] = {}
        self.remote_prefill_work: dict[str, dict[str, tuple[float, int]]] = {}

    def clock(self) -> float:
        return self.now


def test_demand_counts_the_prefill_work_of_every_replica():
    cluster = _Cluster()
    meter = DemandMeter(cluster)  # type: ignore[arg-type]
    snapshot = ClusterSnapshot(instances=(view("d0", "decode", decode_inflight=3, decode_context_tokens=3000),))
    cluster.prefill_work_sent, cluster.prefill_legs_sent = {"m": 10.0}, {"m": 100}
    cluster.remote_prefill_work = {"r2": {"m": (50.0, 400)}}
    assert meter.measure("m", snapshot) is None  # the first call sets the baselines
    cluster.now, cluster.prefill_work_sent["m"], cluster.prefill_legs_sent["m"] = 2.0, 11.0, 110
    cluster.remote_prefill_work = {"r2": {"m": (53.0, 430)}, "r3": {"m": (7.0, 5)}}  # r3 is new: its baseline only
    demand = meter.measure("m", snapshot)
    assert demand is not None
    assert demand.prefill_work_s_per_s == pytest.approx((1.0 + 3.0) / 2)
    assert demand.mean_prefill_s == pytest.approx(4.0 / 40)  # 4 s of work in 40 legs
    assert demand.decode_streams == 3 and demand.context_tokens_per_stream == 1000
    cluster.now = 4.0
    cluster.remote_prefill_work = {"r3": {"m": (9.0, 15)}}  # r2 gone (expired), r3 sent 2 s of work in 10 legs
    demand = meter.measure("m", snapshot)
    assert demand.prefill_work_s_per_s > 0 and demand.mean_prefill_s == pytest.approx((0.1 + 0.2) / 2)
