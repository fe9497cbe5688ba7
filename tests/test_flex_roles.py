"""Flex instances (issue 17): engines that take either leg of a split request, and serve in the role
the gateway gives them while they run. Real sim processes (vLLM API, which like vLLM's kv_both
takes a prefill or a decode leg as each request's kv_transfer_params say), the openai client,
the admin API and the access log."""

from __future__ import annotations

import json
import math
import re
import threading

import pytest
from support.fleet import MODEL, engine_flags, get_json, instance_entry, write_config
from support.procs import start_pdgate
from support.streams import Stream, StreamsInFlight, admin, assert_same, client
from support.waiting import wait_until


def _access(proc) -> list[dict]:
    return [
        r
        for line in list(proc.output)
        if line.startswith('{"ts"')
        for r in [json.loads(line)]
        if r["logger"] == "pdgate.access"
    ]


def _placements(proc, first: int, count: int) -> list[tuple[str | None, str]]:
    """(prefill, decode) of the requests ``first`` to ``first + count`` the gateway logged (waits for them)."""
    wait_until(lambda: len(_access(proc)) >= first + count, message=f"{first + count} access-log lines")
    return [(r["prefill"], r["decode"]) for r in _access(proc)[first : first + count]]


def _ask(url: str, n: int) -> None:
    api = client(url)
    for i in range(n):
        assert (
            api.completions.create(
                model=MODEL, prompt=f"flex request {i}", max_tokens=4, extra_body={"ignore_eos": True}
            ).usage.completion_tokens
            == 4
        )


@pytest.fixture
def flex_pair(sim_factory, tmp_path):
    """Two sim engines as flex instances, the first serving prefill, the second decode."""
    engines = [sim_factory(*engine_flags("both"), time_scale=1.0) for _ in range(2)]
    entries = [
        {**instance_entry(engine, "flex", "sim"), "serving": serving}
        for engine, serving in zip(engines, ("prefill", "decode"), strict=True)
    ]
    migration = {"policy": "no-migration", "interval_s": 0.1, "mechanism": "recompute"}
    path = write_config(tmp_path / "flex.yaml", entries, migration=migration)
    gateway = start_pdgate("serve", "--config", str(path), "--log-format", "json", "--access-log")
    yield gateway, entries[0]["id"], entries[1]["id"]
    gateway.stop()


def test_flex_instances_split_requests_in_the_roles_they_are_given(flex_pair):
    gateway, a, b = flex_pair
    url = gateway.url
    view = get_json(f"{url}/admin/instances/{a}")
    assert view["role"] == "flex" and view["serving"] == "prefill"
    plan = get_json(f"{url}/admin/plan")
    assert plan["enabled"] is False and plan["data"] == []
    assert plan["scaling"] == {"enabled": False, "actuator": None, "data": []}
    _ask(url, 3)
    assert _placements(gateway, 0, 3) == [(a, b)] * 3
    # a change that leaves the model without a decode (or prefill) path is refused, nothing changes
    status, body = admin(url, f"/admin/instances/{b}/role", {"role": "prefill"})
    assert status == 409 and "without a decode path" in body["error"]["message"], body
    status, body = admin(url, f"/admin/instances/{a}/role", {"role": "decode"})
    assert status == 409 and "without a prefill path" in body["error"]["message"], body
    status, body = admin(url, f"/admin/instances/{a}/role", {"role": "sideways"})
    assert status == 400 and body["error"]["param"] == "role"
    status, body = admin(url, f"/admin/instances/{a}/role", ["decode"])
    assert status == 400
    status, body = admin(url, "/admin/instances/nobody/role", {"role": "decode"})
    assert status == 404
    # swap them through a colocated step: b both, a decode, b prefill
    for instance, role in ((b, "both"), (a, "decode"), (b, "prefill")):
        status, body = admin(url, f"/admin/instances/{instance}/role", {"role": role})
        assert status == 200 and body["serving"] == role, body
    _ask(url, 3)
    assert _placements(gateway, 3, 3) == [(b, a)] * 3
    metrics = gateway_metrics(url)
    assert f'pdgate_instance_serving_role{{instance="{a}",role="decode"}} 1.0' in metrics
    assert f'pdgate_instance_serving_role{{instance="{a}",role="prefill"}} 0.0' in metrics
    assert f'pdgate_role_changes_total{{instance="{a}",reason="admin",role="decode"}} 1.0' in metrics


