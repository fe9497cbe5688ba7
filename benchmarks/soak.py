#!/usr/bin/env python3
"""Chaos soak: a mixed workload through gateway replicas while faults hit every part of the fleet,
and every answer checked token for token against an engine nothing disturbed.

    python benchmarks/soak.py [--duration S] [--ci] [--seed N] [--replicas N] [--rate R]
        [--time-scale X] [--kinds engine_kill,conn_reset,...] [--out DIR]

``--ci``: 120 s (``--duration`` still overrides it) on a smaller fleet. The default run is
1800 s. The exit status is 0 when every request ended in a documented way and no token was
lost or duplicated, 1 otherwise (2: the fleet did not start).

**Fleet** (all subprocesses, stopped at the end, also on Ctrl-C/SIGTERM/errors): simulated
engines (vLLM flavour, ``h100-llama-3-8b``, ``--time-scale``, default 1 so that streams last long
enough for faults to meet them mid-way) in the roles prefill, decode and both (default 2+2+2,
``--ci`` 1+2+1), one model served both split and colocated (profile handler ``pd-paths``; each
request says its path with ``x-pdgate-pd-path``); ``--replicas`` (2) ``pdgate serve`` processes
sharing state through a NATS server (none with one replica), migration on (policy
``load-balance``, mechanism ``auto``, stall watchdog 2 s), admission on, three SLO classes
(``x-pdgate-app``: ``interactive``, ``batch``, and the default). The gateways reach each engine
*through a fault-injecting TCP proxy* in this process (``_soak_faults.FaultProxy``), one port
for its HTTP API and one each for its KV-event publisher and replay sockets; the gateway config
names the proxies' ports, which stay the same when an engine restarts.

**Workload** (seeded, open loop, Poisson at ``--rate``, default 4/s): completions and chat,
streamed (70 %) and not, split and colocated, the three SLO classes, ``ignore_eos``,
``max_tokens`` 8-64 (25 % 128-512, so that faults meet streams mid-way), greedy or sampled
with a fixed seed, ``return_token_ids`` and ``include_usage`` on some. The client acts as a load
balancer in front of the replicas: a connection refused or reset before any byte of the answer
is tried on the other replica; a request with no end after ``--hang`` s (60) is a hang.

**Faults** (``_soak_faults``; seeded schedule, one at a time so at most one engine is ever
down, each logged with its start and end): SIGKILL an engine and start it again behind the same
proxy ports; SIGSTOP it for 2-6 s; RST one mid-stream engine connection (or all of an engine's)
in the proxy; blackhole an engine's proxy for 2-5 s; hold an engine's KV-event stream for 3-8 s
(its two KV proxies paused: events arrive late, as from a stalled publisher, nothing else of the
engine stops); drain then undrain an instance through a replica's ``/admin``; SIGKILL a
gateway replica and start it again on its port; SIGKILL the NATS server and start it again.

**Check** (``_soak_check``): after the load, every request that got a 200 is replayed on a
reference engine (not in the fleet, never faulted) and compared token for token; each request
gets one ending: identical, a documented error status, a documented error event,
cut by a replica kill, or a bug (mismatch, hang, undocumented).

**Report** (stdout; ``soak.json`` and ``soak-resources.png`` in ``--out``, default a new temp
dir, never the repo): requests, faults by kind, lost/duplicated tokens, endings by cause, p50/p99
latency during and outside faults, gateway RSS and open fds each second (the plot), the host's
other load. Logs of every process: ``DIR/logs`` (printed as ``logs: DIR``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]
for _extra in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(_extra) not in sys.path:
        sys.path.insert(0, str(_extra))

import _soak_check as check
import _soak_faults as faults
import _soak_report as report
from _host import Child, _running, describe_host, machine, other_load, stop_all, stop_children_on_sigterm

from pdgate.common.tokenizer import load_tokenizer
from pdgate.gateway.config import DEFAULT_SCHEDULING, GatewayConfig
from pdgate.loadgen.prompts import PromptBuilder

MODEL = "soak-model"
PROFILE = "h100-llama-3-8b"
MAX_MODEL_LEN = 4096
PYTHON = [sys.executable, "-m", "pdgate.cli"]
SHORT, LONG, LONG_SHARE = (8, 64), (128, 512), 0.25  # max_tokens; the long ones meet faults mid-stream
CI_ROLES = ("prefill", "decode", "decode", "both")
FULL_ROLES = ("prefill", "prefill", "decode", "decode", "both", "both")
ENGINE_READY = re.compile(r"ready: (http://\S+)[\s\S]*KV events -> tcp://[^:]+:(\d+) \S+ replay=tcp://[^:]+:(\d+)")
APPS = ("interactive", "batch", None)


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    duration_s: float
    seed: int
    replicas: int
    rate: float
    time_scale: float
    roles: tuple[str, ...]
    kinds: tuple[str, ...]
    gap_s: tuple[float, float]
    hang_s: float
    out: Path
    max_records: int | None = None  # the gateways' cost_model.max_records (None: their default)


def free_port() -> int:
    """A free port below the ephemeral range (so no outgoing connection takes it between a
    replica's or a proxy's restarts)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(1000):
        port = rng.randint(20000, low - 1)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


