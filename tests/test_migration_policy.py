"""Migration policies (Llumnix-style) on hand-built snapshots: who moves where, and who never does."""

from __future__ import annotations

import pytest

from pdgate.scheduler.framework import (
    MigrationPlan,
    MigrationPolicy,
    PluginParams,
    describe,
    plugin_kind,
)
from pdgate.scheduler.plugins.migration import LoadBalance, NoMigration
from pdgate.scheduler.registry import PluginConfigError, PluginRegistry
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RunningRequest

pytestmark = pytest.mark.unit

REGISTRY = PluginRegistry(load_entry_points=False)


def inst(id: str, role: str = "decode", model: str = "m", **kw) -> InstanceView:
    return InstanceView(id=id, url=f"http://{id}", role=role, model=model, **kw)  # type: ignore[arg-type]


def req(
    id: str,
    on: str,
    kv: int = 1000,
    remaining: float | None = 500,
    *,
    generated: int = 100,
    decoding_s: float = 1.0,
    model: str = "m",
    **kw,
) -> RunningRequest:
    """A request holding ``kv`` KV tokens, predicted to produce ``remaining`` more."""
    predicted = None if remaining is None else generated + remaining
    return RunningRequest(
        id,
        on,
        model,
        prompt_tokens=kv - generated,
        generated_tokens=generated,
        max_tokens=100_000,
        predicted_output_tokens=predicted,
        decoding_s=decoding_s,
        **kw,
    )


def policy(type_name: str = "load-balance", **params) -> MigrationPolicy:
    return REGISTRY.create_migration_policy(type_name, params)


def moves(plans: list[MigrationPlan]) -> list[tuple[str, str, str, str]]:
    return [(p.request_id, p.source, p.target, p.reason) for p in plans]


BALLAST = req("ballast", "hot", kv=6000, migratable=False)  # load on the hot instance nobody may move


# --- RunningRequest ------------------------------------------------------------------------------


def test_remaining_tokens_follows_the_prediction_and_the_max_tokens_cap():
    def r(generated: int, max_tokens: int, predicted: float | None) -> RunningRequest:
        return RunningRequest("r", "d", "m", 50, generated, max_tokens, predicted_output_tokens=predicted)

    assert r(100, 1000, None).kv_tokens == 150
    assert r(100, 1000, None).remaining_tokens == 900  # no prediction: all it may still produce
    assert r(100, 1000, 400).remaining_tokens == 300  # before the prediction: what is left of it
    assert r(100, 150, 400).remaining_tokens == 50  # never more than max_tokens allows
    assert r(400, 1000, 300).remaining_tokens == 200  # past it: half as long again as it has run
    assert r(400, 500, 300).remaining_tokens == 100  # ... still capped
    assert r(1000, 1000, None).remaining_tokens == 0


# --- balance -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "select, expected", [("most-remaining", "long"), ("least-kv", "small"), ("remaining-per-kv", "dense")]
)
def test_balance_moves_the_request_select_prefers_from_the_hot_to_the_cold_instance(select, expected):
    running = [
        BALLAST,
        req("long", "hot", kv=3000, remaining=1800),  # most remaining
        req("small", "hot", kv=400, remaining=100),  # least KV
        req("dense", "hot", kv=1000, remaining=1000),  # most remaining per KV token
        req("other", "warm", kv=2000),
    ]
    snap = ClusterSnapshot((inst("hot"), inst("warm"), inst("cold")))
    plans = policy(select=select, max_moves_per_round=1).plan(snap, running, now=10.0)
    assert moves(plans) == [(expected, "hot", "cold", "balance")]


