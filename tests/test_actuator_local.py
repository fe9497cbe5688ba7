"""The ``local`` fleet actuator: engines started and stopped as the gateway's children.

A gateway runs in the test's process over a configured simulated prefill and decode engine (real
processes on loopback); the actuator is given hand-made scaling plans and starts real ``pdgate
engine sim`` processes, which take real requests from the openai client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.fleet import MODEL, instance_entry, pd_engine_pair, write_config
from support.procs import PdgateProcess
from support.waiting import wait_until_async

from pdgate.gateway.actuators.local import LocalActuator
from pdgate.gateway.app import build_gateway
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.fleet import FleetManager
from pdgate.gateway.planning_config import ScalingConfig
from pdgate.gateway.server import GatewayServer
from pdgate.scheduler.role_planner import PoolDemand
from pdgate.scheduler.scaling_planner import ScalePlan

NEW = f"{MODEL}-decode-1"  # the first instance the actuator starts in the decode pool
BAD_PROFILE = "no-such-profile-for-the-actuator-test"


@pytest.fixture(scope="module")
def pd_engines() -> Iterator[tuple[PdgateProcess, PdgateProcess]]:
    """The configured instances: one prefill and one decode sim engine."""
    with pd_engine_pair() as engines:
        yield engines


@pytest.fixture
async def gateway(tmp_path: Path, pd_engines) -> AsyncIterator[GatewayServer]:
    """A gateway in this process; streams move only when drained, and never by failover."""
    prefill, decode = pd_engines
    entries = [instance_entry(prefill, "prefill", "sim"), instance_entry(decode, "decode", "sim")]
    migration = {"policy": "no-migration", "interval_s": 0.1, "failover": False}
    path = write_config(tmp_path / "gateway.yaml", entries, migration=migration, logging={"access_log": True})
    server = GatewayServer(build_gateway(GatewayConfig.load(path)))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def actuators(gateway, monkeypatch, tmp_path) -> AsyncIterator[Callable[..., LocalActuator]]:
    """Make local actuators on the gateway's fleet; each one is closed (its engines stopped) at the end."""
    monkeypatch.setenv("PDGATE_LOG_DIR", str(tmp_path / "engine-logs"))
    made: list[LocalActuator] = []

    def make(start_timeout_s: float | None = None, **launch: Any) -> LocalActuator:
        kv_events = launch.pop("kv_events", False)
        template = {"kind": "sim", "kv_events": kv_events, "launch": {"time_scale": 20.0, **launch}}
        template["launch"]["args"] = {"max_model_len": 4096}
        pools = [{"model": MODEL, "role": "decode", "template": template}]
        params = LocalActuator.validate_params({"pools": pools, "start_timeout_s": start_timeout_s})
        made.append(LocalActuator(params, _fleet(gateway), ScalingConfig(drain_timeout_s=30.0)))
        return made[-1]

    yield make
    for actuator in made:
        await actuator.close()


def _fleet(server: GatewayServer) -> FleetManager:
    assert server.gateway.fleet is not None
    return server.gateway.fleet


def _plan(decode: int, prefill: int = 1) -> ScalePlan:
    demand = PoolDemand(prefill_work_s_per_s=0.1, decode_streams=1.0, context_tokens_per_stream=200.0)
    current = {"prefill": 1, "decode": 1, "both": 0, "flex": 0}
    return ScalePlan(MODEL, prefill, decode, 0, current, demand, streams_per_decode=8, reason="test")


async def _instance_ids(server: GatewayServer) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/admin/instances") as resp:
        assert resp.status == 200
        return sorted(i["id"] for i in (await resp.json())["data"])


