"""Everything one simulated engine process owns, and small helpers its HTTP routes share.

Plain data: :func:`engines.sim.build.build_state` assembles a :class:`SimState` and wires the
PD hand-off (:mod:`engines.sim.handoff`) and live migration (:mod:`engines.sim.migration`) into
its engine; those modules and the routes depend on this one, never the other way round.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from pdgate.common.perf_model import EngineProfile
from pdgate.common.tokenizer import Tokenizer
from pdgate.engines.sim.config import SimEngineConfig
from pdgate.engines.sim.core import EngineCore
from pdgate.engines.sim.engine import AsyncSimEngine, RealtimeClock
from pdgate.engines.sim.kv_events import KvEventPublisher
from pdgate.engines.sim.metrics import SimMetrics
from pdgate.engines.sim.migration_state import MigrationState
from pdgate.engines.sim.protocol import ApiError, error_body

if TYPE_CHECKING:
    from pdgate.engines.sim.tracing import RequestTracer

SIM_STATE: web.AppKey[SimState] = web.AppKey("sim_state")
TRACE_LOG_SIZE = 1024  # generation requests whose trace headers /sim/traces keeps


@dataclass
class Handoff:
    """A finished prefill leg whose KV waits for (or was taken by) its decode peer."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    taken: asyncio.Event = field(default_factory=asyncio.Event)
    block_ids: list[int] = field(default_factory=list)


@dataclass
class SimState:
    """Everything one engine process owns; built by :func:`engines.sim.build.build_state`."""

    config: SimEngineConfig
    tokenizer: Tokenizer
    profile: EngineProfile
    core: EngineCore
    engine: AsyncSimEngine
    metrics: SimMetrics
    migration: MigrationState
    clock: RealtimeClock
    engine_id: str
    served_model_name: str
    max_model_len: int
    publisher: KvEventPublisher | None = None
    session: aiohttp.ClientSession | None = None
    handoffs: dict[str, Handoff] = field(default_factory=dict)
    bound_port: int = 0
    tracer: RequestTracer | None = None  # set while the engine runs with --otlp-traces-endpoint
    traces: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=TRACE_LOG_SIZE))
    """Trace headers of the latest generation requests, oldest first (``GET /sim/traces``)."""

    def handoff(self, key: str) -> Handoff:
        entry = self.handoffs.get(key)
        if entry is None:
            entry = self.handoffs[key] = Handoff()
        return entry


def route(fn: Callable[[SimState, web.Request], Any]) -> Callable[[web.Request], Any]:
    """Adapt ``fn(state, request)`` to an aiohttp handler that answers ApiError as error JSON."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        state = request.app[SIM_STATE]
        try:
            return await fn(state, request)
        except ApiError as err:
            return web.json_response(error_body(err, state.config.api), status=err.status)

    return wrapped


def check_auth(state: SimState, request: web.Request) -> None:
    key = state.config.api_key
    if key is None:
        return
    supplied = request.headers.get("Authorization", "")
    if not secrets.compare_digest(supplied.encode(), f"Bearer {key}".encode()):
        raise ApiError(401, "invalid or missing API key", err_type="AuthenticationError")
