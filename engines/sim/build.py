"""Assembles one simulated engine: :func:`build_state` builds its :class:`SimState` and wires the hooks.

The engine's KV puller (a decode leg's KV comes from its PD prefill peer, :mod:`engines.sim.handoff`,
or from a live migration's source, :mod:`engines.sim.migration`) and the core's finish hook (a
finished prefill leg's KV becomes ready for its decode peer) are set here, so that
:mod:`engines.sim.state` stays plain data that those modules depend on.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable

from pdgate.common.perf_model import resolve_profile
from pdgate.common.tokenizer import Tokenizer, load_tokenizer
from pdgate.engines.sim.config import SimEngineConfig
from pdgate.engines.sim.core import CoreConfig, EngineCore
from pdgate.engines.sim.engine import AsyncSimEngine, Clock, RealtimeClock
from pdgate.engines.sim.generation import LengthModel, TokenGenerator
from pdgate.engines.sim.handoff import on_request_finished, pull_kv
from pdgate.engines.sim.kv_cache import KVCacheManager
from pdgate.engines.sim.lora import LoraRegistry
from pdgate.engines.sim.metrics import SglangMetrics, SimMetrics, VllmMetrics
from pdgate.engines.sim.migration import is_migration, pull_migrated_kv
from pdgate.engines.sim.migration_state import MigrationState
from pdgate.engines.sim.protocol import ApiError
from pdgate.engines.sim.request import SimRequest
from pdgate.engines.sim.state import SimState


def build_state(config: SimEngineConfig, clock: Clock | None = None, tokenizer: Tokenizer | None = None) -> SimState:
    """Assemble tokenizer, performance profile, KV cache, step loop and metrics (no I/O).

    ``clock``: the engine's simulated time; by default wall time scaled by ``config.time_scale``
    (:class:`RealtimeClock`), in-process on a virtual-time loop a :class:`~engines.sim.engine.LoopClock`.
    The state's ``rng`` is seeded from ``config.seed`` and the engine id, so a run is reproducible
    when both are fixed (``config.engine_id`` is random when not given). ``bound_port`` starts as
    ``config.port``: the address peers use in-process; the HTTP server replaces it with the port bound.
    ``peers`` is left unset: the server or the in-process caller wires it.
     ``tokenizer`` (the one ``config.tokenizer`` names, already loaded)
    lets engines in one process share it."""
    profile = resolve_profile(config.profile or None, model=config.model, gpu=config.gpu, tp=config.tp)
    tokenizer = tokenizer or load_tokenizer(config.tokenizer)
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
        hash_algo=config.prefix_caching_hash_algo,
        max_loras=config.max_loras if config.enable_lora else None,
    )
    core = EngineCore(core_config, kv, profile, generator)
    served = config.served_model_name or profile.model.name
    loras = _static_loras(config, served) if config.enable_lora else None
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
            "prefix_caching_hash_algo": config.prefix_caching_hash_algo,
        }
        metrics = VllmMetrics(core, served, cache_info, max_loras=config.max_loras if loras is not None else None)
    if clock is None:
        clock = RealtimeClock(config.time_scale)
    engine_id = config.resolved_engine_id()

    def kv_puller(req: SimRequest) -> Awaitable[None]:  # a decode leg's KV: a PD peer's or a migration source's
        return pull_migrated_kv(state, req) if is_migration(req) else pull_kv(state, req)

    engine = AsyncSimEngine(
        core,
        clock,
        kv_puller=kv_puller,
        kv_load_failure_policy=config.kv_load_failure_policy,
        observer=metrics,
        stream_interval=config.stream_interval,
    )
    state = SimState(
        config=config,
        tokenizer=tokenizer,
        profile=profile,
        core=core,
        engine=engine,
        metrics=metrics,
        migration=MigrationState(metrics.registry),
        clock=clock,
        engine_id=engine_id,
        served_model_name=served,
        max_model_len=max_model_len,
        rng=random.Random(f"sim-engine:{config.seed}:{engine_id}"),
        bound_port=config.port,
        loras=loras,
    )
    core.on_finish(lambda req: on_request_finished(state, req))
    return state


def _static_loras(config: SimEngineConfig, served: str) -> LoraRegistry:
    """The adapter registry with ``--lora-modules`` loaded (vLLM's ``init_static_loras``: one that cannot load
    stops the start with ``ValueError``)."""
    registry = LoraRegistry([served])
    for module in config.static_lora_modules():
        try:
            registry.load(module.name, module.path, base_model_name=module.base_model_name)
        except ApiError as exc:
            raise ValueError(exc.message) from None
    return registry
