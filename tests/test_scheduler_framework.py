"""The scheduling framework and the in-tree plugins, on hand-built snapshots."""

from __future__ import annotations

import dataclasses

import pytest

from pdgate.scheduler.framework import Scorer, run_profile
from pdgate.scheduler.registry import PluginConfigError, PluginRegistry
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo

pytestmark = pytest.mark.unit

REQ = RequestInfo("r1", "m", prompt_tokens=100, max_tokens=10)


def inst(id: str, role: str = "both", **kw) -> InstanceView:
    return InstanceView(id=id, url=f"http://{id}", role=role, model="m", **kw)  # type: ignore[arg-type]


def build(profile: list[dict], plugins: list[dict], registry: PluginRegistry | None = None):
    registry = registry or PluginRegistry(load_entry_points=False)
    return registry.build({"plugins": plugins, "profiles": {"p": profile}})["p"]


PLUGINS = [
    {"name": "healthy", "type": "health-filter"},
    {"name": "decoders", "type": "role-filter", "parameters": {"role": "decode"}},
    {"name": "load", "type": "least-loaded"},
    {"name": "kv", "type": "kv-usage"},
    {"name": "prefix", "type": "prefix-affinity"},
    {"name": "best", "type": "max-score", "parameters": {"seed": 1}},
    {"name": "rr", "type": "round-robin"},
    {"name": "p2c", "type": "power-of-two", "parameters": {"seed": 3}},
    {"name": "rand", "type": "random", "parameters": {"seed": 5}},
]


def test_filters_drop_unhealthy_draining_and_wrong_role():
    snap = ClusterSnapshot(
        (
            inst("p", "prefill"),
            inst("d1", "decode"),
            inst("d2", "decode", healthy=False),
            inst("c", "both"),
            inst("d3", "decode", draining=True),
        )
    )
    profile = build([{"pluginRef": "healthy"}, {"pluginRef": "decoders"}, {"pluginRef": "rr"}], PLUGINS)
    picks = set()
    for _ in range(4):
        decision = run_profile(profile, REQ, snap)
        picks.add(decision.instance_id)
        profile.picker.on_sent(REQ, decision.instance, "decode")
    assert picks == {"d1", "c"}


def test_no_candidate_names_the_filter():
    snap = ClusterSnapshot((inst("p", "prefill"),))
    decision = run_profile(build([{"pluginRef": "decoders"}, {"pluginRef": "best"}], PLUGINS), REQ, snap)
    assert decision.instance is None and decision.rejected_by == "decoders"


def test_weighted_scores_prefer_prefix_hits_over_a_small_load_difference():
    snap = ClusterSnapshot(
        (inst("a", running=4, waiting=0), inst("b", running=2, waiting=0), inst("c", running=3, waiting=1)),
        prefix_hit_tokens={"a": 96, "c": 32},
    )
    profile = build(
        [{"pluginRef": "prefix", "weight": 3}, {"pluginRef": "load", "weight": 1}, {"pluginRef": "best"}], PLUGINS
    )
    decision = run_profile(profile, REQ, snap)
    assert decision.instance_id == "a"
    assert decision.scores["a"] == pytest.approx(3 * 0.96 + 0.0)
    assert decision.scores["b"] == pytest.approx(0.0 + 1.0)
    assert set(decision.plugin_seconds) == {"prefix", "load", "best"}
    only_load = build([{"pluginRef": "load", "weight": 1}, {"pluginRef": "best"}], PLUGINS)
    assert run_profile(only_load, REQ, snap).instance_id == "b"


def test_least_loaded_uses_the_larger_of_metrics_and_inflight():
    snap = ClusterSnapshot((inst("a", running=0, inflight_requests=5), inst("b", running=3, waiting=1)))
    profile = build([{"pluginRef": "load", "weight": 1}, {"pluginRef": "best"}], PLUGINS)
    assert run_profile(profile, REQ, snap).instance_id == "b"


def test_kv_usage_and_power_of_two():
    snap = ClusterSnapshot((inst("a", kv_usage=0.9), inst("b", kv_usage=0.2), inst("c")))
    profile = build([{"pluginRef": "kv", "weight": 1}, {"pluginRef": "best"}], PLUGINS)
    decision = run_profile(profile, REQ, snap)
    assert decision.instance_id == "b" and decision.scores["c"] == 0.5
    loaded = ClusterSnapshot((inst("a", running=9), inst("b", running=0)))
    p2c = build([{"pluginRef": "p2c"}], PLUGINS)
    assert {run_profile(p2c, REQ, loaded).instance_id for _ in range(10)} == {"b"}


def test_scores_outside_unit_interval_are_clamped():
    class Wild(Scorer):
        type_name = "wild"

        def score(self, request, snapshot, candidates):
            return {"a": 7.0, "b": -3.0, "c": float("nan")}

    registry = PluginRegistry(load_entry_points=False)
    registry.register(Wild)
    profile = build(
        [{"pluginRef": "w", "weight": 2}, {"pluginRef": "best"}], PLUGINS + [{"name": "w", "type": "wild"}], registry
    )
    decision = run_profile(profile, REQ, ClusterSnapshot((inst("a"), inst("b"), inst("c"))))
    assert decision.scores == {"a": 2.0, "b": 0.0, "c": 0.0}


def test_round_robin_advances_only_when_told_a_request_was_sent():
    snap = ClusterSnapshot((inst("a"), inst("b"), inst("c")))
    profile = build([{"pluginRef": "rr"}], PLUGINS)
    first = run_profile(profile, REQ, snap).instance_id
    assert run_profile(profile, REQ, snap).instance_id == first  # deciding twice changes nothing
    seen = []
    for _ in range(6):
        decision = run_profile(profile, REQ, snap)
        seen.append(decision.instance_id)
        profile.picker.on_sent(REQ, decision.instance, "decode")
    assert seen == ["a", "b", "c", "a", "b", "c"]


@pytest.mark.parametrize(
    "plugins, profile, message",
    [
        ([{"name": "x", "type": "no-such"}], [{"pluginRef": "x"}], "unknown plugin type 'no-such'"),
        (PLUGINS, [{"pluginRef": "missing"}, {"pluginRef": "best"}], "'missing' is not declared"),
        (PLUGINS, [{"pluginRef": "load"}, {"pluginRef": "best"}], "needs a weight"),
        (PLUGINS, [{"pluginRef": "best", "weight": 1}], "takes no weight"),
        (PLUGINS, [{"pluginRef": "load", "weight": 1}], "exactly one picker"),
        (
            [
                {"name": "r", "type": "role-filter", "parameters": {"role": "router"}},
                {"name": "b", "type": "max-score"},
            ],
            [{"pluginRef": "r"}, {"pluginRef": "b"}],
            "parameter 'role'",
        ),
        ([{"name": "a", "type": "max-score"}, {"name": "a", "type": "random"}], [{"pluginRef": "a"}], "declared twice"),
    ],
)
def test_invalid_configurations_are_rejected_with_the_reason(plugins, profile, message):
    with pytest.raises(PluginConfigError, match=message):
        build(profile, plugins)


def test_an_instance_view_from_its_values_is_the_one_init_builds():
    values = {f.name: getattr(inst("a", running=3, kv_usage=0.5), f.name) for f in dataclasses.fields(InstanceView)}
    fast, built = InstanceView.from_values(dict(values)), InstanceView(**values)
    assert fast == built and hash(fast) == hash(built) and repr(fast) == repr(built)
    assert dataclasses.asdict(fast) == dataclasses.asdict(built) and fast.queue_depth == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.healthy = False  # type: ignore[misc]