def test_no_move_when_balanced_or_the_gap_is_small():
    snap = ClusterSnapshot((inst("a"), inst("b")))
    even = [req("a1", "a", kv=3000), req("b1", "b", kv=2900)]
    assert policy().plan(snap, even, 0.0) == []
    small_gap = [*(req(f"a{i}", "a", kv=150) for i in range(1, 5)), req("b1", "b", kv=400)]  # loads 1624 vs 656
    assert policy().plan(snap, small_gap, 0.0) == []
    assert moves(policy(min_gap_tokens=500).plan(snap, small_gap, 0.0)) == [("a1", "a", "b", "balance")]
    # a large gap, but small against the mean: 9000 vs 6300 tokens (imbalance_ratio 1.5 wants 3825)
    relative = [*(req(f"a{i}", "a", kv=644) for i in range(1, 11)), *(req(f"b{i}", "b", kv=644) for i in range(7))]
    assert policy().plan(snap, relative, 0.0) == []
    assert moves(policy(imbalance_ratio=1.1).plan(snap, relative, 0.0)) == [("a1", "a", "b", "balance")]


def test_a_move_must_leave_the_target_below_the_source():
    snap = ClusterSnapshot((inst("hot"), inst("cold")))
    assert policy().plan(snap, [req("big", "hot", kv=5000)], 0.0) == []  # it would just swap the roles
    running = [req("big", "hot", kv=5000, remaining=3000), req("mid", "hot", kv=1500, remaining=200)]
    assert moves(policy().plan(snap, running, 0.0)) == [("mid", "hot", "cold", "balance")]


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("not migratable", {"migratable": False}),
        ("too young", {"decoding_s": 0.1}),
        ("moved too often", {"migrations": 2}),
        ("nearly finished", {"remaining": 10}),
    ],
)
def test_requests_the_policy_must_not_move(kind, overrides):
    snap = ClusterSnapshot((inst("hot"), inst("cold")))
    fields = {"remaining": 500, **overrides}
    assert moves(policy().plan(snap, [BALLAST, req("x", "hot", **fields)], 0.0)) == [], kind
    assert moves(policy().plan(snap, [BALLAST, req("x", "hot")], 0.0)) == [("x", "hot", "cold", "balance")]


def test_never_moves_to_an_unhealthy_draining_prefill_other_model_or_full_instance():
    bad = (
        inst("sick", healthy=False),
        inst("leaving", draining=True),
        inst("prefiller", role="prefill"),
        inst("other", model="m2"),
        inst("full", kv_usage=0.95),
    )
    running = [BALLAST, req("x", "hot")]
    assert policy().plan(ClusterSnapshot((inst("hot"), *bad)), running, 0.0) == []
    with_ok = ClusterSnapshot((inst("hot"), *bad, inst("ok", role="both")))
    assert moves(policy().plan(with_ok, running, 0.0)) == [("x", "hot", "ok", "balance")]


def test_moves_per_round_are_capped_and_loads_re_evaluated_after_each():
    snap = ClusterSnapshot((inst("hot"), inst("a"), inst("b")))
    running = [req(f"r{i}", "hot", kv=1000) for i in range(4)]  # hot 5024 tokens, a and b empty
    assert len(policy(max_moves_per_round=1).plan(snap, running, 0.0)) == 1
    plans = policy(max_moves_per_round=3).plan(snap, running, 0.0)
    # two moves, one to each empty instance; a third would leave its target above the source
    assert [p.target for p in plans] == ["a", "b"]
    assert len({p.request_id for p in plans}) == 2 and {p.source for p in plans} == {"hot"}


def test_moves_from_the_next_most_loaded_when_the_most_loaded_has_nothing_to_move():
    snap = ClusterSnapshot((inst("hot"), inst("warm"), inst("cold")))
    running = [req("pinned", "hot", kv=8000, migratable=False), *(req(f"w{i}", "warm", kv=1500) for i in range(1, 4))]
    assert moves(policy().plan(snap, running, 0.0)) == [("w1", "warm", "cold", "balance")]


