"""Tenants: naming, budgets and the admission queue's fair share, on a real event loop with a fake admitter."""

from __future__ import annotations

import asyncio

import pytest
from fakes.clock import FakeClock

from pdgate.gateway.admission import AdmissionController
from pdgate.gateway.config import AdmissionConfig, SloConfig
from pdgate.gateway.fair_share import VirtualCounters
from pdgate.gateway.requests import GatewayError
from pdgate.gateway.slo import SloResolver
from pdgate.gateway.tenant_config import TenantsConfig
from pdgate.gateway.tenants import BudgetExceeded, TenantBudgets, TenantDirectory, TokenBucket
from pdgate.scheduler.framework import Admitter, Verdict
from pdgate.scheduler.snapshot import ClusterSnapshot, RequestInfo, SloTarget

pytestmark = pytest.mark.unit


def tenants(**kw) -> TenantsConfig:
    base = {
        "tenants": [
            {"name": "acme", "api_keys": ["sk-acme"], "weight": 1.0},
            {"name": "zeta", "api_keys": ["sk-zeta"], "routes": ["/v1/embeddings"]},
        ]
    }
    return TenantsConfig.model_validate({**base, **kw})


def test_a_request_is_named_by_key_header_or_route_in_the_configured_order() -> None:
    directory = TenantDirectory(tenants(identify_by=["api_key", "header", "route"]))
    assert directory.identify({"authorization": "Bearer sk-acme"}, "/v1/chat/completions") == "acme"
    assert directory.identify({"x-pdgate-tenant": "zeta"}, "/v1/chat/completions") == "zeta"
    assert directory.identify({"authorization": "Bearer sk-acme", "x-pdgate-tenant": "zeta"}, "/") == "acme"
    assert directory.identify({}, "/v1/embeddings") == "zeta"
    assert directory.identify({}, "/v1/completions") == "default"
    with pytest.raises(GatewayError) as err:
        directory.identify({"x-pdgate-tenant": "nobody"}, "/v1/completions")
    assert err.value.status == 403
    strict = TenantDirectory(tenants(require_tenant=True))
    with pytest.raises(GatewayError) as err:
        strict.identify({}, "/v1/completions")
    assert err.value.status == 403 and err.value.code == "no_tenant"


def test_config_refuses_a_key_or_name_given_twice() -> None:
    with pytest.raises(ValueError, match="API key"):
        TenantsConfig.model_validate({"tenants": [{"name": "a", "api_keys": ["k"]}, {"name": "b", "api_keys": ["k"]}]})
    with pytest.raises(ValueError, match="unique"):
        TenantsConfig.model_validate({"tenants": [{"name": "a"}, {"name": "a"}]})


def test_a_tenant_class_and_priority_ceiling_bound_what_its_requests_ask_for() -> None:
    slo = SloResolver(
        SloConfig.model_validate(
            {"classes": [{"name": "batch", "ttft_ms": 30000, "tpot_ms": None, "priority": 5, "apps": ["x"]}]}
        )
    )
    target = slo.resolve({"x-priority": "100"}, "/v1/completions", slo_class="batch", max_priority=1)
    assert (target.slo_class, target.ttft_s, target.priority) == ("batch", 30.0, 1)
    assert slo.resolve({"x-priority": "-3"}, "/", max_priority=1).priority == -3  # below the ceiling: as asked


def test_token_bucket_refills_per_minute_and_may_be_owed() -> None:
    bucket = TokenBucket.full(600, now=0.0)  # 10 per second
    bucket.charge(600, 0.0)
    assert bucket.wait_for(50, 0.0) == pytest.approx(5.0)
    assert bucket.wait_for(50, 5.0) == 0.0
    bucket.charge(100, 5.0)  # output served beyond the level: owed
    assert bucket.level == pytest.approx(-50)
    assert bucket.wait_for(10_000, 5.0) == pytest.approx(65.0)  # capped at a full bucket: 650 tokens away


