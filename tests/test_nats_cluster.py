"""Gateway replicas over a 3-server NATS cluster (``sharing.stream_replicas: 3``): every shared
bucket and stream is kept on three servers, so the fleet's changes outlive one server's loss and
a replica started after it still catches up with them. Real nats-server processes clustered
over loopback, real gateway processes, simulated engines.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support.fleet import MODEL, engine_flags, get_json, instance_entry, start_gateway, write_config
from support.nats import start_nats_cluster
from support.streams import admin, client
from support.waiting import wait_until

pytestmark = pytest.mark.slow


async def _bucket_copies(url: str, bucket: str) -> tuple[int, int]:
    """The bucket's configured replicas, and how many servers hold it (the leader and its peers)."""
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(f"KV_{bucket}")
        cluster = info.cluster
        peers = len(cluster.replicas or []) + 1 if cluster is not None and cluster.leader else 0
        return info.config.num_replicas or 1, peers
    finally:
        await nc.close()


def test_the_shared_state_outlives_a_nats_server(sim_factory, tmp_path: Path) -> None:
    servers = start_nats_cluster(tmp_path)
    gateways = []
    try:
        engines = [sim_factory(*engine_flags("both"), time_scale=20.0) for _ in range(2)]
        sharing = {"nats_url": ",".join(s.url for s in servers), "stream_replicas": 3, "leader_lease_s": 2.0}
        config = write_config(tmp_path / "gateway.yaml", [instance_entry(engines[0], "both", "sim")], sharing=sharing)
        first = start_gateway(config)
        gateways.append(first)
        wait_until(lambda: get_json(f"{first.url}/ready")["sync"] == "ok", 30, message="the replica in sync")

        # a change through the first replica: one more instance
        added = {**instance_entry(engines[1], "both", "sim"), "id": "added"}
        status, body = admin(first.url, "/admin/instances", added)
        assert status == 201, body
        assert asyncio.run(_bucket_copies(servers[1].url, "pdgate_fleet")) == (3, 3)

        # one server goes; a replica started after it catches up from the two left
        servers[0].stop()
        later = start_gateway(
            write_config(
                tmp_path / "later.yaml",
                [instance_entry(engines[0], "both", "sim")],
                sharing={**sharing, "nats_url": f"{servers[1].url},{servers[2].url}"},
            )
        )
        gateways.append(later)
        wait_until(lambda: get_json(f"{later.url}/ready")["sync"] == "ok", 30, message="the later replica in sync")
        wait_until(
            lambda: "added" in {i["id"] for i in get_json(f"{later.url}/admin/instances")["data"]},
            15,
            message="the later replica serving the instance added before the server went",
        )
        # and the first replica, whose server may have been the one lost, serves on and syncs again
        reply = client(first.url).completions.create(
            model=MODEL, prompt="still here", max_tokens=2, extra_body={"ignore_eos": True}
        )
        assert reply.choices[0].finish_reason == "length"
        wait_until(lambda: get_json(f"{first.url}/ready")["sync"] == "ok", 30, message="the first replica in sync")
    finally:
        for gateway in gateways:
            gateway.stop()
        for server in servers:
            server.stop()