def test_planning_is_pure_and_failed_moves_are_not_retried_at_once():
    snap = ClusterSnapshot((inst("hot"), inst("cold")))
    running = [BALLAST, req("x", "hot", remaining=900), req("y", "hot", remaining=400)]
    lb = policy(max_moves_per_round=1)
    first = lb.plan(snap, running, 0.0)
    assert first == lb.plan(snap, running, 0.0) and moves(first) == [("x", "hot", "cold", "balance")]
    lb.on_migrated(first[0], False, now=1.0)
    assert moves(lb.plan(snap, running, 2.0)) == [("y", "hot", "cold", "balance")]
    assert moves(lb.plan(snap, running, 6.5)) == [("x", "hot", "cold", "balance")]  # retry_after_s (5) passed


def test_each_model_is_balanced_among_its_own_instances():
    snap = ClusterSnapshot((inst("m-hot"), inst("m-cold"), inst("n-hot", model="n"), inst("n-cold", model="n")))
    running = [
        *(req(f"m{i}", "m-hot", kv=2000) for i in range(3)),
        *(req(f"n{i}", "n-hot", kv=2000, model="n") for i in range(3)),
    ]
    plans = policy().plan(snap, running, 0.0)
    assert {(p.source, p.target) for p in plans} == {("m-hot", "m-cold"), ("n-hot", "n-cold")}
    assert len(policy(max_moves_per_round=1).plan(snap, running, 0.0)) == 1


def test_capacity_normalisation_moves_load_to_the_bigger_instance():
    # same tokens on both, but "big" is a quarter full and "small" 80 % full
    snap = ClusterSnapshot((inst("big", kv_usage=0.25), inst("small", kv_usage=0.8)))
    running = [req(f"b{i}", "big") for i in range(4)] + [req(f"s{i}", "small") for i in range(4)]
    assert policy().plan(snap, running, 0.0) == []
    plans = policy(normalize_by_capacity=True, max_moves_per_round=1).plan(snap, running, 0.0)
    assert [(p.source, p.target) for p in plans] == [("small", "big")]


# --- defrag --------------------------------------------------------------------------------------

NO_BALANCE = {"min_gap_tokens": 10**9}


def test_defrag_makes_room_on_an_instance_whose_kv_cache_is_full():
    snap = ClusterSnapshot(
        (
            inst("full", waiting=2, kv_usage=0.95),
            inst("roomy", kv_usage=0.5),
            inst("busy", kv_usage=0.3),
            inst("near-full", kv_usage=0.92),
            inst("idle-unscraped"),
        )
    )
    running = [req("f1", "full", remaining=300), req("f2", "full", remaining=800), req("b1", "busy", kv=4000)]
    lb = policy(**NO_BALANCE)
    plans = lb.plan(snap, running, 10.0)
    assert moves(plans) == [("f2", "full", "roomy", "defrag")]  # the least loaded with room; most remaining first
    no_queue = ClusterSnapshot(tuple(InstanceView(**{**vars(i), "waiting": 0}) for i in snap.instances))
    assert lb.plan(no_queue, running, 10.0) == []
    lb.on_migrated(plans[0], True, now=10.0)
    assert lb.plan(snap, running, 10.5) == []  # its scraped usage predates the move
    assert len(lb.plan(snap, running, 11.5)) == 1


def test_defrag_counts_against_the_moves_per_round():
    snap = ClusterSnapshot(
        (inst("f1", waiting=1, kv_usage=0.97), inst("f2", waiting=3, kv_usage=0.99), inst("roomy", kv_usage=0.1))
    )
    running = [req("a", "f1"), req("b", "f2")]
    assert [p.reason for p in policy(max_moves_per_round=1, **NO_BALANCE).plan(snap, running, 0.0)] == ["defrag"]
    assert {p.source for p in policy(**NO_BALANCE).plan(snap, running, 0.0)} == {"f1", "f2"}
    assert policy(defrag=False, **NO_BALANCE).plan(snap, running, 0.0) == []


