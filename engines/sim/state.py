"""Everything one simulated engine process owns, and small helpers its HTTP routes share."""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from pdgate.common.perf_model import EngineProfile, resolve_profile
from pdgate.common.tokenizer import Tokenizer, load_tokenizer
from pdgate.engines.sim.config import SimEngineConfig
from pdgate.engines.sim.core import CoreConfig, EngineCore
from pdgate.engines.sim.engine import AsyncSimEngine, RealtimeClock
from pdgate.engines.sim.generation import LengthModel, TokenGenerator
from pdgate.engines.sim.handoff import on_request_finished, pull_kv
from pdgate.engines.sim.kv_cache import KVCacheManager
from pdgate.engines.sim.kv_events import KvEventPublisher
from pdgate.engines.sim.metrics import SglangMetrics, SimMetrics, VllmMetrics
from pdgate.engines.sim.migration import MigrationState, is_migration, pull_migrated_kv
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
    """Everything one engine process owns; built by :func:`build_state`."""

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


def build_state(config: SimEngineConfig) -> SimState:
    """Assemble tokenizer, performance profile, KV cache, step loop and metrics (no I/O)."""
    profile = resolve_profile(config.profile or None, model=config.model, gpu=config.gpu, tp=config.tp)
    tokenizer = load_tokenizer(config.tokenizer)
    max_model_len = config.max_model_len or profile.model.max_model_len
    num_blocks = config.num_gpu_blocks or max(
        1, profile.kv_cache_tokens(config.gpu_memory_utilization) // config.block_size
    )
    if num_blocks * config.block_size < max_model_len:
        raise ValueError(
            f"max_model_len {max_model_len} is larger than the KV cache ({num_blocks} blocks x {config.block_size} "
            "tokens): lower max_model_len or give more blocks"
        )
    kv = KVCacheManager(num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching)
    generator = TokenGenerator(
        tokenizer.generatable_ids(),
        tokenizer.eos_token_id,
        LengthModel(median=config.output_len_median, sigma=config.output_len_sigma),
    )
    core_config = CoreConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=max_model_len,
        scheduling_policy=config.scheduling_policy,
        kv_hold_timeout=config.kv_hold_timeout_s,
    )
    core = EngineCore(core_config, kv, profile, generator)
    served = config.served_model_name or profile.model.name
    if config.api == "sglang":
        engine_type = {"both": "unified"}.get(config.role, config.role)
        metrics: SimMetrics = SglangMetrics(core, served, engine_type)
    else:
        cache_info = {
            "block_size": str(config.block_size),
            "num_gpu_blocks": str(num_blocks),
            "enable_prefix_caching": str(config.enable_prefix_caching),
            "gpu_memory_utilization": str(config.gpu_memory_utilization),
            "cache_dtype": "auto",
        }
        metrics = VllmMetrics(core, served, cache_info)
    clock = RealtimeClock(config.time_scale)
    state = SimState(
        config=config,
        tokenizer=tokenizer,
        profile=profile,
        core=core,
        engine=None,  # type: ignore[arg-type]  # set just below, it needs the state's puller
        metrics=metrics,
        migration=MigrationState(metrics.registry),
        clock=clock,
        engine_id=config.resolved_engine_id(),
        served_model_name=served,
        max_model_len=max_model_len,
    )
    state.engine = AsyncSimEngine(
        core,
        clock,
        kv_puller=lambda req: pull_migrated_kv(state, req) if is_migration(req) else pull_kv(state, req),
        kv_load_failure_policy=config.kv_load_failure_policy,
        observer=metrics,
    )
    core.on_finish(lambda req: on_request_finished(state, req))
    return state


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
