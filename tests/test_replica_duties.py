"""Gateway replicas as one gateway: a leader for the exactly-once duties, moves of another
replica's streams, shared circuit states, and a NATS that goes away (real NATS server, separate
gateway processes over the same simulated engines, the openai client)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.fleet import MODEL, engine_flags, get_json, instance_entry, start_gateway, write_config
from support.procs import PdgateProcess
from support.streams import Stream, StreamsInFlight, admin, assert_same, client, serving
from support.waiting import wait_until

pytestmark = pytest.mark.slow

FAST_SHARING = {"load_interval_s": 0.05, "load_expiry_s": 2.0, "leader_lease_s": 1.0}


def _ready(gateway: PdgateProcess) -> dict[str, Any]:
    return get_json(f"{gateway.url}/ready")


def _agreed_leader(replicas: list[PdgateProcess]) -> str | None:
    """The leader every replica names, when they all name the same one of them."""
    views = [_ready(r) for r in replicas]
    leaders = {v.get("leader") for v in views}
    names = {v["replica"] for v in views}
    if len(leaders) == 1 and (leader := leaders.pop()) in names:
        return str(leader)
    return None


@dataclass
class Replicas:
    engines: list[PdgateProcess]
    entries: list[dict[str, Any]]
    config: Path
    gateways: list[PdgateProcess]


@contextlib.contextmanager
def _replicas(
    sim_factory, tmp_path: Path, nats_url: str, *, count: int, engines: int = 2, time_scale: float = 1.0, **gateway: Any
) -> Iterator[Replicas]:
    """``count`` replicas sharing through ``nats_url`` over ``engines`` simulated ``both`` engines,
    all in sync when it yields; every replica (also one a test adds) stopped at the end."""
    sims = [sim_factory(*engine_flags("both"), time_scale=time_scale) for _ in range(engines)]
    entries = [instance_entry(e, "both", "sim") for e in sims]
    sharing = {"nats_url": nats_url, **FAST_SHARING}
    config = write_config(tmp_path / "gateway.yaml", entries, sharing=sharing, **gateway)
    started = Replicas(sims, entries, config, [])
    try:
        for _ in range(count):
            started.gateways.append(start_gateway(config))
        wait_until(lambda: all(_ready(r)["sync"] == "ok" for r in started.gateways), 10, message="replicas in sync")
        yield started
    finally:
        for replica in started.gateways:
            replica.stop()


def test_a_leader_is_elected_killed_and_replaced_and_its_cost_model_is_served_by_all(sim_factory, tmp_path, nats):
    refits = {"refit_interval_s": 1.0, "min_new_samples": 6}
    with _replicas(sim_factory, tmp_path, nats.url, count=3, engines=1, time_scale=20.0, cost_model=refits) as rs:
        replicas = rs.gateways
        leader = wait_until(lambda: _agreed_leader(replicas), 15, message="one leader named by all")
        # requests through every replica: the leader refits on all their records, and every
        # replica serves the version it published
        for i in range(12):
            client(replicas[i % 3].url).completions.create(model=MODEL, prompt=f"record {i}", max_tokens=4)

        def one_refitted_version() -> str | None:
            versions = {get_json(f"{r.url}/cost-model")["version"] for r in replicas}
            version = versions.pop() if len(versions) == 1 else None
            return version if version is not None and version.startswith(leader) else None

        version = wait_until(one_refitted_version, 30, message="the leader's cost model on every replica")
        leading = next(r for r in replicas if _ready(r)["replica"] == leader)
        wait_until(lambda: get_json(f"{leading.url}/cost-model")["records"] >= 12, 10, message="all the records")
        # the leader dies: another takes over within a few lease periods
        dead = next(r for r in replicas if _ready(r)["replica"] == leader)
        dead.stop(signal.SIGKILL)
        survivors = [r for r in replicas if r is not dead]
        successor = wait_until(lambda: _agreed_leader(survivors), 15, message="a new leader")
        assert successor != leader
        assert {get_json(f"{r.url}/cost-model")["version"] for r in survivors} == {version}


def test_any_replica_moves_and_shows_another_replicas_stream(sim_factory, tmp_path, nats):
    with _replicas(sim_factory, tmp_path, nats.url, count=2) as rs:
        (a, b), entries = rs.gateways, rs.entries
        reference = Stream(a.url, "reference", tokens=120).run()
        moved = Stream(b.url, "held-by-b", tokens=120)
        answers: list[tuple[int, Any]] = []

        def move_from_a() -> None:
            source = serving(a.url, moved.request_id)  # A lists B's stream...
            view = get_json(f"{a.url}/admin/instances/{source}")
            owner = next(s["replica"] for s in view["streams"] if s["request_id"] == moved.request_id)
            assert owner == _ready(b)["replica"]
            target = next(e["id"] for e in entries if e["id"] != source)  # ...and moves it
            answers.append(admin(a.url, f"/admin/requests/{moved.request_id}/migrate", {"target": target}))

        def when_a_sees_it() -> None:
            wait_until(lambda: _lists(a, moved.request_id), 10, message="replica A to list B's stream")
            move_from_a()

        moved.run(at=20, action=when_a_sees_it)
        status, body = answers[0]
        assert status == 200 and body["migrated"] is True and body["replica"] == _ready(b)["replica"]
        assert_same(moved, reference)
        # an unknown request is still a 404 on any replica
        assert admin(a.url, "/admin/requests/nobody/migrate")[0] == 404


def _lists(gateway: PdgateProcess, request_id: str) -> bool:
    return any(
        s["request_id"] == request_id for i in get_json(f"{gateway.url}/admin/instances")["data"] for s in i["streams"]
    )


def test_an_instance_one_replica_finds_dead_is_avoided_by_all(sim_factory, tmp_path, nats):
    alive, doomed = (sim_factory(*engine_flags("both"), time_scale=20.0) for _ in range(2))
    entries = [instance_entry(alive, "both", "sim"), instance_entry(doomed, "both", "sim")]
    sharing = {"nats_url": nats.url, **FAST_SHARING}
    watchful = write_config(tmp_path / "a.yaml", entries, sharing=sharing)
    # B checks health once a minute: on its own it would go on sending to the dead instance
    slow = {"interval_s": 60.0, "timeout_s": 1.0, "failure_threshold": 3, "cooldown_s": 30}
    trusting = write_config(tmp_path / "b.yaml", entries, sharing=sharing, health=slow)
    a, b = start_gateway(watchful), start_gateway(trusting)
    try:
        wait_until(lambda: _ready(a)["sync"] == _ready(b)["sync"] == "ok", 10, message="both in sync")
        doomed.stop(signal.SIGKILL)
        dead_id = entries[1]["id"]

        def circuit(gateway: PdgateProcess) -> str:
            return str(get_json(f"{gateway.url}/admin/instances/{dead_id}")["circuit"])

        wait_until(lambda: circuit(a) == "open", 10, message="replica A to open the circuit")
        wait_until(lambda: circuit(b) == "open", 2, message="replica B to follow within a second or so")
        for i in range(6):  # B sends nothing to the dead instance
            assert client(b.url).completions.create(model=MODEL, prompt=f"after {i}", max_tokens=2).usage
    finally:
        a.stop()
        b.stop()


def test_replicas_serve_without_nats_and_converge_when_it_returns(sim_factory, tmp_path, nats):
    with _replicas(sim_factory, tmp_path, nats.url, count=2, time_scale=20.0) as rs:
        (a, b), entries = rs.gateways, rs.entries
        streams = StreamsInFlight([Stream(r.url, f"through-{i}", tokens=60) for i, r in enumerate([a, b] * 2)])
        nats.stop()
        wait_until(lambda: _ready(a)["sync"] == "degraded", 10, message="A to report the loss")
        wait_until(lambda: "pdgate_sharing_sync 0.0" in _metrics(a), 5, message="the metric to say so")
        for i in range(4):  # nothing about a request depends on NATS
            assert client([a, b][i % 2].url).completions.create(model=MODEL, prompt="alone", max_tokens=2).usage
        streams.join()
        assert not streams.errors
        # a drain asked of A while NATS is away reaches B once it is back
        assert admin(a.url, f"/admin/instances/{entries[0]['id']}/drain")[0] in (200, 202)
        nats.start()
        wait_until(lambda: _ready(a)["sync"] == _ready(b)["sync"] == "ok", 20, message="both in sync again")
        wait_until(
            lambda: get_json(f"{b.url}/admin/instances/{entries[0]['id']}")["draining"],
            10,
            message="A's drain to reach B",
        )


def _metrics(gateway: PdgateProcess) -> str:
    import urllib.request

    return urllib.request.urlopen(f"{gateway.url}/metrics", timeout=10).read().decode()


def _cluster_counts(gateway: PdgateProcess) -> dict[str, int]:
    return {i["id"]: i["cluster_running_requests"] for i in get_json(f"{gateway.url}/admin/instances")["data"]}


def test_three_replicas_count_the_whole_load_and_place_it_evenly(sim_factory, tmp_path, nats):
    with _replicas(sim_factory, tmp_path, nats.url, count=3) as rs:
        replicas = rs.gateways
        streams: list[Stream] = []
        flights: list[StreamsInFlight] = []
        for i in range(12):  # a client that spreads its requests over the replicas, one after another
            prompt = f"{i} {i * 7919} distinct prompts, so that prefix affinity does not decide"
            stream = Stream(replicas[i % 3].url, f"spread-{i}", tokens=300, prompt=prompt)
            streams.append(stream)
            flights.append(StreamsInFlight([stream]))
            wait_until(lambda n=i + 1: sum(_cluster_counts(replicas[0]).values()) >= n, 5, message="the count")

        def converged() -> dict[str, int] | None:
            views = [_cluster_counts(r) for r in replicas]
            return views[0] if all(v == views[0] for v in views) and sum(views[0].values()) == 12 else None

        counts = wait_until(converged, 10, message="every replica to count the same 12 streams")
        assert max(counts.values()) - min(counts.values()) <= 2, counts  # no pile-up on one instance
        for flight in flights:
            flight.join()
            assert not flight.errors
        assert all(s.events == 300 for s in streams)


def test_a_replica_killed_under_load_costs_only_its_own_clients(sim_factory, tmp_path, nats):
    with _replicas(sim_factory, tmp_path, nats.url, count=3, engines=1) as rs:
        replicas, engine, entry = rs.gateways, rs.engines[0], rs.entries[0]
        victim, *survivors = replicas
        lost = StreamsInFlight([Stream(victim.url, f"lost-{i}", tokens=2000) for i in range(3)])
        kept = StreamsInFlight([Stream(r.url, f"kept-{i}", tokens=150) for i, r in enumerate(survivors * 2)])
        wait_until(lambda: _cluster_counts(survivors[0])[entry["id"]] == 7, 10, message="all 7 streams counted")
        victim.stop(signal.SIGKILL)
        kept.join()
        assert not kept.errors and all(s.events == 150 for s in kept.streams)
        lost.join()
        assert len(lost.errors) == 3  # only the clients the dead replica held
        # its engine requests were aborted (its connections closed), and its leases expire elsewhere
        wait_until(lambda: get_json(f"{engine.url}/sim/state")["num_running"] == 0, 10, message="the engine to abort")
        wait_until(lambda: _cluster_counts(survivors[0])[entry["id"]] == 0, 10, message="the dead replica's leases")
        # a replica started in its place catches up and serves
        replicas.append(start_gateway(rs.config))
        wait_until(lambda: _agreed_leader([*survivors, replicas[-1]]), 15, message="one leader among all three")
        assert client(replicas[-1].url).completions.create(model=MODEL, prompt="back", max_tokens=2).usage


def test_a_drain_on_one_replica_moves_the_streams_another_serves(sim_factory, tmp_path, nats):
    with _replicas(sim_factory, tmp_path, nats.url, count=2) as rs:
        a, b = rs.gateways
        references = [Stream(a.url, f"reference-{i}", tokens=200).run() for i in range(2)]
        flight = StreamsInFlight([Stream(b.url, f"on-b-{i}", tokens=200) for i in range(2)])
        wait_until(lambda: all(_lists(a, s.request_id) for s in flight.streams), 10, message="A to list B's streams")
        source = serving(a.url, flight.streams[0].request_id)
        status, body = admin(a.url, f"/admin/instances/{source}/drain?wait=true&timeout_s=30")
        assert status == 200 and body["drained"] is True  # B's streams moved off, as A waited for
        flight.join()
        assert not flight.errors
        for moved, reference in zip(flight.streams, references, strict=True):
            assert_same(moved, reference)


def test_replicas_agree_on_who_holds_a_prefix_without_kv_events(sim_factory, tmp_path, nats):
    with _replicas(sim_factory, tmp_path, nats.url, count=2, time_scale=20.0) as rs:  # no KV events
        a, b = rs.gateways

        def blocks(gateway: PdgateProcess) -> dict[str, int]:
            return {
                i["id"]: i["prefix_index"]["blocks"]
                for i in get_json(f"{gateway.url}/admin/instances")["data"]
                if i["prefix_index"]["index"] == "approximate"
            }

        assert sum(blocks(b).values()) == 0
        long_prompt = " ".join(f"word{i}" for i in range(200))
        client(a.url).completions.create(model=MODEL, prompt=long_prompt, max_tokens=2)
        held = blocks(a)
        assert sum(held.values()) > 0
        wait_until(lambda: blocks(b) == held, 5, message="replica B to learn what A sent where")
