"""The simulated fleet of ``pdgate simulate``: one in-process simulated engine per instance of a
gateway config, on the loop's (virtual) clock, served through the in-memory transport.

* Each instance becomes the engine ``pdgate up`` would launch for it: the same ``pdgate engine
  sim`` settings (:func:`pdgate.gateway.launcher.sim_command`, parsed by the engine's own flags),
  so its profile, role, API flavour, block size and ``launch.args`` carry over. Instances of the
  real kinds (``vllm``, ``sglang``) are simulated by the engine of the same API flavour, with their
  ``cost_profile`` (default ``h100-llama-3-8b``).
* Engines reach each other (KV pulls, SGLang bootstrap rooms, migration reservations) in memory,
  and take the same modelled KV-transfer time as over HTTP.
* KV events go from each engine straight to the gateway's exact prefix index, on the next loop
  turn after the step that made them (:class:`KvEventBus`).
* :func:`scale_instances` resizes a fleet keeping its roles' proportions, or to exact counts;
  :func:`resized` does it to a whole gateway config.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from pdgate.adapters.kv_events import KvEventSink, KvEventSource
from pdgate.common.kv_events import KvCacheEvent
from pdgate.common.tokenizer import Tokenizer, load_tokenizer
from pdgate.engines.flags import add_model_flags, model_from_args
from pdgate.engines.sim.build import build_state
from pdgate.engines.sim.config import SimEngineConfig
from pdgate.engines.sim.engine import LoopClock
from pdgate.engines.sim.local import call_local, close_local
from pdgate.engines.sim.peers import LocalPeerLink
from pdgate.engines.sim.state import SimState
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.instance_config import InstanceConfig, SimLaunch
from pdgate.gateway.launcher import SIM_FLAVOURS, sim_command
from pdgate.simulate.memory import EngineReply, MemoryReply, MemoryTransport

REAL_TO_SIM = {"vllm": "sim-vllm", "sglang": "sim-sglang"}
FIRST_PORT = 20000  # ports of added instances (nothing is bound: they only name in-memory origins)


def simulated_instance(instance: InstanceConfig) -> InstanceConfig:
    """The instance as the simulation runs it: a simulated kind with a launch section."""
    kind = REAL_TO_SIM.get(instance.kind, instance.kind)
    if kind not in SIM_FLAVOURS:
        raise ValueError(f"instance {instance.url}: kind {instance.kind!r} cannot be simulated")
    launch = instance.launch if isinstance(instance.launch, SimLaunch) else None
    if launch is None:
        launch = SimLaunch(profile=instance.cost_profile or "h100-llama-3-8b")
    return instance.model_copy(update={"kind": kind, "launch": launch})


def engine_config(instance: InstanceConfig, seed: int, stream_interval: int | None = None) -> SimEngineConfig:
    """The engine ``pdgate up`` would launch for ``instance`` (its ``pdgate engine sim`` flags);
    ``stream_interval`` overrides the engine's."""
    argv = sim_command(instance)
    flags = argv[argv.index("sim") + 1 :]
    parser = argparse.ArgumentParser(add_help=False)
    add_model_flags(parser, SimEngineConfig)
    args = parser.parse_args(flags)
    config: SimEngineConfig = model_from_args(SimEngineConfig, args, None)
    update: dict[str, object] = {"engine_id": instance.spec().id, "seed": seed, "time_scale": 1.0}
    if stream_interval is not None:
        update["stream_interval"] = stream_interval
    return config.model_copy(update=update)


