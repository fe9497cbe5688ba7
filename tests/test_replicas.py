"""Gateway replicas that share the fleet's changes and drains through a real NATS server (JetStream
key-value), as separate processes over the same simulated engines."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.fleet import MODEL, engine_flags, get_json, instance_entry, start_gateway, write_config
from support.nats import NatsServer, start_nats
from support.procs import PdgateProcess
from support.streams import admin, client
from support.waiting import wait_until


@pytest.fixture
def nats(tmp_path) -> Iterator[NatsServer]:
    server = start_nats(tmp_path)
    yield server
    server.stop()


def _ids(gateway: PdgateProcess) -> list[str]:
    return sorted(i["id"] for i in get_json(f"{gateway.url}/admin/instances")["data"])


def _draining(gateway: PdgateProcess, instance_id: str) -> bool:
    return bool(get_json(f"{gateway.url}/admin/instances/{instance_id}")["draining"])


def test_replicas_share_fleet_changes_and_drains(sim_factory, tmp_path, nats):
    first = sim_factory(*engine_flags("both"), time_scale=1.0)
    entries = [instance_entry(first, "both", "sim")]
    config = write_config(tmp_path / "gateway.yaml", entries, sharing={"nats_url": nats.url})
    replicas = [start_gateway(config) for _ in range(2)]
    try:
        a, b = replicas
        # an instance added on replica A is served by B too, and placed on there
        second = sim_factory(*engine_flags("both"), time_scale=1.0)
        added = instance_entry(second, "both", "sim")
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
        # a replica that starts later catches up with the changes made before it
        c = start_gateway(config)
        replicas.append(c)
        wait_until(lambda: _ids(c) == both, timeout=10, message="a new replica to catch up")
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