def test_an_instance_leaving_the_decode_role_hands_its_streams_on_token_for_token(flex_pair):
    gateway, a, b = flex_pair
    url = gateway.url
    reference = Stream(url, "flex-ref").run()
    for instance, role in ((a, "both"), (b, "both")):  # both may decode now
        assert admin(url, f"/admin/instances/{instance}/role", {"role": role})[0] == 200
    streams = [Stream(url, f"flex-{i}") for i in range(4)]
    flight = StreamsInFlight(streams)
    busiest = max(flight.running_everywhere(url), key=lambda i: len(i["streams"]))
    other = b if busiest["id"] == a else a
    status, body = admin(url, f"/admin/instances/{busiest['id']}/role", {"role": "prefill"})
    assert status == 200 and body["serving"] == "prefill", body
    flight.join()
    assert not flight.errors, flight.errors
    for stream in streams:
        assert_same(stream, reference)
    moved = re.findall(r'pdgate_migrations_total\{[^}]*outcome="migrated",reason="role"\} (\S+)', gateway_metrics(url))
    assert moved and float(moved[0]) == len(busiest["streams"]), moved  # each moved away, none just ran out
    assert get_json(f"{url}/admin/instances/{other}")["serving"] == "both"


def gateway_metrics(url: str) -> str:
    import urllib.request

    return urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()


def test_the_role_balancer_moves_a_flex_decoder_to_prefill_under_prefill_heavy_load(sim_factory, tmp_path):
    engines = [sim_factory(*engine_flags("both"), time_scale=1.0) for _ in range(3)]
    entries = [
        {**instance_entry(engine, "flex", "sim"), "serving": serving}
        for engine, serving in zip(engines, ("prefill", "decode", "decode"), strict=True)
    ]
    balancer = {"enabled": True, "interval_s": 0.3, "min_dwell_s": 0.0, "hysteresis": 0.1}
    scaling = {"enabled": True, "interval_s": 0.3, "scale_down_window_s": 0, "headroom": 0.0}
    path = write_config(tmp_path / "balanced.yaml", entries, role_balancer=balancer, scaling=scaling)
    gateway = start_pdgate("serve", "--config", str(path))
    stop = threading.Event()

    def long_prompts(n: int) -> None:  # long prompts, two tokens each: the prefill pool is the busy one
        api = client(gateway.url)
        while not stop.is_set():
            api.completions.create(model=MODEL, prompt=f"{n} " + "prefill heavy words " * 400, max_tokens=2)

    senders = [threading.Thread(target=long_prompts, args=(n,)) for n in range(6)]
    try:
        for sender in senders:
            sender.start()

        def serving_prefill() -> int:
            return sum(i["serving"] == "prefill" for i in get_json(f"{gateway.url}/admin/instances")["data"])

        wait_until(lambda: serving_prefill() >= 2, timeout=30, message="a decoder moved to prefill")
        metrics = gateway_metrics(gateway.url)
        assert 'reason="balancer",role="prefill"} 1.0' in metrics
        assert f'pdgate_role_plan_instances{{model="{MODEL}",role="prefill"}}' in metrics
        assert serving_prefill() < 3  # every pool keeps an instance
        (plan,) = get_json(f"{gateway.url}/admin/plan")["data"]
        assert plan["model"] == MODEL and plan["prefill"] >= 2 and plan["decode"] >= 1, plan
        assert plan["forecast"]["prefill_work_s_per_s"] > 0 and "prefill" in plan["reason"], plan

        # the scaling plan (recommend only) sees the same load: more than one prefill instance
        def sized() -> dict:
            wanted = get_json(f"{gateway.url}/admin/plan")["scaling"]
            assert wanted["enabled"] and wanted["actuator"] == "none", wanted
            return wanted["data"][0] if wanted["data"] else {}

        wait_until(lambda: sized().get("forecast", {}).get("prefill_work_s_per_s", 0) > 0, timeout=20, message=sized)
        now = sized()
        work = now["forecast"]["prefill_work_s_per_s"]  # no TTFT target: prefill instances busy up to 85 %
        assert now["instances"]["prefill"] == max(1, math.ceil(work / 0.85)), now
        assert now["current"]["flex"] == 3 and now["actions"] == [] and "prefill busy at most 85%" in now["reason"]
        assert f'pdgate_plan_instances{{model="{MODEL}",role="prefill"}}' in gateway_metrics(gateway.url)
    finally:
        stop.set()
        for sender in senders:
            sender.join(60)
        gateway.stop()