def scale_instances(
    instances: Sequence[InstanceConfig], total: int | None = None, counts: Mapping[str, int] | None = None
) -> list[InstanceConfig]:
    """``instances`` resized: to ``counts`` per role (``prefill``, ``decode``, ``both``, ``flex``;
    a role left out keeps its count), or to ``total`` keeping the groups' proportions (largest
    remainders; every group present keeps at least one). A group is the instances of one role
    (flex ones: of one role and one starting role); its new instances copy its first one under
    new ids and ports."""
    groups: dict[str, list[InstanceConfig]] = {}
    for inst in instances:
        groups.setdefault(_group(inst), []).append(inst)
    wanted = {key: len(group) for key, group in groups.items()}
    if total is not None:
        wanted = _proportional(wanted, total)
    for role, count in (counts or {}).items():
        keys = [key for key in groups if key.split(":")[0] == role]
        if count > 0 and not keys:
            raise ValueError(f"the fleet has no {role} instance to copy (give a config with one)")
        if len(keys) > 1:
            raise ValueError(f"the fleet's {role} instances start in several roles: resize it with --instances")
        if keys:
            wanted[keys[0]] = count
    if sum(wanted.values()) < 1:
        raise ValueError("the fleet needs at least one instance")
    ports = iter(range(FIRST_PORT, FIRST_PORT + 100_000, 3))
    out: list[InstanceConfig] = []
    for key, group in groups.items():
        out.extend(group[: wanted[key]])
        name = key.replace(":", "-")
        for n in range(len(group), wanted[key]):
            out.append(copy_instance(group[0], f"{name}-{n}", next(ports)))
    return out


def resized(config: GatewayConfig, total: int | None = None, counts: Mapping[str, int] | None = None) -> GatewayConfig:
    """``config`` with every instance made simulable (:func:`simulated_instance`) and the fleet
    resized as :func:`scale_instances` says (unchanged without ``total`` or ``counts``), checked
    as a config file would be."""
    instances = [simulated_instance(i) for i in config.instances]
    if total is not None or counts:
        instances = scale_instances(instances, total, counts)
    return GatewayConfig.model_validate({**config.model_dump(), "instances": [i.model_dump() for i in instances]})


def role_counts(instances: Iterable[InstanceConfig]) -> dict[str, int]:
    """Instances per config role (``prefill``, ``decode``, ``both``, ``flex``), the roles present only."""
    counts: dict[str, int] = {}
    for inst in instances:
        counts[inst.role] = counts.get(inst.role, 0) + 1
    return counts


def _group(inst: InstanceConfig) -> str:
    return f"flex:{inst.start_role}" if inst.role == "flex" else inst.role


def _proportional(counts: Mapping[str, int], total: int) -> dict[str, int]:
    present = [key for key, n in counts.items() if n > 0]
    if total < len(present):
        raise ValueError(f"--instances {total}: the fleet has {len(present)} roles, each needs an instance")
    size = sum(counts.values())
    shares = {key: total * counts[key] / size for key in present}
    result = {key: max(1, int(share)) for key, share in shares.items()}
    by_remainder = sorted(present, key=lambda k: (-(shares[k] - int(shares[k])), list(counts).index(k)))
    i = 0
    while sum(result.values()) < total:
        result[by_remainder[i % len(present)]] += 1
        i += 1
    while sum(result.values()) > total:  # every group was raised to one: take from the largest
        largest = max(present, key=lambda k: result[k])
        result[largest] -= 1
    return result


def copy_instance(template: InstanceConfig, instance_id: str, port: int, **changes: object) -> InstanceConfig:
    """``template`` (with ``changes``) under a new id, its URL on ``port`` and its KV-event and
    bootstrap ports the two after it."""
    host = urlsplit(template.url).hostname or "127.0.0.1"
    update: dict[str, object] = {**changes, "id": instance_id, "url": f"http://{host}:{port}"}
    if template.kv_events is not None:
        update["kv_events"] = template.kv_events.model_copy(
            update={"endpoint": f"tcp://*:{port + 1}", "replay_endpoint": None}
        )
    if template.bootstrap_port is not None:
        update["bootstrap_port"] = port + 2
    return template.model_copy(update=update)


class KvEventBus:
    """KV events from the simulated engines to the gateway's feed, in memory (one loop turn later)."""

    def __init__(self) -> None:
        self._sinks: dict[str, KvEventSink] = {}

    def publisher(self, instance_id: str) -> Callable[[float, list[KvCacheEvent]], None]:
        def publish(ts: float, events: list[KvCacheEvent]) -> None:
            sink = self._sinks.get(instance_id)
            if sink is not None:
                asyncio.get_running_loop().call_soon(sink.apply, instance_id, events)

        return publish

    def feed(self, sink: KvEventSink, sources: Iterable[KvEventSource]) -> MemoryKvFeed:
        """The gateway's KV-event feed (``Cluster(kv_feed=bus.feed)``)."""
        return MemoryKvFeed(self, sink, sources)

    def follow(self, instance_id: str, sink: KvEventSink) -> None:
        self._sinks[instance_id] = sink

    def unfollow(self, instance_id: str) -> None:
        self._sinks.pop(instance_id, None)


