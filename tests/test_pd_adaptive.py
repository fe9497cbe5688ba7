"""The per-request PD decision (``pd-adaptive``, issue 17): split, or serve the whole request on the
decode instance, on constructed snapshots (the cost model's priors, or none)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pdgate.scheduler.costmodel.latency import LatencyModel, PriorSpec
from pdgate.scheduler.costmodel.model import CostModel
from pdgate.scheduler.framework import Decision
from pdgate.scheduler.plugins import profile_handlers as ph
from pdgate.scheduler.plugins.profile_handlers import AdaptivePdHandler, AdaptivePdParams
from pdgate.scheduler.registry import HandlerSpec, PluginRegistry
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo, SloTarget

pytestmark = pytest.mark.unit

GROUP = "sim/m/default"
CAN_COLOCATE = frozenset({"colocates_on_decode"})


@pytest.fixture(scope="module")
def costs() -> CostModel:
    return CostModel(LatencyModel.from_priors({GROUP: PriorSpec()}), None)  # type: ignore[arg-type]


def view(id: str, role: str, **kw) -> InstanceView:
    kw.setdefault("capabilities", CAN_COLOCATE)
    return InstanceView(id=id, url=f"http://{id}", role=role, model="m", cost_group=GROUP, **kw)  # type: ignore[arg-type]


def request(prompt: int, tpot: float | None = 0.1) -> RequestInfo:
    return RequestInfo("r", "m", prompt, 128, slo=SloTarget(2.0, tpot))


def first_that_serves(profile: str, among: Sequence[InstanceView]) -> Decision:
    """The profiles' stand-in: the first candidate that can take the profile's leg."""
    phase = {"prefill": "prefill", "decode": "decode"}.get(profile)
    chosen = next(i for i in among if (i.serves(phase) if phase else i.role == "both"))  # type: ignore[arg-type]
    return Decision(profile, chosen, len(among))


def plan(snapshot: ClusterSnapshot, info: RequestInfo, **params):
    handler = AdaptivePdHandler("pd", AdaptivePdParams(**params))
    return handler.plan(info, snapshot, snapshot.instances, first_that_serves)


def test_without_a_cost_model_short_uncached_prompts_and_held_prefixes_stay_on_the_decode_instance():
    fleet = (view("p", "prefill"), view("d", "decode"))
    short = plan(ClusterSnapshot(fleet, 0.0, {}, None), request(200))
    assert not short.split and short.prefill is None and short.decode.instance_id == "d"
    assert short.reason == ph.COLOCATED_SHORT
    held = plan(ClusterSnapshot(fleet, 0.0, {"d": 3600}, None), request(4000))
    assert not held.split and held.reason == ph.COLOCATED_PREFIX
    long = plan(ClusterSnapshot(fleet, 0.0, {"d": 1000}, None), request(4000))
    assert long.split and long.prefill.instance_id == "p" and long.reason == ph.SPLIT_LONG
    tighter = plan(ClusterSnapshot(fleet, 0.0, {}, None), request(200), max_uncached_tokens=100)
    assert tighter.split


def test_a_decode_instance_that_cannot_prefill_a_whole_request_always_splits(costs):
    fleet = (view("p", "prefill"), view("d", "decode", capabilities=frozenset()))
    decided = plan(ClusterSnapshot(fleet, 0.0, {}, costs), request(10))
    assert decided.split and decided.reason == ph.SPLIT_CANNOT


def test_colocates_when_the_prefill_queue_would_cost_more_than_prefilling_on_the_decode_instance(costs):
    busy_prefill = (view("p", "prefill", prefill_wait_s=1.5), view("d", "decode"))
    decided = plan(ClusterSnapshot(busy_prefill, 0.0, {}, costs), request(2048))
    assert not decided.split and decided.reason == ph.COLOCATED_FASTER
    busy_decode = (view("p", "prefill"), view("d", "decode", prefill_wait_s=1.5))
    decided = plan(ClusterSnapshot(busy_decode, 0.0, {}, costs), request(2048))
    assert decided.split and decided.reason == ph.SPLIT_FASTER
    # a margin below 1 asks colocation to win by that much: an idle pair then splits a long prompt
    idle = (view("p", "prefill"), view("d", "decode"))
    assert plan(ClusterSnapshot(idle, 0.0, {}, costs), request(2048), ttft_margin=0.5).split


def test_splits_when_prefilling_there_would_break_the_decode_batchs_tpot(costs):
    batch = {"decode_inflight": 32, "decode_context_tokens": 32 * 2000}
    step = costs.decode_step_s(view("x", "decode"), 33, 32 * 2000 + 2048 + 64)
    tight = (view("p", "prefill", prefill_wait_s=1.5), view("d", "decode", tightest_tpot_s=step * 1.01, **batch))
    decided = plan(ClusterSnapshot(tight, 0.0, {}, costs), request(4096))
    assert decided.split and decided.reason == ph.SPLIT_TPOT
    loose = (view("p", "prefill", prefill_wait_s=1.5), view("d", "decode", tightest_tpot_s=step * 3, **batch))
    assert not plan(ClusterSnapshot(loose, 0.0, {}, costs), request(4096)).split


def test_many_colocated_prompts_add_up_and_then_the_next_one_splits(costs):
    """One short prompt alone hardly stalls a decode batch; the instance's recent prefill share
    (prompts colocated there lately) stretches every step, and past the TPOT SLO it splits."""
    batch = {"decode_inflight": 32, "decode_context_tokens": 32 * 1000}
    step = costs.decode_step_s(view("x", "decode"), 33, 32 * 1000 + 1024 + 64)
    queued = view("p", "prefill", prefill_wait_s=1.0)
    fresh = view("d", "decode", tightest_tpot_s=step * 1.4, **batch)
    assert not plan(ClusterSnapshot((queued, fresh), 0.0, {}, costs), request(1024)).split
    busy = view("d", "decode", tightest_tpot_s=step * 1.4, prefill_share=0.35, **batch)  # 1/(1-0.35) > 1.4
    decided = plan(ClusterSnapshot((queued, busy), 0.0, {}, costs), request(1024))
    assert decided.split and decided.reason == ph.SPLIT_TPOT


def test_models_without_prefill_or_decode_instances_run_colocated(costs):
    decided = plan(ClusterSnapshot((view("a", "both"), view("b", "both")), 0.0, {}, costs), request(4000))
    assert not decided.split and decided.reason == ph.NO_PD


def test_it_is_a_profile_handler_the_registry_builds():
    registry = PluginRegistry(load_entry_points=False)
    profiles = {name: object() for name in ("prefill", "decode", "colocated")}
    spec = HandlerSpec(type="pd-adaptive", parameters={"max_uncached_tokens": 64})
    handler = registry.create_profile_handler(spec, profiles)  # type: ignore[arg-type]
    assert isinstance(handler, AdaptivePdHandler) and handler.params.max_uncached_tokens == 64  # type: ignore[attr-defined]
    assert all(r.startswith(("split", "colocated")) for r in ph.REASONS)


def paths_plan(info: RequestInfo, fleet=None, **params):
    fleet = fleet or (view("c", "both"), view("p", "prefill"), view("d", "decode"))
    handler = ph.PdPathsHandler("paths", ph.PdPathsParams(**params))
    snapshot = ClusterSnapshot(fleet, 0.0, {}, None)
    return handler.plan(info, snapshot, snapshot.instances, first_that_serves)


def tagged(request_id: str, **tags: str) -> RequestInfo:
    return RequestInfo(request_id, "m", 100, 16, tags={"route": "/v1/completions", **tags})


def test_pd_paths_puts_the_configured_share_on_the_colocated_instances_the_same_for_a_request_id():
    plans = [paths_plan(tagged(f"req-{i}"), colocated_percent=30) for i in range(2000)]
    colocated = [p for p in plans if not p.split]
    assert all(p.decode.instance_id == "c" and p.reason == ph.COLOCATED_SHARE for p in colocated)
    assert all(p.prefill.instance_id == "p" and p.decode.instance_id == "d" for p in plans if p.split)
    assert 0.26 < len(colocated) / len(plans) < 0.34
    again = [paths_plan(tagged(f"req-{i}"), colocated_percent=30).split for i in range(2000)]
    assert again == [p.split for p in plans]
    assert all(paths_plan(tagged(f"r{i}")).split for i in range(50))  # the default: 0 %


def test_pd_paths_rules_before_the_share_and_a_path_without_instances():
    rules = {"colocated_apps": ["chat-ui"], "split_apps": ["batch"], "colocated_routes": ["/v1/chat/completions"]}
    assert paths_plan(tagged("a", app="chat-ui"), **rules).reason == ph.COLOCATED_APP
    assert paths_plan(tagged("a", app="batch"), colocated_percent=100, **rules).reason == ph.SPLIT_APP
    chat = RequestInfo("a", "m", 100, 16, tags={"route": "/v1/chat/completions"})
    assert paths_plan(chat, **rules).reason == ph.COLOCATED_ROUTE
    asked = tagged("a", pd_path="colocated")
    assert paths_plan(asked).split  # the header is not honoured unless configured
    assert paths_plan(asked, honour_header=True).reason == ph.COLOCATED_HEADER
    assert paths_plan(tagged("a", pd_path="split"), honour_header=True, colocated_percent=100).split
    no_colocated = (view("p", "prefill"), view("d", "decode"))
    fallback = paths_plan(tagged("a", app="chat-ui"), no_colocated, **rules)
    assert fallback.split and fallback.reason == ph.SPLIT_NO_COLOCATED
    only_colocated = (view("c", "both"),)
    assert not paths_plan(tagged("a"), only_colocated).split


def test_pd_paths_sends_a_request_to_the_other_path_when_its_own_has_no_live_instance_for_a_leg():
    """Found by the soak: every prefill drained (or the one colocated instance dead) left the
    path's instances in place, so the request got a 503 while the other path could serve it."""
    split_asked = tagged("a", pd_path="split")
    drained_prefill = (view("c", "both"), view("p", "prefill", draining=True), view("d", "decode"))
    moved = paths_plan(split_asked, drained_prefill, honour_header=True)
    assert not moved.split and moved.decode.instance_id == "c" and moved.reason == ph.NO_SPLIT
    colocated_asked = tagged("a", pd_path="colocated")
    dead_colocated = (view("c", "both", healthy=False), view("p", "prefill"), view("d", "decode"))
    moved = paths_plan(colocated_asked, dead_colocated, honour_header=True)
    assert moved.split and moved.reason == ph.SPLIT_NO_COLOCATED
    nothing_live = (view("c", "both", healthy=False), view("p", "prefill", draining=True), view("d", "decode"))
    assert paths_plan(colocated_asked, nothing_live, honour_header=True).reason == ph.COLOCATED_HEADER  # (503 then)


