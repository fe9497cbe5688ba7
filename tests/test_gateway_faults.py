"""Gateway behaviour around failures, limits and keys, on fleets built per test."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

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
from support.ports import reserve_port, retry_on_port_clash
from support.procs import PdgateProcess, start_pdgate
from support.waiting import wait_until


def post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err), dict(err.headers)


def completion(url: str, prompt: str = "hello", **kw) -> tuple[int, dict, dict]:
    return post(f"{url}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4, **kw})


def colocated_fleet(sim_factory, tmp_path, n: int = 2, **gateway):
    engines = [sim_factory(*engine_flags("both")) for _ in range(n)]
    entries = [instance_entry(e, "both", "sim") for e in engines]
    return engines, entries, write_config(tmp_path / "fleet.yaml", entries, **gateway)


def wait_until_unhealthy(gateway: PdgateProcess, engine: PdgateProcess) -> None:
    """Poll the gateway's metrics until it reports ``engine`` (a colocated instance) unhealthy."""
    instance = f"both-{engine.port}"
    wait_until(
        lambda: metric(gateway.url, "pdgate_instance_healthy", instance=instance) == 0,
        timeout=5,
        message=f"the gateway to report {instance} unhealthy",
    )


def test_a_dead_instance_is_avoided_and_reported(sim_factory, tmp_path):
    engines, _, config = colocated_fleet(sim_factory, tmp_path, n=2)
    gateway = start_gateway(config)
    try:
        engines[0].kill()
        ok = [completion(gateway.url, f"after the kill {i}")[0] for i in range(8)]
        assert ok == [200] * 8  # a failure before the first byte is retried on the other instance
        wait_until_unhealthy(gateway, engines[0])  # the health checks (every 0.2 s) found it dead
        engines[1].kill()
        wait_until_unhealthy(gateway, engines[1])
        status, body, headers = completion(gateway.url)
        assert status == 503 and headers.get("Retry-After") and body["error"]["type"] == "service_unavailable"
        ready = urllib.request.Request(f"{gateway.url}/ready")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(ready)
        assert info.value.code == 503
    finally:
        gateway.stop()


def test_body_too_large_is_413(sim_factory, tmp_path):
    _, _, config = colocated_fleet(sim_factory, tmp_path, n=1, max_body_bytes=4096)
    gateway = start_gateway(config)
    try:
        status, body, _ = completion(gateway.url, "x" * 10_000)
        assert status == 413 and "too large" in body["error"]["message"]
    finally:
        gateway.stop()


def test_gateway_key_is_checked_and_instance_key_is_used_upstream(sim_factory, tmp_path):
    engine = sim_factory(*engine_flags("both", extra=("--api-key", "engine-secret")))
    entries = [instance_entry(engine, "both", "sim", api_key="engine-secret")]
    config = write_config(tmp_path / "keys.yaml", entries, api_keys=["gw-key"])
    gateway = start_gateway(config)
    try:
        assert completion(gateway.url)[0] == 401
        assert completion(gateway.url, headers=None)[0] == 401
        status, body, _ = post(
            f"{gateway.url}/v1/completions",
            {"model": MODEL, "prompt": "hi", "max_tokens": 2},
            {"Authorization": "Bearer gw-key"},
        )
        assert status == 200, body
        # the engine rejects the gateway's key: it was not forwarded, the instance's own key was
        assert completion(engine.url, headers=None)[0] == 401
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="gw-key", max_retries=0)
        assert (
            client.completions.create(
                model=MODEL, prompt="hi", max_tokens=2, extra_body={"ignore_eos": True}
            ).usage.completion_tokens
            == 2
        )
    finally:
        gateway.stop()


def test_invalid_config_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{name: m}]\ninstances: [{url: 'ftp://x', model: m}]\n")
    proc = start_pdgate_expect_exit("serve", "--config", str(bad))
    assert proc.returncode == 2 and "instances.0.url" in proc.stderr
    unknown = tmp_path / "plugin.yaml"
    unknown.write_text(
        "models: [{name: m}]\ninstances: [{url: 'http://127.0.0.1:1', model: m}]\n"
        "scheduling: {plugins: [{name: x, type: nope}], profiles: {colocated: [{pluginRef: x}]}}\n"
    )
    proc = start_pdgate_expect_exit("serve", "--config", str(unknown))
    assert proc.returncode == 2 and "unknown plugin type 'nope'" in proc.stderr


