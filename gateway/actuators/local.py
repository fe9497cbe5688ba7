"""``local``: the gateway starts and stops engines on this host as its own children.

Each pool of ``scaling.actuator.parameters.pools`` (a model and a configured role) has a template:
an instance entry without ``id``, ``url``, ``model`` and ``role``, with a ``launch`` section (sim or
vLLM, as ``pdgate up`` takes it). A new instance is ``{model}-{role}-{n}`` on a free port of
``host``; ``kv_events: true`` (or ``{topic, replay}``) in the template gives it a KV-event publisher
(and a replay socket) on free ports the engine binds (``tcp://*:PORT``). Free ports are also given
for what must be unique per host and the template leaves out: a vLLM PD engine's NIXL side channel,
a simulated SGLang prefill engine's bootstrap server.

:meth:`LocalActuator.apply` counts a pool's instances in the fleet (those it started and configured
ones of the same model and role; draining ones do not count, as in the plan), starts the missing
ones (each joins the fleet once it answers ``/health``) and stops surplus ones it started, fewest
requests in flight first, each drained by :meth:`FleetManager.remove` before its process group is
stopped. Configured instances are counted, never stopped. A child that died leaves the fleet; one
removed from the fleet by someone else (the admin API, a reload) is stopped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdgate.gateway.actuators.base import ActuatorParams, FleetActuator
from pdgate.gateway.fleet import FleetChangeError, FleetManager
from pdgate.gateway.instance_config import InstanceConfig
from pdgate.gateway.launcher import (
    HEALTHY_TIMEOUT_S,
    Child,
    health_session,
    launch_command,
    stop_children,
    wait_http_ok,
)
from pdgate.gateway.planning_config import ScalingConfig
from pdgate.scheduler.scaling_planner import ScalePlan

log = logging.getLogger("pdgate.actuator.local")

PLACEHOLDER_URL = "http://127.0.0.1:1"  # a template is checked as an entry with this url
CLASH_MARKERS = ("address already in use", "errno 98", "eaddrinuse")
DEAD_DRAIN_S = 1.0  # an exited child's streams fail over; its drain is not waited for long


class KvEventsTemplate(BaseModel):
    """``kv_events`` of a template: the actuator picks the ports, the engine binds them."""

    model_config = ConfigDict(extra="forbid")
    topic: str = "kv"
    replay: bool = Field(True, description="also a replay socket (the gateway recovers missed events)")


class Pool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    role: Literal["prefill", "decode", "both", "flex"]
    template: dict[str, Any] = Field(description="an instance entry without id, url, model and role; launch required")

    @model_validator(mode="after")
    def _template(self) -> Pool:
        given = sorted({"id", "url", "model", "role"} & self.template.keys())
        if given:
            raise ValueError(f"template.{given[0]}: set by the pool and the actuator; leave it out")
        if not self.template.get("launch"):
            raise ValueError("template.launch: required (a sim {profile: ...} or a vLLM {model_path: ...})")
        try:
            self.kv_events()
            InstanceConfig.model_validate(self.entry("check", PLACEHOLDER_URL))
        except ValidationError as exc:
            raise ValueError(_first_error(exc, self.template["launch"])) from None
        return self

    def kv_events(self) -> KvEventsTemplate | None:
        value = self.template.get("kv_events")
        if value is None or value is False:
            return None
        if not isinstance(value, dict | bool):
            raise ValueError("template.kv_events: true or {topic, replay} (the actuator picks the ports)")
        try:
            return KvEventsTemplate.model_validate({} if value is True else value)
        except ValidationError as exc:
            raise ValueError(f"template.kv_events: {exc.errors()[0]['msg']} (true or {{topic, replay}})") from None

    def entry(self, instance_id: str, url: str) -> dict[str, Any]:
        fields = {k: v for k, v in self.template.items() if k != "kv_events"}
        return {**fields, "id": instance_id, "url": url, "model": self.model, "role": self.role}


class LocalParams(ActuatorParams):
    pools: list[Pool] = Field(min_length=1, description="the pools this actuator sizes, one per model and role")
    host: str = Field("127.0.0.1", description="the address the engines bind and the gateway reaches them at")
    start_timeout_s: float | None = Field(
        None, gt=0, description="how long a new engine may take to answer /health (default: 60 s sim, 600 s vLLM)"
    )

    @field_validator("pools")
    @classmethod
    def _distinct(cls, pools: list[Pool]) -> list[Pool]:
        keys = [(p.model, p.role) for p in pools]
        for key in keys:
            if keys.count(key) > 1:
                raise ValueError(f"two pools of model {key[0]!r} and role {key[1]!r}")
        return pools


@dataclass
class _Started:
    child: Child
    pool: Pool
    ports: list[int]


class LocalActuator(FleetActuator):
    """Starts and stops engines as this gateway's children (see the module doc)."""

    type_name = "local"
    Params = LocalParams

    def __init__(self, params: ActuatorParams, fleet: FleetManager, settings: ScalingConfig) -> None:
        super().__init__(params, fleet, settings)
        assert isinstance(params, LocalParams)
        self.local: LocalParams = params
        self.children: dict[str, _Started] = {}  # instance id -> the engine this actuator started
        self._lock = asyncio.Lock()
        self._log_dir: Path | None = None
        self._closed = False

    async def apply(self, plan: ScalePlan) -> list[str]:
        async with self._lock:
            lines = await self._reap()
            for pool in (p for p in self.local.pools if p.model == plan.model):
                count = sum(
                    1
                    for s in self.fleet.cluster.instances.values()
                    if s.spec.model == pool.model and s.spec.role == pool.role and not s.draining
                )
                wanted = plan.wanted(pool.role)
                if wanted > count:
                    ids = self._new_ids(pool, wanted - count)
                    lines += await asyncio.gather(*(self._start_one(pool, i) for i in ids))
                elif wanted < count:
                    lines += await self._stop_surplus(pool, count - wanted)
            return lines  # the scaling loop logs them

    async def close(self) -> None:
        """Stop every engine started here (not waiting for an apply in progress: its owner cancels it)."""
        self._closed = True
        started, self.children = list(self.children.values()), {}
        if started:
            await asyncio.to_thread(stop_children, [s.child for s in started])

    # ------------------------------------------------------------------ up
    def _new_ids(self, pool: Pool, count: int) -> list[str]:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{pool.model}-{pool.role}")
        taken = set(self.fleet.cluster.instances) | set(self.children)
        fresh = (f"{base}-{n}" for n in itertools.count(1) if f"{base}-{n}" not in taken)
        return [next(fresh) for _ in range(count)]

    async def _start_one(self, pool: Pool, instance_id: str) -> str:
        for attempt in range(2):  # once more on fresh ports if something else took one meanwhile
            started, error = await self._launch(pool, instance_id)
            if started is not None:
                break
            if attempt or not any(m in error.lower() for m in CLASH_MARKERS):
                return f"failed to start {instance_id} ({pool.role}): {error}"
        assert started is not None
        inst = started.child.instance
        try:
            await self.fleet.add(inst)
        except Exception as exc:  # a child the fleet does not serve is stopped, whatever went wrong
            await self._stop(instance_id)
            why = exc.message if isinstance(exc, FleetChangeError) else repr(exc)
            return f"failed to add {instance_id} ({pool.role}) to the fleet: {why}"
        return f"started {instance_id} ({pool.role}) at {inst.url} (pid {started.child.proc.pid})"

    async def _launch(self, pool: Pool, instance_id: str) -> tuple[_Started | None, str]:
        """Start one engine and wait for its /health: the child, or None and why it failed."""
        if self._log_dir is None:
            self._log_dir = Path(os.environ.get("PDGATE_LOG_DIR") or tempfile.mkdtemp(prefix="pdgate-local-"))
        try:
            inst, ports = self._instance(pool, instance_id)
            proc, log_path = await asyncio.to_thread(_spawn, inst, self._log_dir)
        except (OSError, ValueError) as exc:  # no log directory, no such program, a bad entry
            return None, str(exc).splitlines()[0]
        started = self.children[instance_id] = _Started(Child(inst, proc, log_path), pool, ports)
        if self._closed:  # close() ran while this one was starting
            await self._stop(instance_id)
            return None, "the actuator is closed"
        kind = "vllm" if inst.kind == "vllm" else "sim"
        timeout = self.local.start_timeout_s or HEALTHY_TIMEOUT_S[kind]
        try:
            async with health_session(self.fleet.config.upstream_tls.files()) as session:
                await wait_http_ok(session, f"{inst.url}/health", proc, log_path, f"engine {instance_id}", timeout)
        except (RuntimeError, OSError) as exc:
            await self._stop(instance_id)
            tail = await asyncio.to_thread(_tail, log_path)
            log.error("engine %s did not start (log %s):\n%s", instance_id, log_path, tail)
            last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "")
            return None, f"{str(exc).splitlines()[0]}: {last[:300]}"
        return started, ""

    def _instance(self, pool: Pool, instance_id: str) -> tuple[InstanceConfig, list[int]]:
        """The new instance's entry, with free ports for its URL and what the template leaves to us."""
        in_use = {p for s in self.children.values() for p in s.ports}
        ports: list[int] = []

        def port() -> int:
            ports.append(_free_port(in_use | set(ports)))
            return ports[-1]

        entry = pool.entry(instance_id, f"http://{self.local.host}:{port()}")
        kv = pool.kv_events()
        if kv is not None:
            entry["kv_events"] = {"endpoint": f"tcp://*:{port()}", "topic": kv.topic}
            if kv.replay:
                entry["kv_events"]["replay_endpoint"] = f"tcp://*:{port()}"
        launch = dict(entry["launch"])
        if entry.get("kind", "vllm") == "vllm" and pool.role != "both" and not launch.get("side_channel_port"):
            entry["launch"] = {**launch, "side_channel_port": port()}
        if entry.get("kind") == "sim-sglang" and pool.role == "prefill" and entry.get("bootstrap_port") is None:
            entry["bootstrap_port"] = port()
        return InstanceConfig.model_validate(entry), ports

    # ---------------------------------------------------------------- down
    async def _stop_surplus(self, pool: Pool, surplus: int) -> list[str]:
        instances = self.fleet.cluster.instances
        mine = [i for i, s in self.children.items() if s.pool is pool and i in instances and not instances[i].draining]
        mine.sort(key=lambda i: instances[i].inflight_requests)
        lines = []
        for instance_id in mine[:surplus]:
            try:
                await self.fleet.remove(instance_id, timeout_s=self.settings.drain_timeout_s)
            except FleetChangeError as exc:
                if instance_id in self.fleet.cluster.instances:
                    await self.fleet.undrain(instance_id)  # it keeps serving; the next apply tries again
                lines.append(f"kept {instance_id} ({pool.role}): {exc.message}")
                continue
            await self._stop(instance_id)
            lines.append(f"stopped {instance_id} ({pool.role}) after draining it")
        return lines

    async def _reap(self) -> list[str]:
        """Children that exited on their own leave the fleet; those removed from it (the admin API, a
        reload, another replica) are stopped. A replacement starts if the plan still wants one."""
        lines = []
        for instance_id, started in list(self.children.items()):
            code = started.child.proc.poll()
            served = instance_id in self.fleet.cluster.instances
            if code is not None and served:
                try:
                    await self.fleet.remove(instance_id, timeout_s=DEAD_DRAIN_S, force=True)
                except FleetChangeError:
                    pass  # removed meanwhile
            if code is not None or not served:
                await self._stop(instance_id)
                why = f"exited with code {code}" if code is not None else "was removed from the fleet"
                lines.append(f"engine {instance_id} {why}; {'removed' if served else 'stopped'}")
        return lines

    async def _stop(self, instance_id: str) -> None:
        """SIGTERM the child's process group, SIGKILL after the grace (in a thread: it waits)."""
        started = self.children.pop(instance_id, None)
        if started is not None:
            await asyncio.to_thread(stop_children, [started.child])


def _spawn(inst: InstanceConfig, log_dir: Path) -> tuple[subprocess.Popen, Path]:
    """(in a thread) Start the engine in its own process group, its output to a log file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{inst.spec().id}.log"
    with log_path.open("w") as out:
        proc = subprocess.Popen(launch_command(inst), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log_path


def _free_port(avoid: set[int]) -> int:
    """A port free on every address now (the kernel's choice), not one of ``avoid``."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port


def _first_error(exc: ValidationError, launch: Any) -> str:
    """``template.FIELD: problem`` for a template's first error (of the launch kind it looks like)."""
    other = "SimLaunch" if isinstance(launch, dict) and "model_path" in launch else "VllmLaunch"
    errors = [e for e in exc.errors() if other not in e["loc"]] or exc.errors()
    where = ".".join(str(p) for p in errors[0]["loc"] if p not in ("SimLaunch", "VllmLaunch"))
    return f"template{'.' + where if where else ''}: {errors[0]['msg'].removeprefix('Value error, ')}"


def _tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""