async def _answers(url: str) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=2)),
        ):
            return True
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def _metric(server: GatewayServer, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _client(server: GatewayServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_with(marker: str) -> list[int]:
    """Live child processes of this one whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or marker.encode() not in (entry / "cmdline").read_bytes():
                continue
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid():
            found.append(int(entry.name))
    return found


async def test_scaling_up_starts_an_engine_that_joins_the_gateway_and_serves(gateway, actuators, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pdgate.access")
    actuator = actuators(kv_events=True)
    lines = await actuator.apply(_plan(decode=2))
    assert len(lines) == 1 and lines[0].startswith(f"started {NEW} (decode) at http://127.0.0.1:"), lines
    started = actuator.children[NEW].child
    assert started.proc.poll() is None and started.log.parent.name == "engine-logs"
    assert NEW in await _instance_ids(gateway)
    # its KV events on ports the actuator picked, which the engine binds (tcp://*:PORT)
    kv = started.instance.kv_events
    assert kv is not None and kv.endpoint.startswith("tcp://*:") and (kv.replay_endpoint or "").startswith("tcp://*:")
    assert len({started.instance.url.rsplit(":", 1)[1], kv.endpoint[8:], kv.replay_endpoint[8:]}) == 3

    client = _client(gateway)

    async def new_one_served() -> bool:
        replies = await asyncio.gather(
            *(
                client.completions.create(
                    model=MODEL, prompt=f"request {n} for the pool", max_tokens=4, extra_body={"ignore_eos": True}
                )
                for n in range(8)
            )
        )
        assert all(r.usage is not None and r.usage.completion_tokens == 4 for r in replies)
        return any(getattr(r, "access", {}).get("decode") == NEW for r in caplog.records)

    await wait_until_async(new_one_served, timeout=30, message=f"a request decoded on {NEW}")
    await client.close()


async def test_apply_is_idempotent_and_counts_configured_instances(gateway, actuators) -> None:
    actuator = actuators()
    assert await actuator.apply(_plan(decode=1)) == []  # the configured decode instance is the pool's one
    assert len(await actuator.apply(_plan(decode=2))) == 1
    pid = actuator.children[NEW].child.proc.pid
    assert await actuator.apply(_plan(decode=2)) == []
    assert await actuator.apply(_plan(decode=2)) == []
    assert list(actuator.children) == [NEW] and actuator.children[NEW].child.proc.pid == pid
    assert len(await _instance_ids(gateway)) == 3


async def test_scaling_down_drains_the_instance_before_stopping_it(gateway, actuators, pd_engines) -> None:
    actuator = actuators(time_scale=1.0)  # real-time decode: the stream outlasts the drain
    await actuator.apply(_plan(decode=2))
    child = actuator.children[NEW].child
    fleet, cluster = _fleet(gateway), _fleet(gateway).cluster
    configured = instance_entry(pd_engines[1], "decode", "sim")["id"]
    await fleet.drain(configured)  # the stream goes to the new instance
    tokens = 400
    received: list[str] = []
    usage: list[int] = []

    async def stream() -> str | None:
        client = _client(gateway)
        reply = await client.completions.create(
            model=MODEL,
            prompt="A long story, told token by token, while its engine leaves the fleet",
            max_tokens=tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        finish = None
        async for chunk in reply:
            for choice in chunk.choices:
                received.append(choice.text)
                finish = choice.finish_reason or finish
            if chunk.usage is not None:
                usage.append(chunk.usage.completion_tokens)
        await client.close()
        return finish

    task = asyncio.create_task(stream())
    try:
        await wait_until_async(lambda: cluster.instances[NEW].inflight_requests >= 1 and len(received) >= 5)
        await fleet.undrain(configured)
        assert not task.done()
        lines = await actuator.apply(_plan(decode=1))
        assert lines == [f"stopped {NEW} (decode) after draining it"]
        assert child.proc.poll() is not None and not _group_alive(child.proc.pid)
        assert not await _answers(child.instance.url)
        assert NEW not in await _instance_ids(gateway) and NEW not in actuator.children
        assert await asyncio.wait_for(task, 60) == "length"
    finally:
        task.cancel()
    assert len([t for t in received if t]) == tokens and usage == [tokens]  # every token, none lost or doubled
    moved = await _metric(gateway, "pdgate_migrations_total", reason="drain", mechanism="live", outcome="migrated")
    assert moved == 1  # the stream moved away (live) before the engine stopped
    # the configured instance is counted, never stopped
    assert await actuator.apply(_plan(decode=0)) == []
    assert configured in await _instance_ids(gateway) and pd_engines[1].proc.poll() is None


async def test_an_engine_that_fails_to_start_is_a_failure_line_and_leaves_nothing(gateway, actuators) -> None:
    actuator = actuators(profile=BAD_PROFILE)
    lines = await actuator.apply(_plan(decode=2))
    assert len(lines) == 1 and lines[0].startswith(f"failed to start {NEW} (decode): "), lines
    assert "exited with code" in lines[0] and "unknown engine profile" in lines[0]
    assert actuator.children == {} and _processes_with(BAD_PROFILE) == []
    assert NEW not in await _instance_ids(gateway)
    # tried again at the next apply, failing the same way
    assert (await actuator.apply(_plan(decode=2)))[0].startswith(f"failed to start {NEW}")
    # an engine that does not answer in time is stopped
    slow = actuators(start_timeout_s=0.001, time_scale=7.25)
    lines = await slow.apply(_plan(decode=2))
    assert len(lines) == 1 and "did not become healthy within" in lines[0], lines
    assert slow.children == {} and _processes_with("--time-scale\x007.25") == []


async def test_close_stops_every_engine_it_started(gateway, actuators) -> None:
    actuator = actuators()
    lines = await actuator.apply(_plan(decode=3))
    assert sorted(lines)[0].startswith(f"started {NEW} ") and len(lines) == 2, lines
    children = [s.child for s in actuator.children.values()]
    assert all(c.proc.poll() is None for c in children)
    await actuator.close()
    assert actuator.children == {}
    for child in children:
        assert child.proc.poll() is not None and not _group_alive(child.proc.pid)
        assert not await _answers(child.instance.url)


async def test_a_child_that_died_or_left_the_fleet_is_cleaned_up(gateway, actuators) -> None:
    actuator = actuators()
    await actuator.apply(_plan(decode=2))
    first = actuator.children[NEW].child
    os.killpg(first.proc.pid, signal.SIGKILL)  # the engine dies on its own
    await wait_until_async(lambda: first.proc.poll() is not None)
    lines = await actuator.apply(_plan(decode=2))  # out of the fleet, and a replacement started
    assert lines[0] == f"engine {NEW} exited with code -9; removed" and lines[1].startswith(f"started {NEW} "), lines
    second = actuator.children[NEW].child
    assert second.proc.pid != first.proc.pid and NEW in await _instance_ids(gateway)
    await _fleet(gateway).remove(NEW, timeout_s=10)  # as DELETE /admin/instances/{id} does
    assert await actuator.apply(_plan(decode=1)) == [f"engine {NEW} was removed from the fleet; stopped"]
    assert second.proc.poll() is not None and actuator.children == {}


def _build(tmp_path: Path, parameters: dict[str, Any]) -> None:
    """Load and build a gateway whose scaling section has the local actuator with ``parameters``."""
    entry = {"id": "d", "url": "http://127.0.0.1:9", "kind": "sim", "role": "both", "model": MODEL}
    scaling = {"enabled": True, "actuator": {"type": "local", "parameters": parameters}}
    build_gateway(GatewayConfig.load(write_config(tmp_path / "scaling.yaml", [entry], scaling=scaling)))


def test_bad_actuator_parameters_are_an_error_naming_the_field(tmp_path: Path) -> None:
    """A ConfigError (a ValueError) when the config loads, or a ValueError when the gateway is built."""
    pool = {"model": MODEL, "role": "decode", "template": {"kind": "sim", "launch": {"profile": "h100-llama-3-8b"}}}
    _build(tmp_path, {"pools": [pool]})
    template = pool["template"]
    cases = [  # (parameters, what the message says after "scaling.actuator.parameters.")
        ({"pools": [{**pool, "template": {"kind": "sim"}}]}, r"pools\.0: .*template\.launch: required"),
        (
            {"pools": [{**pool, "template": {**template, "block_size": 0}}]},
            r"pools\.0: .*template\.block_size: Input should be greater than or equal to 1",
        ),
        ({"pools": [{**pool, "template": {**template, "url": "x"}}]}, r"pools\.0: .*template\.url: set by the pool"),
        ({"pools": [{**pool, "template": {**template, "kv_events": "on"}}]}, r"pools\.0: .*template\.kv_events: true"),
        ({"pools": [pool], "hosts": ["a"]}, r"hosts: Extra inputs are not permitted"),
        ({"pools": [{**pool, "role": "decoder"}]}, r"pools\.0\.role: Input should be"),
        ({"pools": [pool], "start_timeout_s": 0}, r"start_timeout_s: Input should be greater than 0"),
        ({"pools": [pool, pool]}, r"pools: .*two pools of model 'sim-model' and role 'decode'"),
    ]
    for parameters, message in cases:
        with pytest.raises(ValueError, match=r"scaling\.actuator\.parameters\." + message):
            _build(tmp_path, parameters)