def test_pd_split_colocates_on_a_both_instance_when_a_leg_has_no_live_instance():
    """Found by the Kubernetes churn test: a pod relabelled from decode to both left a prefill and a
    both instance, and pd-split still split every request (its decode filter left no instance: 503)."""
    handler = ph.PdSplitHandler("pd", ph.PluginParams())

    def split_plan(*fleet: InstanceView):
        snapshot = ClusterSnapshot(fleet, 0.0, {}, None)
        return handler.plan(request(200), snapshot, snapshot.instances, first_that_serves)

    for fleet in (
        (view("p", "prefill"), view("c", "both")),
        (view("p", "prefill"), view("d", "decode", draining=True), view("c", "both")),
        (view("p", "prefill", healthy=False), view("d", "decode"), view("c", "both")),
    ):
        plan_ = split_plan(*fleet)
        assert not plan_.split and plan_.decode.instance_id == "c" and plan_.reason == ph.NO_SPLIT, fleet
    whole = split_plan(view("p", "prefill"), view("d", "decode"), view("c", "both"))
    assert whole.split and whole.prefill.instance_id == "p" and whole.decode.instance_id == "d"
    nothing_live = split_plan(view("p", "prefill"), view("d", "decode", draining=True))
    assert nothing_live.split  # no both instance to fall back on: its filters say why (503 then)
