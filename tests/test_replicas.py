"""Gateway replicas that share the fleet's changes, drains and roles through a real NATS server (JetStream
key-value), as separate processes over the same simulated engines."""

from __future__ import annotations

import signal
import threading
import urllib.request

import openai
from support.fleet import MODEL, engine_flags, get_json, instance_entry, start_gateway, write_config
from support.procs import PdgateProcess
from support.streams import Stream, admin, client
from support.waiting import wait_until


def _ids(gateway: PdgateProcess) -> list[str]:
    return sorted(i["id"] for i in get_json(f"{gateway.url}/admin/instances")["data"])


def _draining(gateway: PdgateProcess, instance_id: str) -> bool:
    return bool(get_json(f"{gateway.url}/admin/instances/{instance_id}")["draining"])


def _serving(gateway: PdgateProcess, instance_id: str) -> str:
    return str(get_json(f"{gateway.url}/admin/instances/{instance_id}")["serving"])


def test_replicas_share_fleet_changes_and_drains(sim_factory, tmp_path, nats):
    first = sim_factory(*engine_flags("both"), time_scale=1.0)
    entries = [instance_entry(first, "both", "sim")]
    config = write_config(tmp_path / "gateway.yaml", entries, sharing={"nats_url": nats.url})
    replicas = [start_gateway(config) for _ in range(2)]
    try:
        a, b = replicas
        # an instance added on replica A is served by B too, and placed on there
        second = sim_factory(*engine_flags("both"), time_scale=1.0)
        added = instance_entry(second, "flex", "sim")
        assert admin(a.url, "/admin/instances", added)[0] == 201
        both = sorted([entries[0]["id"], added["id"]])
        wait_until(lambda: _ids(b) == both, timeout=10, message="replica B to serve the added instance")
        assert client(b.url).completions.create(model=MODEL, prompt="to the new one", max_tokens=2).usage
        # a drain on A applies on B; an undrain on B applies on A
        status, _ = admin(a.url, f"/admin/instances/{added['id']}/drain")
        assert status in (200, 202)
        wait_until(lambda: _draining(b, added["id"]), timeout=10, message="the drain to reach replica B")
        assert admin(b.url, f"/admin/instances/{added['id']}/undrain")[0] == 200
        wait_until(lambda: not _draining(a, added["id"]), timeout=10, message="the undrain to reach replica A")
        # a flex instance's role set on A is the role it serves in on B
        assert admin(a.url, f"/admin/instances/{added['id']}/role", {"role": "decode"})[0] == 200
        wait_until(lambda: _serving(b, added["id"]) == "decode", timeout=10, message="the role to reach replica B")
        # a replica that starts later catches up with the changes made before it
        c = start_gateway(config)
        replicas.append(c)
        wait_until(lambda: _ids(c) == both, timeout=10, message="a new replica to catch up")
        wait_until(
            lambda: _serving(c, added["id"]) == "decode", timeout=10, message="a new replica to catch up on roles"
        )
        # a removal on B is applied on A and C
        status, body = admin(b.url, f"/admin/instances/{added['id']}", method="DELETE")
        assert status == 200 and body["removed"] is True
        for replica in (a, c):
            wait_until(lambda r=replica: _ids(r) == [entries[0]["id"]], timeout=15, message="the removal to spread")
        assert client(a.url).completions.create(model=MODEL, prompt="still served", max_tokens=2).usage
    finally:
        for replica in replicas:
            replica.stop()


def test_a_replica_starts_and_serves_without_nats(sim_factory, tmp_path):
    """Nothing about a request depends on NATS: a replica whose server is not there serves on its own view."""
    engine = sim_factory(*engine_flags("both"), time_scale=1.0)
    config = write_config(
        tmp_path / "gateway.yaml", [instance_entry(engine, "both", "sim")], sharing={"nats_url": "nats://127.0.0.1:9"}
    )
    gateway = start_gateway(config)
    try:
        assert client(gateway.url).completions.create(model=MODEL, prompt="alone", max_tokens=2).usage
        other = sim_factory(*engine_flags("both"), time_scale=1.0)
        assert admin(gateway.url, "/admin/instances", instance_entry(other, "both", "sim"))[0] == 201
        assert len(_ids(gateway)) == 2
    finally:
        gateway.stop()


def test_every_replica_counts_the_load_the_others_sent(sim_factory, tmp_path, nats):
    engine = sim_factory(*engine_flags("both"), time_scale=1.0)
    entry = instance_entry(engine, "both", "sim")
    sharing = {"nats_url": nats.url, "load_interval_s": 0.05, "load_expiry_s": 2.0}
    config = write_config(tmp_path / "gateway.yaml", [entry], sharing=sharing)
    a, b = start_gateway(config), start_gateway(config)
    try:

        def seen_on_b() -> tuple[int, int]:
            view = get_json(f"{b.url}/admin/instances/{entry['id']}")
            return view["running_requests"], view["cluster_running_requests"]

        streams = [Stream(a.url, f"load-{i}", tokens=400) for i in range(3)]
        cut: list[str] = []

        def run(stream: Stream) -> None:
            try:
                stream.run()
            except openai.APIConnectionError:  # its replica is killed below: only its clients lose out
                cut.append(stream.request_id)

        threads = [threading.Thread(target=run, args=(s,)) for s in streams]
        for thread in threads:
            thread.start()
        # replica B has nothing in flight itself, but counts what A sent
        wait_until(lambda: seen_on_b() == (0, 3), timeout=10, message="replica B to count A's 3 streams")
        assert "pdgate_sharing_replicas 1.0" in urllib.request.urlopen(f"{b.url}/metrics", timeout=10).read().decode()
        a.stop(signal.SIGKILL)  # a replica that dies: the others forget its load after load_expiry_s
        wait_until(lambda: seen_on_b() == (0, 0), timeout=10, message="A's load to expire on B")
        for thread in threads:
            thread.join(30)
        assert sorted(cut) == sorted(s.request_id for s in streams)
        assert client(b.url).completions.create(model=MODEL, prompt="after A died", max_tokens=2).usage
    finally:
        a.stop()
        b.stop()
