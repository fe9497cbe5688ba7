"""Runtime migration, drain and mid-stream failover on simulated fleets, through the real openai client.

The simulated engine's tokens are a pure function of the context (greedy here), so a request
that moved k tokens in must produce exactly the tokens of an uninterrupted run: the tests
compare text, token counts and usage with a reference request served without any move.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import openai
import pytest
from support.fleet import (
    MODEL,
    engine_flags,
    get_json,
    instance_entry,
    metric,
    start_gateway,
    write_config,
)
from support.streams import (
    PROMPT,
    TOKENS,
    Stream,
    StreamsInFlight,
    admin,
    assert_same,
    client,
    generated,
    serving,
)
from support.waiting import wait_until


def fleet(sim_factory, tmp_path, roles=("both", "both"), api="vllm", kind="sim", time_scale=1.0, **gateway):
    engines = [sim_factory(*engine_flags(role, api), time_scale=time_scale) for role in roles]
    entries = [instance_entry(e, role, kind) for e, role in zip(engines, roles)]
    migration = {"policy": "no-migration", "interval_s": 0.1, **gateway.pop("migration", {})}
    config = write_config(tmp_path / "fleet.yaml", entries, migration=migration, **gateway)
    return engines, entries, start_gateway(config)


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_a_stream_migrated_k_tokens_in_is_identical(sim_factory, tmp_path, chat):
    _, _, gateway = fleet(sim_factory, tmp_path, migration={"mechanism": "recompute"})
    try:
        reference = Stream(gateway.url, "ref", chat=chat).run()
        outcome: dict[str, Any] = {}

        def migrate() -> None:
            outcome["source"] = serving(gateway.url, "moved")
            outcome["answer"] = admin(gateway.url, "/admin/requests/moved/migrate")

        moved = Stream(gateway.url, "moved", chat=chat).run(at=20, action=migrate)
        status, answer = outcome["answer"]
        assert status == 200 and answer["migrated"] is True, answer
        assert answer["from"] == outcome["source"] and answer["to"] != outcome["source"]
        assert_same(moved, reference)
        assert (
            metric(gateway.url, "pdgate_migrations_total", reason="admin", mechanism="recompute", outcome="migrated")
            == 1
        )
        assert metric(gateway.url, "pdgate_migration_downtime_seconds_count", reason="admin") == 1
        assert metric(gateway.url, "pdgate_generation_tokens_total") == 2 * TOKENS
    finally:
        gateway.stop()


@pytest.mark.parametrize(
    "mechanism, roles, api",
    [
        ("live", ("both", "both"), "vllm"),
        ("live", ("prefill", "decode", "decode"), "sglang"),
        ("pd", ("prefill", "decode", "decode"), "vllm"),
    ],
    ids=["live-colocated", "live-sglang-pd", "pd-path"],
)
def test_live_and_pd_path_migration_are_identical(sim_factory, tmp_path, mechanism, roles, api):
    kind = "sim-sglang" if api == "sglang" else "sim"
    # an SGLang prefill binds its bootstrap port itself (port 0) and reports it
    engines, entries, gateway = fleet(
        sim_factory, tmp_path, roles=roles, api=api, kind=kind, migration={"mechanism": mechanism}
    )
    try:
        reference = Stream(gateway.url, "ref").run()
        outcome: dict[str, Any] = {}

        def migrate() -> None:
            outcome["answer"] = admin(gateway.url, "/admin/requests/moved/migrate")

        moved = Stream(gateway.url, "moved").run(at=20, action=migrate)
        status, answer = outcome["answer"]
        assert status == 200 and answer["migrated"] is True, answer
        assert_same(moved, reference)
        assert metric(gateway.url, "pdgate_migrations_total", mechanism=mechanism, outcome="migrated") == 1
        if mechanism == "live":
            source = next(e for e, entry in zip(engines, entries) if entry["id"] == answer["from"])
            target = next(e for e, entry in zip(engines, entries) if entry["id"] == answer["to"])
            out = get_json(f"{source.url}/sim/migrations")["migrations"]
            into = get_json(f"{target.url}/sim/migrations")["migrations"]
            assert [r["outcome"] for r in out if r["direction"] == "out"] == ["migrated"]
            assert [r["outcome"] for r in into if r["direction"] == "in"] == ["migrated"]
            record = out[-1]
            assert record["stages"] and 0 < record["downtime_s"]
            assert record["num_output_tokens"] >= 20
    finally:
        gateway.stop()


def test_a_stream_moved_live_twice_is_identical_and_leaves_no_kv_behind(sim_factory, tmp_path):
    engines, _, gateway = fleet(sim_factory, tmp_path, migration={"mechanism": "live"})
    try:
        reference = Stream(gateway.url, "ref").run()
        answers = []

        def two_moves() -> None:  # there and back: the second move is of a continuation
            answers.append(admin(gateway.url, "/admin/requests/twice/migrate"))
            status, first = answers[0]
            if status == 200 and first["migrated"]:  # the continuation decodes on the target before it moves again
                wait_until(
                    lambda: generated(gateway.url, "twice", on=first["to"]) > first["generated_tokens"],
                    message="the moved stream to decode on its target",
                )
            answers.append(admin(gateway.url, "/admin/requests/twice/migrate"))

        stream = Stream(gateway.url, "twice").run(at=20, action=two_moves)
        assert_same(stream, reference)
        assert [(status, a["migrated"]) for status, a in answers] == [(200, True), (200, True)], answers
        assert answers[0][1]["to"] == answers[1][1]["from"]
        assert metric(gateway.url, "pdgate_migrations_total", mechanism="live", outcome="migrated") == 2
        for engine in engines:
            state = get_json(f"{engine.url}/sim/state")
            assert not state["held_kv"] and not state["migration_reservations"], state
    finally:
        gateway.stop()


def test_sigkill_mid_stream_fails_over_with_identical_tokens(sim_factory, tmp_path):
    engines, entries, gateway = fleet(sim_factory, tmp_path)
    try:
        reference = Stream(gateway.url, "ref").run()
        by_id = {entry["id"]: engine for entry, engine in zip(entries, engines)}

        def kill() -> None:
            by_id[serving(gateway.url, "victim")].proc.send_signal(signal.SIGKILL)

        survived = Stream(gateway.url, "victim").run(at=25, action=kill)
        assert_same(survived, reference)
        assert metric(gateway.url, "pdgate_migrations_total", reason="failover", outcome="migrated") == 1
        assert metric(gateway.url, "pdgate_requests_total", status="200") == 2
    finally:
        gateway.stop()


def test_a_stalled_engine_is_failed_over(sim_factory, tmp_path):
    engines, entries, gateway = fleet(sim_factory, tmp_path, migration={"stall_timeout_s": 1.0})
    stopped = []
    try:
        reference = Stream(gateway.url, "ref").run()
        by_id = {entry["id"]: engine for entry, engine in zip(entries, engines)}

        def freeze() -> None:
            proc = by_id[serving(gateway.url, "stalled")].proc
            proc.send_signal(signal.SIGSTOP)
            stopped.append(proc)

        started = time.monotonic()
        survived = Stream(gateway.url, "stalled").run(at=15, action=freeze)
        assert_same(survived, reference)
        assert time.monotonic() - started >= 1.0
        assert metric(gateway.url, "pdgate_migrations_total", reason="failover", outcome="migrated") == 1
    finally:
        for proc in stopped:
            proc.send_signal(signal.SIGCONT)
        gateway.stop()


def test_a_failed_migration_leaves_the_request_on_its_source(sim_factory, tmp_path):
    engines, entries, gateway = fleet(
        sim_factory, tmp_path, roles=("both", "both", "both"), migration={"mechanism": "recompute"}
    )
    try:
        reference = Stream(gateway.url, "ref").run()
        outcome: dict[str, Any] = {}

        def migrate_to_a_dead_one() -> None:
            source = serving(gateway.url, "stays")
            dead = next(e for e in entries if e["id"] != source)
            next(p for p, e in zip(engines, entries) if e is dead).proc.send_signal(signal.SIGKILL)
            outcome["source"] = source
            outcome["answer"] = admin(gateway.url, "/admin/requests/stays/migrate", {"target": dead["id"]})

        stayed = Stream(gateway.url, "stays").run(at=20, action=migrate_to_a_dead_one)
        status, answer = outcome["answer"]
        assert status == 200 and answer["migrated"] is False, answer
        assert_same(stayed, reference)
        assert metric(gateway.url, "pdgate_migrations_total", reason="admin", outcome="failed") == 1
        assert metric(gateway.url, "pdgate_migrations_total", outcome="migrated") == 0
    finally:
        gateway.stop()


def test_drain_moves_every_stream_away_and_keeps_new_requests_off(sim_factory, tmp_path):
    _, _, gateway = fleet(sim_factory, tmp_path, migration={"mechanism": "recompute"})
    try:
        reference = Stream(gateway.url, "ref").run()
        streams = [Stream(gateway.url, f"drain-{i}") for i in range(6)]
        flight = StreamsInFlight(streams)
        instances = flight.running_everywhere(gateway.url)
        busiest = max(instances, key=lambda i: len(i["streams"]))
        assert busiest["streams"], "no stream to drain"
        status, drained = admin(gateway.url, f"/admin/instances/{busiest['id']}/drain?wait=true&timeout_s=20")
        assert status == 200 and drained["drained"] is True and drained["draining"] is True, drained
        assert drained["streams"] == [] and drained["running_requests"] == 0
        flight.join(30)
        assert not flight.errors
        for stream in streams:
            assert_same(stream, reference)
        assert metric(gateway.url, "pdgate_migrations_total", reason="drain", outcome="migrated") >= 1
        assert metric(gateway.url, "pdgate_instance_draining", instance=busiest["id"]) == 1
        # new requests stay off the drained instance until it is undrained
        after = Stream(gateway.url, "after", tokens=40)
        after.run(at=5, action=lambda: after.__dict__.setdefault("on", serving(gateway.url, "after")))
        assert after.__dict__["on"] != busiest["id"]
        status, undrained = admin(gateway.url, f"/admin/instances/{busiest['id']}/undrain")
        assert status == 200 and undrained["draining"] is False
    finally:
        gateway.stop()


def test_admin_api_errors_and_key(sim_factory, tmp_path):
    _, entries, gateway = fleet(
        sim_factory, tmp_path, roles=("both",), time_scale=20.0, admin={"api_key": "operator-secret"}
    )
    try:
        key = {"Authorization": "Bearer operator-secret"}
        status, body = admin(gateway.url, "/admin/instances", method="GET")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, body = admin(gateway.url, "/admin/instances", method="GET", headers=key)
        assert status == 200 and [i["id"] for i in body["data"]] == [entries[0]["id"]]
        listed = body["data"][0]
        assert {"url", "role", "healthy", "load", "draining", "streams", "running_requests"} <= set(listed)
        status, body = admin(gateway.url, "/admin/instances/nope/drain", headers=key)
        assert status == 404 and body["error"]["code"] == "instance_not_found"
        status, body = admin(gateway.url, "/admin/requests/nope/migrate", headers=key)
        assert status == 404 and body["error"]["code"] == "request_not_found"
        status, body = admin(gateway.url, f"/admin/instances/{entries[0]['id']}/drain", method="GET", headers=key)
        assert status == 405
        status, body = admin(gateway.url, "/admin/requests/x/migrate", body=None, headers=key)
        assert status == 404
    finally:
        gateway.stop()


def test_with_failover_off_a_killed_engine_ends_the_stream_with_an_error(sim_factory, tmp_path):
    engines, _, gateway = fleet(sim_factory, tmp_path, roles=("both",), migration={"failover": False, "enabled": False})
    try:
        api = client(gateway.url)
        stream = api.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        seen = 0
        with pytest.raises(openai.APIError):
            for _ in stream:
                seen += 1
                if seen == 10:
                    os.kill(engines[0].proc.pid, signal.SIGKILL)
        assert seen >= 10
        assert metric(gateway.url, "pdgate_requests_total", status="502") == 1
    finally:
        gateway.stop()