# ------------------------------------------------------------------------------ the fleet
@dataclass
class Engine:
    """One simulated engine behind its three proxies (HTTP, KV events, KV replay)."""

    name: str
    role: str
    config: Path
    logs: Path
    http: faults.FaultProxy | None = None
    kv: list[faults.FaultProxy] = field(default_factory=list)
    child: Child | None = None
    starts: int = 0
    port: int = 0  # the engine's own HTTP port (behind the proxy), this incarnation's

    def launch(self) -> tuple[int, int, int]:
        """Start the process (blocking) and wait for it: its HTTP, KV and replay ports."""
        self.starts += 1
        self.child = Child(
            [*PYTHON, "engine", "sim", "--config", str(self.config)], self.logs / f"{self.name}.{self.starts}.log"
        )
        self.child.wait_ready(ENGINE_READY, timeout=60)
        match = ENGINE_READY.search(self.child.log.read_text())
        assert match is not None
        self.port = int(match[1].rsplit(":", 1)[1])
        return self.port, int(match[2]), int(match[3])


class Fleet:
    """Engines behind proxies, NATS and gateway replicas; implements ``_soak_faults.FleetControl``."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.s = settings
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        counts: dict[str, int] = {}
        self.engines: list[Engine] = []
        for role in settings.roles:
            n = counts[role] = counts.get(role, -1) + 1
            name = f"{role}-{n}"
            config = self.logs / f"{name}.yaml"
            config.write_text(yaml.safe_dump(engine_settings(role, settings)))
            self.engines.append(Engine(name, role, config, self.logs))
        self.reference = Engine("reference", "both", self.logs / "reference.yaml", self.logs)
        self.reference.config.write_text(yaml.safe_dump({**engine_settings("both", settings), "time_scale": 100.0}))
        self.nats: Child | None = None
        self.nats_port = free_port() if settings.replicas > 1 else None
        self.gateway_ports = [free_port() for _ in range(settings.replicas)]
        self.gateways: list[Child | None] = [None] * settings.replicas
        self.gateway_starts = [0] * settings.replicas
        self.children: list[Child] = []  # every process ever started (to check that none is left)
        self.session: aiohttp.ClientSession | None = None

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.gateway_ports]

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        if self.nats_port is not None:
            await self.restart_nats()
        everyone = [*self.engines, self.reference]
        launched = await asyncio.gather(*(asyncio.to_thread(e.launch) for e in everyone), return_exceptions=True)
        self.children += [e.child for e in everyone if e.child is not None]
        for result in launched:
            if isinstance(result, BaseException):
                raise result
        for engine, ports in zip(self.engines, launched, strict=False):  # the reference is reached directly
            assert not isinstance(ports, BaseException)
            engine.http = await faults.FaultProxy(f"{engine.name}-http", free_port(), ports[0]).start()
            engine.kv = [
                await faults.FaultProxy(f"{engine.name}-kv", free_port(), ports[1]).start(),
                await faults.FaultProxy(f"{engine.name}-replay", free_port(), ports[2]).start(),
            ]
        config = gateway_config(self, self.s)
        GatewayConfig.model_validate(config)
        (self.workdir / "gateway.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        await asyncio.gather(*(self.restart_replica(j) for j in range(self.s.replicas)))

    async def stop(self) -> None:
        for engine in self.engines:
            for proxy in [engine.http, *engine.kv]:
                if proxy is not None:
                    await proxy.close()
        if self.session is not None:
            await self.session.close()
        await asyncio.to_thread(stop_all)

    def left_running(self) -> list[int]:
        """Pids of processes this fleet started (or their descendants) still running."""
        return sorted(
            pid for child in self.children for pid, started in {**child.seen}.items() if _running(pid, started)
        )

    # ---- FleetControl
    def engine_names(self) -> list[str]:
        return [e.name for e in self.engines]

    def replica_names(self) -> list[str]:
        return [f"replica-{j}" for j in range(self.s.replicas)]

    def engine_proxy(self, i: int) -> faults.FaultProxy:
        proxy = self.engines[i].http
        assert proxy is not None
        return proxy

    def kv_proxies(self, i: int) -> list[faults.FaultProxy]:
        return self.engines[i].kv

    async def kill_engine(self, i: int) -> None:
        engine = self.engines[i]
        assert engine.child is not None
        _kill_group(engine.child)
        for proxy in [engine.http, *engine.kv]:
            await proxy.down()  # type: ignore[union-attr]
        await asyncio.to_thread(engine.child.stop)

    async def restart_engine(self, i: int) -> None:
        engine = self.engines[i]
        http, kv, replay = await asyncio.to_thread(engine.launch)
        self.children.append(engine.child)  # type: ignore[arg-type]
        for proxy, port in zip([engine.http, *engine.kv], (http, kv, replay), strict=True):
            await proxy.up(port)  # type: ignore[union-attr]

    def signal_engine(self, i: int, sig: int) -> None:
        child = self.engines[i].child
        assert child is not None
        os.kill(child.proc.pid, sig)

    async def admin(self, replica: int, path: str) -> int:
        assert self.session is not None
        try:
            async with self.session.post(self.urls[replica] + path, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError):
            return -1  # no answer

    async def kill_replica(self, j: int) -> None:
        child = self.gateways[j]
        assert child is not None
        _kill_group(child)
        await asyncio.to_thread(child.stop)

    async def restart_replica(self, j: int) -> None:
        self.gateway_starts[j] += 1
        cmd = [*PYTHON, "serve", "--config", str(self.workdir / "gateway.yaml"), "--workers", "1"]
        cmd += ["--port", str(self.gateway_ports[j]), "--log-format", "json", "--access-log"]
        child = Child(cmd, self.logs / f"replica-{j}.{self.gateway_starts[j]}.log", env={"PDGATE_WORKERS": "1"})
        self.gateways[j] = child
        self.children.append(child)
        await asyncio.to_thread(child.wait_ready, timeout=60)

    async def kill_nats(self) -> None:
        assert self.nats is not None
        _kill_group(self.nats)
        await asyncio.to_thread(self.nats.stop)

    async def restart_nats(self) -> None:
        assert self.nats_port is not None
        binary = Path(sys.executable).with_name("nats-server")
        cmd = [str(binary), "-js", "-a", "127.0.0.1", "-p", str(self.nats_port), "-sd", str(self.workdir / "jetstream")]
        self.nats = Child(cmd, self.logs / f"nats.{len(self.children)}.log")
        self.children.append(self.nats)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.nats_port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("nats-server did not accept connections")

    def gateway_pids(self) -> dict[str, int | None]:
        return {
            f"replica-{j}": (c.proc.pid if c is not None and c.proc.poll() is None else None)
            for j, c in enumerate(self.gateways)
        }


def _kill_group(child: Child) -> None:
    child.tree()  # remember its descendants, so that stop() finds those in other groups
    try:
        os.killpg(child.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def engine_settings(role: str, s: Settings) -> dict[str, Any]:
    return {
        "port": 0,
        "role": role,
        "profile": PROFILE,
        "served_model_name": MODEL,
        "time_scale": s.time_scale,
        "max_model_len": MAX_MODEL_LEN,
        "kv_events_endpoint": "tcp://*:*",
        "kv_events_replay_endpoint": "tcp://*:*",
    }


def gateway_config(fleet: Fleet, s: Settings) -> dict[str, Any]:
    instances = []
    for engine in fleet.engines:
        assert engine.http is not None
        instances.append(
            {
                "id": engine.name,
                "url": f"http://127.0.0.1:{engine.http.listen_port}",
                "kind": "sim",
                "role": engine.role,
                "model": MODEL,
                "kv_events": {
                    "endpoint": f"tcp://*:{engine.kv[0].listen_port}",
                    "replay_endpoint": f"tcp://*:{engine.kv[1].listen_port}",
                },
                "launch": {"profile": PROFILE, "time_scale": s.time_scale},
            }
        )
    config: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": fleet.gateway_ports[0],
        "models": [{"name": MODEL, "tokenizer": "builtin", "max_model_len": MAX_MODEL_LEN}],
        "instances": instances,
        "scrape_interval_s": 0.5,
        "health": {"interval_s": 0.5, "timeout_s": 1.0, "failure_threshold": 2, "cooldown_s": 3.0},
        "scheduling": {
            **DEFAULT_SCHEDULING,
            "profileHandler": {"type": "pd-paths", "parameters": {"honour_header": True}},
        },
        "slo": {
            "default": {"ttft_ms": 3000, "tpot_ms": 200},
            "classes": [
                {"name": "interactive", "apps": ["interactive"], "ttft_ms": 1000, "tpot_ms": 100, "priority": 10},
                {"name": "batch", "apps": ["batch"], "ttft_ms": 30000, "priority": -10},
            ],
        },
        "admission": {"enabled": True, "on_infeasible": "reject"},
        "migration": {
            "enabled": True,
            "policy": "load-balance",
            "mechanism": "auto",
            "interval_s": 0.5,
            "timeout_s": 10,
            "stall_timeout_s": 2.0,
        },
        "admin": {"drain_wait_s": 10},
    }
    if s.max_records is not None:
        config["cost_model"] = {"max_records": s.max_records}
    if fleet.nats_port is not None:
        config["sharing"] = {"nats_url": f"nats://127.0.0.1:{fleet.nats_port}"}
    return config


# ------------------------------------------------------------------------------ the workload
def build_workload(s: Settings) -> list[check.Request]:
    """The run's requests in arrival order; the same for the same settings."""
    rng = random.Random(f"soak-workload-{s.seed}")
    builder = PromptBuilder(load_tokenizer("builtin"), seed=s.seed)
    systems = [builder.text(rng.randint(64, 128), rng) for _ in range(4)]
    out: list[check.Request] = []
    t = rng.expovariate(s.rate)
    while t < s.duration_s:
        chat, stream = rng.random() < 0.4, rng.random() < 0.7
        prompt = builder.text(int(rng.uniform(16, 400)), rng)
        system = rng.choice(systems) if rng.random() < 0.3 else None
        long = rng.random() < LONG_SHARE
        body: dict[str, Any] = {"model": MODEL, "max_tokens": rng.randint(*LONG if long else SHORT)}
        if chat:
            body["messages"] = [{"role": "system", "content": system}] if system else []
            body["messages"].append({"role": "user", "content": prompt})
        else:
            body["prompt"] = (system or "") + prompt
        body.update(stream=stream, ignore_eos=True, temperature=0)
        if rng.random() < 0.25:
            body.update(temperature=0.8, seed=rng.randint(0, 2**31))
        if rng.random() < 0.5:
            body["return_token_ids"] = True
        if stream and rng.random() < 0.7:
            body["stream_options"] = {"include_usage": True}
        path = "colocated" if rng.random() < 0.4 else "split"
        index = len(out)
        replica = rng.randrange(s.replicas)
        out.append(
            check.Request(index, t, chat, stream, path, rng.choice(APPS), body, replica, f"soak-{s.seed}-{index}")
        )
        t += rng.expovariate(s.rate)
    return out