def test_budgets_refuse_with_retry_after_and_the_reason() -> None:
    clock = FakeClock()
    config = TenantsConfig.model_validate(
        {"tenants": [{"name": "acme", "requests_per_minute": 2, "tokens_per_minute": 1200}]}
    )
    budgets = TenantBudgets(config, clock)
    budgets.admit("acme", 100)
    budgets.admit("acme", 100)
    with pytest.raises(BudgetExceeded) as err:
        budgets.admit("acme", 100)
    assert err.value.status == 429 and err.value.budget == "requests"
    assert err.value.headers == {"Retry-After": "30", "x-pdgate-reject-reason": "tenant-budget"}
    clock.advance(60)
    budgets.charge("acme", output_tokens=1500)  # a long answer streamed: the token budget is owed
    with pytest.raises(BudgetExceeded) as err:
        budgets.admit("acme", 100)
    assert err.value.budget == "tokens" and int(err.value.headers["Retry-After"]) == 20  # (100 + 300) / 20 per s
    budgets.admit("other", 10**6)  # a tenant without budgets is never refused


def test_an_idle_tenant_joining_is_lifted_to_the_least_active_counter() -> None:
    counters = VirtualCounters({"heavy": 1.0, "light": 1.0, "vip": 4.0}, input_cost=1.0, output_cost=2.0)
    counters.started("heavy")
    counters.charge("heavy", prompt_tokens=1000, output_tokens=500)
    assert counters.counter("heavy") == 2000
    counters.joined("light", [])
    assert counters.counter("light") == 2000  # no credit banked while idle
    counters.charge("vip", prompt_tokens=4000)
    assert counters.counter("vip") == 1000  # weight 4: a quarter of the charge
    counters.started("light")
    counters.joined("vip", [])
    assert counters.counter("vip") == 2000  # lifted to the least active (heavy and light: 2000)