# --- target_for ----------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", ["load-balance", "no-migration"])
def test_target_for_is_the_least_loaded_candidate_and_honours_exclude(type_name):
    snap = ClusterSnapshot(
        (
            inst("leaving", draining=True),
            inst("a"),
            inst("b"),
            inst("c", waiting=3),
            inst("d", inflight_prefill_tokens=9000),
            inst("sick", healthy=False),
            inst("p", role="prefill"),
            inst("other", model="m2"),
        )
    )
    me = req("me", "leaving", kv=2000)
    running = [me, req("a1", "a", kv=3000), req("b1", "b", kv=1000)]
    pol = policy(type_name)
    assert pol.target_for(me, snap, running) == "b"  # c's queue: 3 x (mean 2000 + 256) tokens; d's prefills
    assert pol.target_for(me, snap, running, exclude={"b"}) == "a"
    assert pol.target_for(me, snap, running, exclude={"a", "b", "c", "d"}) is None
    assert (
        policy(type_name).target_for(req("x", "a"), ClusterSnapshot((inst("a"), inst("p", role="prefill"))), running)
        is None
    )


def test_no_migration_plans_nothing():
    snap = ClusterSnapshot((inst("hot"), inst("cold")))
    assert policy("no-migration").plan(snap, [BALLAST, req("x", "hot")], 0.0) == []


# --- registry ------------------------------------------------------------------------------------


def test_registry_kinds_and_configuration_errors():
    assert plugin_kind(LoadBalance) == plugin_kind(NoMigration) == "MigrationPolicy"
    assert describe(LoadBalance)["kind"] == "MigrationPolicy"
    assert describe(LoadBalance)["parameters"]["imbalance_ratio"]["default"] == 1.5
    assert isinstance(policy(), LoadBalance)
    with pytest.raises(PluginConfigError, match="parameter 'imbalance_ratio'"):
        policy(imbalance_ratio=0.5)
    with pytest.raises(PluginConfigError, match="parameter 'select'"):
        policy(select="random")
    with pytest.raises(PluginConfigError, match="parameter 'bogus'"):
        policy(bogus=1)
    with pytest.raises(PluginConfigError, match="not a migration policy"):
        policy("max-score")
    with pytest.raises(PluginConfigError, match="not an admitter"):
        REGISTRY.create_admitter("load-balance", {})


def test_a_migration_policy_in_a_profile_is_rejected():
    config = {
        "plugins": [{"name": "mig", "type": "load-balance"}, {"name": "best", "type": "max-score"}],
        "profiles": {"decode": [{"pluginRef": "mig"}, {"pluginRef": "best"}]},
    }
    with pytest.raises(PluginConfigError, match="'mig' is a migration policy"):
        REGISTRY.build(config)


def test_a_third_party_migration_policy_can_be_registered():
    class StayParams(PluginParams):
        home: str

    class SendHome(MigrationPolicy):
        """Sends every request to one instance."""

        type_name = "example-send-home"
        Params = StayParams

        def plan(self, snapshot, running, now):
            home = self.params.home
            return [MigrationPlan(r.request_id, r.instance_id, home, "home") for r in running if r.instance_id != home]

        def target_for(self, request, snapshot, running, exclude=()):
            return None if self.params.home in exclude else self.params.home

    registry = PluginRegistry(load_entry_points=False)
    registry.register(SendHome)
    assert "example-send-home" in registry.types and plugin_kind(SendHome) == "MigrationPolicy"
    mine = registry.create_migration_policy("example-send-home", {"home": "h"})
    assert moves(mine.plan(ClusterSnapshot(()), [req("x", "a")], 0.0)) == [("x", "a", "h", "home")]
    mine.on_migrated(MigrationPlan("x", "a", "h", "home"), True, 0.0)  # the default hook does nothing
    with pytest.raises(PluginConfigError, match="parameter 'home'"):
        registry.create_migration_policy("example-send-home", {})