async def run_load(fleet: Fleet, requests: Sequence[check.Request], s: Settings, t0: float) -> list[check.Seen]:
    """Send each request at its time (open loop) and wait for every one to end."""
    assert fleet.session is not None
    tasks = []
    for req in requests:
        delay = t0 + req.at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(check.send(fleet.session, fleet.urls, req, s.hang_s)))
    return list(await asyncio.gather(*tasks))


# ------------------------------------------------------------------------------ the run
async def gateway_moves(fleet: Fleet) -> dict[str, dict[str, float]]:
    """Per replica, ``pdgate_migrations_total`` by reason/outcome (since its last start)."""
    assert fleet.session is not None
    out: dict[str, dict[str, float]] = {}
    for name, url in zip(fleet.replica_names(), fleet.urls, strict=True):
        counts: dict[str, float] = {}
        try:
            async with fleet.session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "pdgate_migrations_total" and sample.value:
                    key = f"{sample.labels.get('reason')}/{sample.labels.get('outcome')}"
                    counts[key] = counts.get(key, 0.0) + sample.value
        out[name] = counts
    return out


async def engines_idle(fleet: Fleet, within_s: float = 15.0) -> dict[str, Any]:
    """Each engine's state once none runs or queues a request (or as it is after ``within_s``)."""
    assert fleet.session is not None
    deadline = time.monotonic() + within_s
    while True:
        states: dict[str, Any] = {}
        for engine in fleet.engines:
            url = f"http://127.0.0.1:{engine.port}/sim/state"
            try:
                async with fleet.session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    states[engine.name] = await resp.json()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                states[engine.name] = {"error": f"{type(exc).__name__}: {exc}"}
        leftovers = report.engine_leftovers(states)
        busy = any(v.get("running") or v.get("waiting") or "error" in v for v in leftovers.values())
        if not busy or time.monotonic() >= deadline:
            return leftovers
        await asyncio.sleep(0.5)


