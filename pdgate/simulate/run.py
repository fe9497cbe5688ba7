"""One simulation: the gateway's own code, the simulated fleet and the load generator, in one
process on a virtual clock.

:func:`simulate` builds the gateway from its config exactly as ``pdgate serve`` does
(:func:`~pdgate.gateway.app.build_gateway`, :class:`~pdgate.gateway.server.GatewayServer`) with
three things swapped behind their interfaces: the engines are reached through the in-memory
transport, KV events through the in-memory bus, and every clock is the loop's. The load generator
(:func:`~pdgate.loadgen.runner.run_load`) sends the workload through the same transport. Run it on
a :class:`~pdgate.common.virtual_time.VirtualClockLoop` (:func:`run_simulation`) and no time is
spent waiting: the clock jumps to the next timer whenever every task waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pdgate.common.virtual_time import run_virtual
from pdgate.gateway.app import build_gateway
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.migration import MigrationController
from pdgate.gateway.server import EngineLinks, GatewayServer
from pdgate.loadgen.client import Target
from pdgate.loadgen.runner import LoadConfig, run_load
from pdgate.loadgen.types import BenchRequest, RequestResult
from pdgate.scheduler.registry import PluginRegistry
from pdgate.simulate.fleet import KvEventBus, SimulatedFleet
from pdgate.simulate.memory import MemoryTransport, gateway_endpoint

TARGET_NAME = "pdgate-sim"


@dataclass(frozen=True)
class HopCosts:
    """What the simulation charges, in virtual time, for the CPU and network that real hosts spend
    between the parts: ``hop_s`` for every request from one part to another (client to gateway,
    gateway to engine, engine to engine), and ``gateway_s_per_kib`` per KiB of a client's request
    body (the gateway parses, tokenizes and hashes the prompt). Zero: the pure model."""

    hop_s: float = 0.0
    gateway_s_per_kib: float = 0.0


@dataclass
class FleetSample:
    """One instance at one moment of the run (simulated seconds from the start)."""

    t: float
    instance: str
    role: str
    running: int
    waiting: int
    kv_usage: float
    inflight: int
    draining: bool
    busy_s: float  # the engine's modelled busy time so far (its utilisation: the slope)
    migrations_in: int  # requests moved here so far (live migration)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class SimulationResult:
    """What a simulation produced: the client's results (as ``pdgate bench`` records them), the
    fleet's series, and what the run cost."""

    results: list[RequestResult]
    samples: list[FleetSample]
    migrations: int
    migrations_failed: int
    simulated_s: float
    wall_s: float
    cpu_s: float
    instances: int
    steps: int
    gateway_metrics: str = ""  # the gateway's /metrics at the end of the run
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Simulated seconds per wall second."""
        return self.simulated_s / self.wall_s if self.wall_s else 0.0


class FleetSampler:
    """Samples every instance's state every ``interval_s`` simulated seconds (a task it owns)."""

    def __init__(self, cluster: Cluster, fleet: SimulatedFleet, interval_s: float, clock: Callable[[], float]) -> None:
        self.cluster = cluster
        self.fleet = fleet
        self.interval_s = interval_s
        self.clock = clock
        self.start = clock()
        self.samples: list[FleetSample] = []
        self._task: asyncio.Task[None] | None = None

    def start_sampling(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="fleet-sampler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def sample(self) -> None:
        t = self.clock() - self.start
        for instance_id, state in self.cluster.instances.items():
            engine = self.fleet.engines.get(instance_id)
            if engine is None:
                continue
            core = engine.state.core
            self.samples.append(
                FleetSample(
                    t=round(t, 6),
                    instance=instance_id,
                    role=state.role,
                    running=core.num_running,
                    waiting=core.num_waiting,
                    kv_usage=round(core.kv.usage, 4),
                    inflight=state.inflight_requests,
                    draining=state.draining,
                    busy_s=round(engine.state.engine.busy_seconds, 6),
                    migrations_in=engine.state.migration.migrated_in,
                )
            )


def simulation_config(config: GatewayConfig, cost_model_dir: str | None = None) -> GatewayConfig:
    """The gateway config as a simulation runs it: no shared state (one replica), no tracing, the
    cost model starting from its priors (or ``cost_model_dir``) and keeping nothing on disk, and
    a scaling plan computed but carried out by nobody (actuator ``none``: nothing is started)."""
    cost_model = config.cost_model.model_copy(update={"dir": cost_model_dir, "log_requests": False})
    sharing = config.sharing.model_copy(update={"enabled": False})
    tracing = config.tracing.model_copy(update={"enabled": False})
    actuator = config.scaling.actuator.model_copy(update={"type": "none", "parameters": {}})
    scaling = config.scaling.model_copy(update={"actuator": actuator})
    return config.model_copy(
        update={"cost_model": cost_model, "sharing": sharing, "tracing": tracing, "scaling": scaling}
    )


async def simulate(
    config: GatewayConfig,
    requests: Sequence[BenchRequest],
    load: LoadConfig,
    *,
    seed: int = 0,
    sample_interval_s: float = 1.0,
    stream_interval: int | None = None,
    costs: HopCosts = HopCosts(),
    on_result: Callable[[RequestResult], None] | None = None,
) -> SimulationResult:
    """Run ``requests`` through the gateway of ``config`` over its simulated fleet (see the module
    doc). ``stream_interval`` overrides every engine's (tokens streamed together: fewer events)."""
    loop = asyncio.get_running_loop()
    random.seed(seed)  # the adapters' draws (SGLang bootstrap rooms) come from the module's generator
    wall0, cpu0, sim0 = time.monotonic(), time.process_time(), loop.time()
    transport, bus = MemoryTransport(hop_s=costs.hop_s), KvEventBus()
    fleet = SimulatedFleet(transport, bus, seed, stream_interval)
    server: GatewayServer | None = None
    sampler: FleetSampler | None = None
    try:
        for instance in config.instances:
            await fleet.add(instance)
        links = EngineLinks(upstream=transport.view, kv_feed=bus.feed, clock=loop.time, inline_refits=True)
        gateway = build_gateway(config, PluginRegistry(seed=seed))
        server = GatewayServer(gateway, links=links, listen=False)
        await server.start()
        assert server.app is not None and server.gateway.cluster is not None
        endpoint = gateway_endpoint(server.app, request_ids=f"sim{seed}-")
        transport.serve(config.host, config.port, endpoint, s_per_kib=costs.gateway_s_per_kib)
        sampler = FleetSampler(server.gateway.cluster, fleet, sample_interval_s, loop.time)
        sampler.start_sampling()
        model = config.models[0].name
        target = Target(TARGET_NAME, f"http://{config.host}:{config.port}", model)
        results, _ = await run_load(target, requests, load, on_result=on_result, upstream=transport, clock=loop.time)
        sampler.sample()
        gw = server.gateway
        assert gw.cluster is not None
        metrics_text = gw.metrics.render(gw.cluster, gw.admission, gw.costs).decode()
    finally:
        if sampler is not None:
            await sampler.close()
        if server is not None:
            await server.stop()
        await fleet.close()
        await transport.close()
    migrations: MigrationController | None = server.gateway.migrations if server is not None else None
    return SimulationResult(
        results=results,
        samples=sampler.samples if sampler is not None else [],
        migrations=migrations.moved if migrations is not None else 0,
        migrations_failed=migrations.failed if migrations is not None else 0,
        simulated_s=loop.time() - sim0,
        wall_s=time.monotonic() - wall0,
        cpu_s=time.process_time() - cpu0,
        instances=len(config.instances),
        steps=fleet.steps,
        gateway_metrics=metrics_text,
    )


@contextlib.contextmanager
def _collector_for_long_runs() -> Iterator[None]:
    """A simulation allocates millions of short-lived objects among a large, long-lived heap (the
    engines' KV blocks, the gateway's records): collect the young generation less often and keep
    what exists at the start out of full collections (about a tenth of the run's CPU). Restored after."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def run_simulation(
    config: GatewayConfig,
    requests: Sequence[BenchRequest],
    load: LoadConfig,
    *,
    seed: int = 0,
    sample_interval_s: float = 1.0,
    stream_interval: int | None = None,
    costs: HopCosts = HopCosts(),
    on_result: Callable[[RequestResult], None] | None = None,
    quiet: bool = True,
) -> SimulationResult:
    """:func:`simulate` on a fresh virtual-clock loop (its own ``asyncio`` run)."""
    logger = logging.getLogger("pdgate")
    level = logger.level
    if quiet:  # the gateway's per-request warnings (rejections, retries) would flood the terminal
        logger.setLevel(logging.ERROR)
    try:
        with _collector_for_long_runs():
            return run_virtual(
                simulate(
                    config,
                    requests,
                    load,
                    seed=seed,
                    sample_interval_s=sample_interval_s,
                    stream_interval=stream_interval,
                    costs=costs,
                    on_result=on_result,
                )
            )
    finally:
        logger.setLevel(level)