def start_pdgate_expect_exit(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pdgate.cli", *args], capture_output=True, text=True, timeout=30)


def start_up(tmp_path) -> tuple[PdgateProcess, list[int], list[int]]:
    """``pdgate up`` over three simulated engines it starts: the process, the engines' ports and pids."""

    def start() -> tuple[PdgateProcess, list[int]]:
        # `pdgate up` starts each engine on the port of its URL, so the ports are chosen first
        ports = [reserve_port() for _ in range(3)]
        config = tmp_path / "up.yaml"
        config.write_text(
            f"""
host: 127.0.0.1
port: 0
models: [{{name: {MODEL}}}]
instances:
  - {{url: "http://127.0.0.1:{ports[0]}", kind: sim, role: prefill, model: {MODEL}, launch: {{time_scale: 20}}}}
  - {{url: "http://127.0.0.1:{ports[1]}", kind: sim, role: decode, model: {MODEL}, launch: {{time_scale: 20}}}}
  - {{url: "http://127.0.0.1:{ports[2]}", kind: sim, role: decode, model: {MODEL}, launch: {{time_scale: 20, args: {{max_num_seqs: 64}}}}}}
"""
        )
        return start_pdgate("up", "--config", str(config), timeout=60), ports

    up, ports = retry_on_port_clash(start)
    pids = [int(line.split("(pid ")[1].rstrip(")\n")) for line in up.output if "(pid " in line]
    return up, ports, pids


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie nobody reaped yet has ended too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def test_pdgate_up_starts_the_fleet_and_stops_every_child(tmp_path):
    up, ports, pids = start_up(tmp_path)
    try:
        assert len(pids) == 3
        status, body, _ = completion(up.url, "through pdgate up", ignore_eos=True)  # exactly 4: no early EOS draw
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        assert get_json(f"http://127.0.0.1:{ports[2]}/sim/state")["role"] == "decode"
    finally:
        assert up.stop(signal.SIGTERM) == 0
    for pid in pids:
        assert gone(pid)


def test_the_engines_of_a_killed_pdgate_up_die_with_it(tmp_path):
    """SIGKILL gives ``pdgate up`` no chance to stop its engines: the kernel does (PR_SET_PDEATHSIG)."""
    up, _, pids = start_up(tmp_path)
    assert len(pids) == 3 and not any(gone(pid) for pid in pids)
    up.stop(signal.SIGKILL)
    wait_until(lambda: all(gone(pid) for pid in pids), timeout=15, message="the orphaned engines to stop")


def test_sglang_dead_prefill_leg_is_abandoned_and_retried(sim_factory, tmp_path):
    # each prefill binds its bootstrap server on a free port and reports it (engine_flags, instance_entry)
    prefills = [sim_factory(*engine_flags("prefill", "sglang")) for _ in range(2)]
    decode = sim_factory(*engine_flags("decode", "sglang"))
    entries = [instance_entry(p, "prefill", "sim-sglang") for p in prefills]
    assert len({e["bootstrap_port"] for e in entries}) == 2
    entries.append(instance_entry(decode, "decode", "sim-sglang"))
    # no active health checks during the test: the failure must be found on the request path
    gateway = start_gateway(
        write_config(tmp_path / "sg.yaml", entries, health={"interval_s": 60, "failure_threshold": 1})
    )
    try:
        prefills[0].kill()
        started = time.monotonic()
        results = [completion(gateway.url, f"sglang {i}")[0] for i in range(4)]
        assert results == [200] * 4
        assert time.monotonic() - started < 10  # not stuck waiting for a bootstrap room that never fills
        assert get_json(decode.url + "/sim/state")["num_running"] == 0
    finally:
        gateway.stop()


def test_approximate_prefix_index_routes_shared_prefixes_to_the_instance_holding_them(sim_factory, tmp_path):
    _, _, config = colocated_fleet(sim_factory, tmp_path, n=3)  # no KV events: the gateway remembers what it sent
    gateway = start_gateway(config)
    try:
        system = "Answer as the travel agency's assistant; obey the booking rules listed here. " * 10
        cached = []
        for i in range(6):
            status, body, _ = completion(gateway.url, system + f"Trip {i}?")
            assert status == 200
            cached.append((body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0))
        assert cached[0] == 0 and all(c >= 0.8 * body["usage"]["prompt_tokens"] for c in cached[1:])
    finally:
        gateway.stop()


def test_circuit_breaker_opens_after_failures_and_half_opens_after_cooldown():
    from pdgate.gateway.instance_state import CircuitBreaker

    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=5)
    breaker.record_failure(0.0)
    assert breaker.allows(0.1) and breaker.state == "closed"
    breaker.record_failure(1.0)
    assert not breaker.allows(2.0) and breaker.state == "open"
    assert breaker.allows(6.0)  # cooldown over: one trial
    breaker.on_send(6.0)
    assert not breaker.allows(6.1) and breaker.state == "half-open"
    breaker.record_success()
    assert breaker.allows(6.2) and breaker.state == "closed"