def replica_kills(done: Sequence[faults.Fault]) -> list[tuple[int, float, float]]:
    return [(int(f.target.rsplit("-", 1)[1]), f.start, f.end or f.start) for f in done if f.kind == "replica_kill"]


async def soak(s: Settings, fleet: Fleet) -> report.Outcome:
    """Start the fleet, run the load while the injector works, then check every answer."""
    requests = build_workload(s)
    kinds = [k for k in s.kinds if s.replicas > 1 or k not in ("replica_kill", "nats_kill")]
    count = int(s.duration_s / s.gap_s[0]) + 1
    schedule = faults.plan_faults(s.seed, count, kinds, len(s.roles), s.replicas, s.gap_s)
    print(f"workload: {len(requests)} requests over {s.duration_s:g} s; fault kinds: {', '.join(kinds)}", flush=True)
    await fleet.start()
    print(f"fleet: {', '.join(fleet.engine_names())} behind proxies; replicas {' '.join(fleet.urls)}", flush=True)
    injector = faults.Injector(fleet, schedule, s.seed)
    sampler = report.ResourceSampler(fleet.gateway_pids)
    stop = asyncio.Event()
    sampling = asyncio.ensure_future(sampler.run(stop))
    t0 = time.monotonic()
    injecting = asyncio.ensure_future(injector.run())
    loading = asyncio.ensure_future(run_load(fleet, requests, s, t0))
    await asyncio.wait([loading], timeout=max(0.0, t0 + s.duration_s - time.monotonic()))
    injector.stop()
    done = await injecting  # the fault in progress is undone first
    seen = await loading
    load_wall = time.monotonic() - t0
    stop.set()
    await sampling
    moves = await gateway_moves(fleet)
    engines = await engines_idle(fleet)
    answered = [r for r, x in zip(requests, seen, strict=True) if x.status == 200]
    print(f"load done in {load_wall:.0f} s; replaying {len(answered)} answers on the reference engine", flush=True)
    assert fleet.session is not None
    refs = await check.replay_reference(fleet.session, f"http://127.0.0.1:{fleet.reference.port}", answered)
    kills = replica_kills(done)
    endings = [check.classify(x, refs.get(x.index), kills) for x in seen]
    logs = report.scan_gateway_logs(sorted(fleet.logs.glob("replica-*.log")))
    return report.Outcome(requests, seen, endings, done, sampler, moves, logs, engines, t0, load_wall)