class MemoryKvFeed:
    """:class:`~pdgate.adapters.kv_events.KvEventFeed` over a :class:`KvEventBus`."""

    def __init__(self, bus: KvEventBus, sink: KvEventSink, sources: Iterable[KvEventSource]) -> None:
        self._bus = bus
        self._sink = sink
        self._pending = list(sources)
        self._following: set[str] = set()

    async def start(self) -> None:
        for source in self._pending:
            await self.add(source)
        self._pending.clear()

    async def add(self, source: KvEventSource) -> None:
        self._bus.follow(source.instance_id, self._sink)
        self._following.add(source.instance_id)

    async def remove(self, instance_id: str, *, forget: bool = True) -> None:
        self._bus.unfollow(instance_id)
        self._following.discard(instance_id)
        if forget:
            self._sink.forget(instance_id)

    async def close(self) -> None:
        for instance_id in list(self._following):
            await self.remove(instance_id, forget=False)


@dataclass
class SimulatedEngine:
    instance: InstanceConfig
    state: SimState
    host: str
    port: int

    @property
    def id(self) -> str:
        return self.instance.spec().id


class SimulatedFleet:
    """The engines of a simulation: built from the instances, started and closed together."""

    def __init__(
        self, transport: MemoryTransport, bus: KvEventBus, seed: int = 0, stream_interval: int | None = None
    ) -> None:
        self.transport = transport
        self.bus = bus
        self.seed = seed
        self.stream_interval = stream_interval
        self.engines: dict[str, SimulatedEngine] = {}
        self._by_origin: dict[tuple[str, int], SimState] = {}
        self._peers = LocalPeerLink(self._find, hop_s=transport.hop_s)
        self._retired_steps = 0
        self._tokenizers: dict[str, Tokenizer] = {}  # one per name, shared by the engines

    @property
    def steps(self) -> int:
        """Steps every engine of the run took (stopped ones included)."""
        return self._retired_steps + sum(e.state.engine.steps for e in self.engines.values())

    def _find(self, host: str, port: int) -> SimState | None:
        return self._by_origin.get((host, int(port)))

    async def add(self, instance: InstanceConfig) -> SimulatedEngine:
        """Build and start the engine of ``instance`` and serve it on its URL's origin."""
        config = engine_config(instance, self.seed + len(self.engines), self.stream_interval)
        tokenizer = self._tokenizers.get(config.tokenizer)
        if tokenizer is None:
            tokenizer = self._tokenizers[config.tokenizer] = load_tokenizer(config.tokenizer)
        state = build_state(config, clock=LoopClock(), tokenizer=tokenizer)
        url = urlsplit(instance.url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        state.bound_port = port
        state.peers = self._peers
        engine = SimulatedEngine(instance, state, host, port)
        if instance.kv_events is not None:
            state.engine.set_event_publisher(self.bus.publisher(engine.id))
        self._serve(state, host, port)
        if config.resolved_bootstrap_port() is not None:
            self._by_origin[(host, int(config.resolved_bootstrap_port() or 0))] = state
        self._by_origin[(host, port)] = state
        self.engines[engine.id] = engine
        await state.engine.start()
        return engine

    def _serve(self, state: SimState, host: str, port: int) -> None:
        async def answer(method: str, path: str, headers: dict[str, str], body: bytes, reply: MemoryReply) -> None:
            await call_local(state, method, path, headers, body, EngineReply(reply))

        self.transport.serve(host, port, answer)

    async def stop(self, instance_id: str) -> None:
        """Kill one engine: its origin stops answering and its requests end."""
        engine = self.engines.pop(instance_id)
        self.transport.unserve(engine.host, engine.port)
        for key in [k for k, v in self._by_origin.items() if v is engine.state]:
            del self._by_origin[key]
        await close_local(engine.state)
        self._retired_steps += engine.state.engine.steps

    async def close(self) -> None:
        for instance_id in list(self.engines):
            await self.stop(instance_id)
