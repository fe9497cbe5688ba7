"""``pdgate serve --workers N``: several gateway processes on one address (SO_REUSEPORT) that
share state through a NATS server the command starts itself, supervised by the command."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import signal

import pytest
from support.fleet import MODEL, engine_flags, instance_entry, start_gateway, write_config
from support.procs import PdgateProcess
from support.streams import client
from support.waiting import wait_until

from pdgate.gateway.commands import _worker_count
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.workers import WORKERS_ENV


def _serving_process(url: str) -> str:
    """Which worker answered a request on a new connection: the per-process prefix of its ids."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        body = json.dumps({"model": MODEL, "prompt": "which one", "max_tokens": 1})
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        return str(json.loads(response.read())["id"]).rsplit("-", 1)[0]
    finally:
        conn.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone once its last thread has
    # ended: the main thread turns zombie first, and the others still hold the process's sockets
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z" or len(list(pathlib.Path(f"/proc/{pid}/task").iterdir())) > 1
    except FileNotFoundError:
        return False


def _worker_pids(banner: str) -> list[int]:
    line = next(x for x in banner.splitlines() if " workers (pids " in x)
    return [int(p) for p in line.split("(pids ")[1].split(")")[0].split(", ")]


def _nats_pid(supervisor: int) -> int:
    tasks = pathlib.Path(f"/proc/{supervisor}/task").iterdir()  # a child belongs to the thread that forked it
    children = [int(pid) for task in tasks for pid in (task / "children").read_text().split()]
    for pid in children:
        if "nats-server" in open(f"/proc/{pid}/cmdline").read():
            return pid
    raise AssertionError("no nats-server child")


def _two_workers(sim_factory, tmp_path) -> PdgateProcess:
    """``pdgate serve`` with two workers over one simulated engine, once its banner is out."""
    engine = sim_factory(*engine_flags("both"), time_scale=10.0)
    config = write_config(tmp_path / "gateway.yaml", [instance_entry(engine, "both", "sim")])
    gateway = start_gateway(config, env={WORKERS_ENV: "2"})
    try:
        wait_until(lambda: any(" workers (pids " in line for line in gateway.output), 10, message="the banner")
    except BaseException:
        gateway.stop()
        raise
    return gateway


@pytest.mark.slow
def test_two_workers_serve_one_address_and_are_supervised(sim_factory, tmp_path):
    gateway = _two_workers(sim_factory, tmp_path)
    try:
        banner = "".join(gateway.output)
        assert "sharing through NATS at nats://127.0.0.1:" in banner
        pids = _worker_pids(banner)
        nats = _nats_pid(gateway.proc.pid)
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        # the kernel spreads new connections over both workers
        seen: set[str] = set()
        wait_until(lambda: seen.add(_serving_process(gateway.url)) or len(seen) == 2, 20, message="both workers")
        # the openai client is served as by one process
        assert client(gateway.url).completions.create(model=MODEL, prompt="hello", max_tokens=3).usage
        # a worker killed is started again; meanwhile the other serves every request
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: not _alive(pids[0]), 10, message="the worker to die")  # with its listening socket
        for _ in range(5):
            assert _serving_process(gateway.url)
        wait_until(lambda: "starting it again" in "".join(gateway.output), 10, message="the restart to be logged")
        wait_until(
            lambda: len({_serving_process(gateway.url) for _ in range(8)} - seen) >= 1, 20, message="a new worker"
        )
        # the NATS server killed is started again, and the workers share through it again
        os.kill(nats, signal.SIGKILL)
        wait_until(lambda: "local NATS server exited" in "".join(gateway.output), 10, message="NATS restarted")
        nats = wait_until(lambda: _nats_pid(gateway.proc.pid) if _has_nats(gateway.proc.pid) else None, 10)
        wait_until(lambda: all(_sync(gateway.url) == "ok" for _ in range(6)), 20, message="every worker in sync")
        # SIGTERM stops the workers and the NATS server
        assert gateway.stop() == 0
        for pid in [*pids[1:], nats]:
            assert not _alive(pid)
    finally:
        gateway.stop()


def _has_nats(supervisor: int) -> bool:
    try:
        return _alive(_nats_pid(supervisor))
    except AssertionError:
        return False


def _sync(url: str) -> str:
    """What the worker that answers a new connection says of its sharing (``sync``)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/ready")
        return str(json.loads(conn.getresponse().read())["sync"])
    finally:
        conn.close()


@pytest.mark.slow
def test_workers_end_with_their_supervisor(sim_factory, tmp_path):
    """A supervisor killed with SIGKILL leaves no worker and no NATS server behind (the kernel ends them)."""
    gateway = _two_workers(sim_factory, tmp_path)
    try:
        pids = [*_worker_pids("".join(gateway.output)), _nats_pid(gateway.proc.pid)]
        gateway.kill()
        wait_until(lambda: not any(_alive(p) for p in pids), 15, message="the workers and NATS to end")
    finally:
        gateway.stop()


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"workers": None, "worker_of": None, **kw})


@pytest.mark.unit
def test_worker_count_defaults(monkeypatch):
    config = GatewayConfig.model_validate(
        {"models": [{"name": MODEL}], "instances": [{"url": "http://127.0.0.1:9", "model": MODEL}]}
    )
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert _worker_count(_args(), config) == 3
    assert _worker_count(_args(workers=1), config) == 1  # the flag wins
    assert _worker_count(_args(worker_of=1234), config) == 1  # a worker never starts workers
    monkeypatch.delenv(WORKERS_ENV)
    off = config.model_copy(update={"sharing": config.sharing.model_copy(update={"enabled": False})})
    assert _worker_count(_args(), off) == 1  # workers that cannot share are not the default
    with pytest.raises(ValueError, match="at least 1"):
        _worker_count(_args(workers=0), config)


@pytest.mark.unit
def test_workers_refuse_kv_event_endpoints_only_one_process_can_bind():
    entry = {"url": "http://127.0.0.1:9", "model": MODEL, "kv_events": {"endpoint": "tcp://127.0.0.1:5601"}}
    config = GatewayConfig.model_validate({"models": [{"name": MODEL}], "instances": [entry]})
    assert _worker_count(_args(workers=1), config) == 1
    with pytest.raises(ValueError, match=r"tcp://\*:PORT"):
        _worker_count(_args(workers=2), config)
