"""A fleet that changes while the gateway serves: instances added and removed through the admin API
and by reloading the config file (SIGHUP), with real engine processes and the openai client."""

from __future__ import annotations

import re
import signal
import urllib.error
import urllib.request

import yaml
from support.fleet import MODEL, engine_flags, get_json, instance_entry, start_gateway, write_config
from support.streams import Stream, StreamsInFlight, admin, assert_same, client
from support.waiting import wait_until


def _gateway(sim_factory, tmp_path, roles=("both",), **extra):
    engines = [sim_factory(*engine_flags(role), time_scale=1.0) for role in roles]
    entries = [instance_entry(e, role, "sim") for e, role in zip(engines, roles, strict=True)]
    migration = {"policy": "no-migration", "interval_s": 0.1, "mechanism": "recompute"}
    path = write_config(tmp_path / "fleet.yaml", entries, migration=migration, **extra)
    return engines, entries, path, start_gateway(path)


def _ids(url: str) -> list[str]:
    return sorted(i["id"] for i in get_json(f"{url}/admin/instances")["data"])


def _metrics(url: str) -> str:
    return urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()


def _served_by(url: str, instance_id: str, requests: int = 8) -> bool:
    """Whether ``requests`` short completions put any prompt on ``instance_id`` (the gateway's own count)."""
    api = client(url)
    for n in range(requests):
        api.completions.create(model=MODEL, prompt=f"request {n} for the new one", max_tokens=2)
    return f'pdgate_prefix_cache_queried_tokens_total{{instance="{instance_id}"}}' in _metrics(url)


def test_an_instance_added_at_run_time_takes_traffic(sim_factory, tmp_path):
    _, entries, _, gateway = _gateway(sim_factory, tmp_path)
    try:
        extra = sim_factory(*engine_flags("both"), time_scale=1.0)
        entry = instance_entry(extra, "both", "sim")
        status, body = admin(gateway.url, "/admin/instances", entry)
        assert status == 201 and body["id"] == entry["id"] and body["role"] == "both", body
        assert _ids(gateway.url) == sorted([entries[0]["id"], entry["id"]])
        wait_until(lambda: get_json(f"{gateway.url}/admin/instances/{entry['id']}")["healthy"], timeout=5)
        # it is placed on: the least-loaded / prefix scorers spread new prompts over both
        assert wait_until(lambda: _served_by(gateway.url, entry["id"]), timeout=20)
        # the same id again, a model the gateway does not serve, bad fields, not JSON
        status, body = admin(gateway.url, "/admin/instances", entry)
        assert status == 409 and "exists already" in body["error"]["message"]
        status, body = admin(gateway.url, "/admin/instances", {**entry, "id": "x", "model": "other"})
        assert status == 400 and body["error"]["param"] == "model"
        status, body = admin(gateway.url, "/admin/instances", {"id": "y", "url": "ftp://h:1", "model": MODEL})
        assert status == 400 and body["error"]["param"] == "url"
        status, body = admin(gateway.url, "/admin/instances", {"id": "z", "model": MODEL})
        assert status == 400 and body["error"]["param"] == "url"
        status, body = admin(gateway.url, "/admin/instances", ["not", "an", "object"])
        assert status == 400
        status, body = admin(gateway.url, "/admin/instances", method="PUT")
        assert status == 405
    finally:
        gateway.stop()


def test_removing_an_instance_moves_its_streams_and_forgets_it(sim_factory, tmp_path):
    _, entries, _, gateway = _gateway(sim_factory, tmp_path, roles=("both", "both"))
    try:
        reference = Stream(gateway.url, "ref").run()
        streams = [Stream(gateway.url, f"remove-{i}") for i in range(4)]
        flight = StreamsInFlight(streams)
        leaving = max(flight.running_everywhere(gateway.url), key=lambda i: len(i["streams"]))
        assert leaving["streams"]
        status, body = admin(gateway.url, f"/admin/instances/{leaving['id']}?timeout_s=30", method="DELETE")
        assert status == 200 and body == {"id": leaving["id"], "removed": True, "url": leaving["url"]}, body
        flight.join()
        assert not flight.errors
        for stream in streams:  # every stream went on elsewhere, token for token
            assert_same(stream, reference)
        assert _ids(gateway.url) == sorted(e["id"] for e in entries if e["id"] != leaving["id"])
        # nothing of it is left in /metrics, and new requests are served by the one that stays
        assert f'instance="{leaving["id"]}"' not in _metrics(gateway.url)
        assert client(gateway.url).completions.create(model=MODEL, prompt="after", max_tokens=3).usage
        status, body = admin(gateway.url, f"/admin/instances/{leaving['id']}", method="DELETE")
        assert status == 404 and body["error"]["code"] == "instance_not_found"
    finally:
        gateway.stop()