# ------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> Settings:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, help="seconds of load and faults (default 1800; --ci 120)")
    ap.add_argument("--ci", action="store_true", help="the CI mode: 120 s, 1 prefill + 2 decode + 1 colocated engine")
    ap.add_argument("--seed", type=int, default=0, help="workload and fault schedule")
    ap.add_argument("--replicas", type=int, default=2, help="gateway replicas (>1: with a NATS server)")
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="the engines' time scale")
    ap.add_argument("--kinds", default=",".join(faults.KINDS), help="fault kinds, comma-separated")
    ap.add_argument("--gap", default=None, help="MIN,MAX seconds between faults (default 3,10; --ci 1.5,4)")
    ap.add_argument("--hang", type=float, default=60.0, help="seconds after which a request is a hang")
    ap.add_argument("--out", help="directory for soak.json, the plot and the logs (default: a new temp dir)")
    ap.add_argument(
        "--max-records",
        type=int,
        help="the gateways' cost_model.max_records (its in-memory training set, which grows RSS up to it)",
    )
    a = ap.parse_args(argv)
    kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    if not kinds or any(k not in faults.KINDS for k in kinds):
        ap.error(f"--kinds: a comma-separated list of {', '.join(faults.KINDS)}")
    if a.replicas < 1:
        ap.error("--replicas: at least 1")
    gap = tuple(float(x) for x in (a.gap or ("1.5,4" if a.ci else "3,10")).split(","))
    if len(gap) != 2 or not 0 < gap[0] <= gap[1]:
        ap.error("--gap: MIN,MAX with 0 < MIN <= MAX")
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="pdgate-soak-"))
    if out.resolve().is_relative_to(REPO_ROOT):
        ap.error("--out: not inside the repository")
    roles = CI_ROLES if a.ci else FULL_ROLES
    duration = a.duration if a.duration is not None else 120.0 if a.ci else 1800.0
    gaps = (gap[0], gap[1])
    return Settings(duration, a.seed, a.replicas, a.rate, a.time_scale, roles, kinds, gaps, a.hang, out, a.max_records)


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    stop_children_on_sigterm()
    started = time.monotonic()
    info = machine()
    load = other_load()
    print(describe_host(info, load), flush=True)
    s.out.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(s, s.out)
    print(f"logs: {fleet.logs}", flush=True)
    outcome: report.Outcome | None = None
    try:
        outcome = asyncio.run(_run(s, fleet))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    except RuntimeError as exc:
        print(f"the fleet failed: {exc}", file=sys.stderr)
    finally:
        stop_all()
        left = fleet.left_running()
        print(f"children started: {len(fleet.children)}; left running: {len(left)} {left}", flush=True)
    if outcome is None:
        return 2
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()}
    r = report.summarise(outcome, settings, {**info, "other_load_at_start": load, "other_load_at_end": other_load()})
    r["wall_s"] = round(time.monotonic() - started, 1)
    r["processes_left"] = left
    report.print_report(r)
    windows = [(f.kind, f.start, f.end or f.start) for f in outcome.faults]
    png = report.plot_resources(outcome.sampler.samples, windows, outcome.t0, s.out / "soak-resources.png")
    data = {**r, "resource_samples": outcome.sampler.samples}
    (s.out / "soak.json").write_text(json.dumps(data, indent=1, default=str))
    print(f"other load at the end: {r['host']['other_load_at_end']}")
    print(f"wrote {s.out / 'soak.json'} and {png}; total {r['wall_s']:.0f} s")
    return 1 if report.failed(r) or left else 0


async def _run(s: Settings, fleet: Fleet) -> report.Outcome:
    try:
        return await soak(s, fleet)
    finally:
        await fleet.stop()


if __name__ == "__main__":
    sys.exit(main())
