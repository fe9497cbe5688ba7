"""Everything one simulated engine owns, and small helpers its routes share.

Plain data: :func:`engines.sim.build.build_state` assembles a :class:`SimState` and wires the
PD hand-off (:mod:`engines.sim.handoff`) and live migration (:mod:`engines.sim.migration`) into
its engine; those modules and the routes depend on this one, never the other way round.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pdgate.common.json_codec import json_encoder
from pdgate.common.perf_model import EngineProfile
from pdgate.common.tokenizer import Tokenizer
from pdgate.engines.sim.config import SimEngineConfig
from pdgate.engines.sim.core import EngineCore
from pdgate.engines.sim.engine import AsyncSimEngine, Clock
from pdgate.engines.sim.kv_events import KvEventPublisher
from pdgate.engines.sim.lora import LoraRegistry, ServedAdapter
from pdgate.engines.sim.metrics import SimMetrics
from pdgate.engines.sim.migration_state import MigrationState
from pdgate.engines.sim.peer_link import PeerLink
from pdgate.engines.sim.protocol import ApiError
from pdgate.engines.sim.reply import AiohttpReply, Reply, respond

if TYPE_CHECKING:
    from pdgate.engines.sim.tracing import RequestTracer

SIM_STATE: web.AppKey[SimState] = web.AppKey("sim_state")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TRACE_LOG_SIZE = 1024  # generation requests whose trace headers /sim/traces keeps


@dataclass
class Handoff:
    """A finished prefill leg whose KV waits for (or was taken by) its decode peer."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    taken: asyncio.Event = field(default_factory=asyncio.Event)
    block_ids: list[int] = field(default_factory=list)


@dataclass
class SimState:
    """Everything one engine owns; built by :func:`engines.sim.build.build_state`.

    ``clock`` is the engine's simulated time (scaled wall time behind HTTP, the loop's virtual time
    in-process). ``peers`` reaches the other engines (PD KV pulls, migration reservations); the
    HTTP server sets an :class:`~engines.sim.peers.HttpPeerLink`, an in-process fleet a
    :class:`~engines.sim.peers.LocalPeerLink`. ``rng`` draws the engine's request ids and
    default sampling seeds (seeded from ``config.seed`` and the engine id). ``bound_port`` is the
    port peers reach this engine on (the port bound, or the configured one in-process).
    """

    config: SimEngineConfig
    tokenizer: Tokenizer
    profile: EngineProfile
    core: EngineCore
    engine: AsyncSimEngine
    metrics: SimMetrics
    migration: MigrationState
    clock: Clock
    engine_id: str
    served_model_name: str
    max_model_len: int
    rng: random.Random
    publisher: KvEventPublisher | None = None
    peers: PeerLink | None = None
    handoffs: dict[str, Handoff] = field(default_factory=dict)
    bound_port: int = 0
    tracer: RequestTracer | None = None  # set while the engine runs with --otlp-traces-endpoint
    traces: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=TRACE_LOG_SIZE))
    """Trace headers of the latest generation requests, oldest first (``GET /sim/traces``)."""
    json_encode: Callable[[Any], bytes] = field(default_factory=json_encoder)
    """Compact JSON for stream chunks (text as UTF-8, as vLLM's pydantic ``model_dump_json`` writes it)."""
    loras: LoraRegistry | None = None
    """The LoRA adapters served (``--enable-lora``); ``None`` without LoRA."""

    def new_id(self, prefix: str) -> str:
        """A fresh id ``prefix-<32 hex digits>`` (a uuid4's shape), drawn from :attr:`rng`."""
        return f"{prefix}-{self.rng.getrandbits(128):032x}"

    def resolve_model(self, model: str | None) -> ServedAdapter | None:
        """The adapter a request's ``model`` names, ``None`` for the base model (or no model);
        vLLM's 404 for any other name."""
        if model is None or model == self.served_model_name:
            return None
        adapter = self.loras.get(model) if self.loras is not None else None
        if adapter is None:
            aliases = f" Valid aliases: {self.served_model_name}." if self.config.api == "vllm" else ""
            raise ApiError(
                404, f"The model `{model}` does not exist.{aliases}", param="model", err_type="NotFoundError"
            )
        return adapter

    def handoff(self, key: str) -> Handoff:
        entry = self.handoffs.get(key)
        if entry is None:
            entry = self.handoffs[key] = Handoff()
        return entry


def route(fn: Callable[[SimState, web.Request], Awaitable[web.StreamResponse]]) -> Handler:
    """Adapt ``fn(state, request) -> response`` to an aiohttp handler that answers ApiError as error JSON."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        state = request.app[SIM_STATE]
        reply = AiohttpReply(request)
        answer: list[web.StreamResponse] = []

        async def run(_: Reply) -> None:
            answer.append(await fn(state, request))

        await respond(reply, state.config.api, run)
        return answer[0] if answer else _response_of(reply)

    return wrapped


def reply_route(fn: Callable[[SimState, web.Request, Reply], Awaitable[None]]) -> Handler:
    """Adapt ``fn(state, request, reply)``, which answers through its :class:`Reply`, to an aiohttp handler."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        state = request.app[SIM_STATE]
        reply = AiohttpReply(request)
        await respond(reply, state.config.api, lambda r: fn(state, request, r))
        return _response_of(reply)

    return wrapped


def _response_of(reply: AiohttpReply) -> web.StreamResponse:
    if reply.response is None:
        raise RuntimeError("the route returned without answering")
    return reply.response


def check_auth(state: SimState, headers: Mapping[str, str]) -> None:
    """401 unless ``headers`` (case-insensitive) carry the engine's API key, when it has one."""
    key = state.config.api_key
    if key is None:
        return
    supplied = headers.get("Authorization", "")
    if not secrets.compare_digest(supplied.encode(), f"Bearer {key}".encode()):
        raise ApiError(401, "invalid or missing API key", err_type="AuthenticationError")