def test_the_last_serving_path_is_not_removed_unless_forced(sim_factory, tmp_path):
    _, entries, _, gateway = _gateway(sim_factory, tmp_path)
    only = entries[0]["id"]
    try:
        status, body = admin(gateway.url, f"/admin/instances/{only}", method="DELETE")
        assert status == 409 and "without a serving path" in body["error"]["message"]
        assert _ids(gateway.url) == [only]
        status, body = admin(gateway.url, f"/admin/instances/{only}?timeout_s=x", method="DELETE")
        assert status == 400 and body["error"]["param"] == "timeout_s"
        status, body = admin(gateway.url, f"/admin/instances/{only}?force=true", method="DELETE")
        assert status == 200 and body["removed"] is True
        assert _ids(gateway.url) == []
        with urllib.request.urlopen(f"{gateway.url}/health", timeout=10) as resp:
            assert resp.status == 200  # the process lives on; /ready says it cannot serve
        try:
            urllib.request.urlopen(f"{gateway.url}/ready", timeout=10)
            raise AssertionError("/ready answered 200 with no instance")
        except urllib.error.HTTPError as err:
            assert err.code == 503
    finally:
        gateway.stop()


def test_sighup_applies_the_config_files_instances(sim_factory, tmp_path):
    engines, entries, path, gateway = _gateway(sim_factory, tmp_path, roles=("both", "both"))
    first, kept = entries[0]["id"], entries[1]["id"]
    try:
        replacement = sim_factory(*engine_flags("both"), time_scale=1.0)
        added = instance_entry(replacement, "both", "sim")
        config = yaml.safe_load(path.read_text())
        # the first leaves, the second is changed (replaced), a third arrives
        config["instances"] = [{**entries[1], "cost_group": "changed"}, added]
        config["max_body_bytes"] = 12345  # not applied without a restart (logged)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        gateway.proc.send_signal(signal.SIGHUP)
        line = gateway.reported(re.compile(r"config reloaded: (.*)")).group(1)
        assert f"added ['{added['id']}']" in line and f"removed ['{first}']" in line, line
        assert f"replaced ['{kept}']" in line and "failed {}" in line, line
        assert "not applied without a restart: ['max_body_bytes']" in line, line
        assert _ids(gateway.url) == sorted([kept, added["id"]])
        assert get_json(f"{gateway.url}/admin/instances/{kept}")["id"] == kept
        assert gateway.proc.poll() is None  # SIGHUP reloads, it does not end the process
        assert client(gateway.url).completions.create(model=MODEL, prompt="after reload", max_tokens=3).usage
        assert f'instance="{first}"' not in _metrics(gateway.url)
        # a file that cannot be read changes nothing
        path.write_text("instances: [")
        gateway.proc.send_signal(signal.SIGHUP)
        gateway.reported(re.compile(r"config reload failed, nothing changed"))
        assert client(gateway.url).completions.create(model=MODEL, prompt="still serving", max_tokens=3).usage
        assert _ids(gateway.url) == sorted([kept, added["id"]])
    finally:
        gateway.stop()


def test_an_added_instance_is_followed_by_its_kv_events(sim_factory, tmp_path):
    _, entries, _, gateway = _gateway(sim_factory, tmp_path)
    try:
        newcomer = sim_factory(*engine_flags("both", kv_events=True), time_scale=1.0)
        entry = instance_entry(newcomer, "both", "sim")
        assert "kv_events" in entry
        assert admin(gateway.url, "/admin/instances", entry)[0] == 201
        status, _ = admin(gateway.url, f"/admin/instances/{entries[0]['id']}", method="DELETE")
        assert status == 200  # every request now goes to the newcomer
        prompt = "A prompt long enough to fill several KV blocks of sixteen tokens each. " * 8
        api = client(gateway.url)
        api.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        hits = f'pdgate_prefix_cache_hit_tokens_total{{instance="{entry["id"]}"}}'

        def hit() -> bool:  # the blocks the engine stored came back as KV events: the prompt hits
            api.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
            return hits in _metrics(gateway.url)

        wait_until(hit, timeout=10, message="a prefix hit on the added instance from its KV events")
    finally:
        gateway.stop()