class Gate(Admitter):
    """Dispatches while fewer than ``slots`` requests run (the test frees slots), else waits."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.running = 0

    def assess(self, info, snapshot, now, work_ahead_s) -> Verdict:  # type: ignore[override]
        if self.running < self.slots:
            self.running += 1
            return Verdict("dispatch", "free")
        return Verdict("wait", "busy")


def info(rid: str, tenant: str, *, arrival: float = 0.0, prompt: int = 100) -> RequestInfo:
    return RequestInfo(rid, "m", prompt, 50, slo=SloTarget(10.0, None, 0), arrival=arrival, tags={"tenant": tenant})


async def dispatch_order(counters: VirtualCounters | None) -> list[str]:
    """Ten flood requests queue first (earlier deadlines), then two calm ones, behind one slot that
    frees every 10 ms; the order they were dispatched in. A dispatched request is charged in full."""
    gate = Gate(slots=1)
    admission = AdmissionController(AdmissionConfig(recheck_ms=1000), gate, clock=lambda: 0.0, fair_share=counters)
    admission.start()
    order: list[str] = []
    empty = ClusterSnapshot((), 0.0, {}, None)

    async def one(rid: str, tenant: str, arrival: float) -> None:
        admitted, _ = await admission.admit(info(rid, tenant, arrival=arrival), lambda i: empty)
        order.append(admitted.request_id)
        if counters is not None:
            counters.started(tenant)
            counters.charge(tenant, prompt_tokens=admitted.prompt_tokens, output_tokens=50)

    try:
        tasks = [asyncio.create_task(one(f"f{i}", "flood", arrival=i * 0.001)) for i in range(10)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(one(f"c{i}", "calm", arrival=1.0 + i)) for i in range(2)]
        for _ in range(12):
            await asyncio.sleep(0.01)
            gate.running -= 1  # one request ends: the next goes
            admission.wake()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
    finally:
        await admission.close()
    assert sorted(order) == sorted([f"f{i}" for i in range(10)] + ["c0", "c1"])
    return order


async def test_at_overload_the_least_served_tenant_goes_first_not_the_flood() -> None:
    order = await dispatch_order(VirtualCounters({"flood": 1.0, "calm": 1.0}))
    # calm joins with its counter lifted to flood's (no credit banked), so they alternate from there:
    # ties go by deadline (flood's are earlier), then the one just served has the greater counter
    assert order[:5] == ["f0", "f1", "c0", "f2", "c1"]


async def test_without_fair_share_the_deadline_order_lets_the_flood_go_first() -> None:
    order = await dispatch_order(None)
    assert order.index("c0") == 10  # behind the whole flood


def routed_request(tenant: str, prompt: int = 100):
    from pdgate.gateway.hash_schemes import PromptHashes
    from pdgate.gateway.intake import Routed

    return Routed(
        "chat",
        "/v1/chat/completions",
        {},
        info("r", tenant, prompt=prompt),
        [1] * prompt,
        PromptHashes([1] * prompt),
        True,
    )


async def test_a_request_refused_or_failed_before_any_answer_gets_the_budget_back() -> None:
    from prometheus_client import CollectorRegistry

    from pdgate.gateway.tenant_service import TenantService

    clock = FakeClock()
    config = TenantsConfig.model_validate({"tenants": [{"name": "acme", "requests_per_minute": 1}]})
    service = TenantService(config, clock, CollectorRegistry())
    refused = routed_request("acme")
    service.admit(refused)
    service.ended(refused, 429)  # admission turned it away: nothing was served
    failed = routed_request("acme")
    service.admit(failed)
    service.started(failed)
    service.ended(failed, 502)  # every engine failed it before any answer: not the tenant's use
    served = routed_request("acme")
    service.admit(served)  # the minute's one request is still there
    service.started(served)
    served.obs.first_token = served.obs.last_token = clock()
    service.ended(served, 200)
    with pytest.raises(BudgetExceeded):
        service.admit(routed_request("acme"))


class Bus:
    """A hand-written stand-in for NATS subjects: every subscriber hears every message."""

    def __init__(self) -> None:
        self.listeners: list = []

    def replica(self, replica_id: str):
        bus = self

        class Shared:
            connected = True

            def __init__(self) -> None:
                self.replica_id = replica_id

            def subscribe(self, subject, on_message) -> None:
                bus.listeners.append(on_message)

            async def publish(self, subject, data) -> None:
                for listener in list(bus.listeners):
                    await listener(data)

        return Shared()


async def test_replicas_charge_each_others_use_and_start_over_when_one_restarts() -> None:
    from pdgate.gateway.tenant_sharing import TenantSharing

    clock = FakeClock()
    config = TenantsConfig.model_validate({"tenants": [{"name": "acme", "requests_per_minute": 10}]})
    bus = Bus()

    def replica(name: str, started_at: float) -> tuple[TenantSharing, TenantBudgets]:
        budgets = TenantBudgets(config, clock)
        sharing = TenantSharing(bus.replica(name), budgets, interval_s=1, wall_clock=lambda: started_at)  # type: ignore[arg-type]
        return sharing, budgets

    a, a_budgets = replica("a", 100.0)
    _, b_budgets = replica("b", 100.0)
    for _ in range(3):
        a_budgets.admit("acme", 0)
    await a.publish()
    await a.publish()  # the same totals again: charged once
    assert b_budgets.requests["acme"].level == pytest.approx(7)
    a_budgets.charge("acme", requests=-1)  # one of them given back
    await a.publish()
    assert b_budgets.requests["acme"].level == pytest.approx(8)
    # a replica that starts while A runs takes A's totals so far as a baseline, not as new use
    _, late_budgets = replica("late", 300.0)
    await a.publish()
    assert late_budgets.requests["acme"].level == pytest.approx(10)
    a_budgets.admit("acme", 0)
    await a.publish()
    assert late_budgets.requests["acme"].level == pytest.approx(9)
    assert b_budgets.requests["acme"].level == pytest.approx(7)
    # A restarts (a new run, begun after the others'): its totals count from zero
    restarted, restarted_budgets = replica("a", 400.0)
    restarted_budgets.admit("acme", 0)
    await restarted.publish()
    assert b_budgets.requests["acme"].level == pytest.approx(6)
    assert late_budgets.requests["acme"].level == pytest.approx(8)
