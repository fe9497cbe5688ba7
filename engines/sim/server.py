"""The simulated engine's HTTP server: vLLM's (or SGLang's) API over the step loop.

Routes (both flavours): ``/v1/completions``, ``/v1/chat/completions`` (SSE and JSON),
``/v1/models``, ``/health``, ``/tokenize``, ``/detokenize``, ``/metrics``, ``/version``;
vLLM: ``/reset_prefix_cache``; SGLang: ``/health_generate``, ``/get_model_info``,
``/get_server_info``, ``/flush_cache``. Simulator-only routes live under ``/sim/``:
``/sim/state`` (a JSON snapshot for tests and operators), ``/sim/traces`` (the W3C trace headers
of the latest generation requests), ``/sim/kv/read`` (the side channel
a decode peer pulls a held prefill's KV through) and the live-migration routes ``/sim/migrate``,
``/sim/migrate/reserve``, ``/sim/migrate/release``, ``/sim/migrations`` (see :mod:`engines.sim.migration`,
served by :mod:`engines.sim.migration_routes`). An SGLang-flavour prefill engine also serves a
bootstrap server on its bootstrap port (``/route``, ``/health``, ``/sim/bootstrap/{room}``).
See :mod:`engines.sim.handoff` for the PD protocols.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from pdgate.engines.sim.build import build_state
from pdgate.engines.sim.config import SimEngineConfig
from pdgate.engines.sim.handoff import (
    handle_bootstrap_health,
    handle_bootstrap_room,
    handle_bootstrap_route,
    handle_kv_read,
)
from pdgate.engines.sim.kv_events import KvEventPublisher
from pdgate.engines.sim.migration_routes import (
    handle_migrate,
    handle_migrations,
    handle_release,
    handle_reserve,
)
from pdgate.engines.sim.peers import HttpPeerLink
from pdgate.engines.sim.routes_generate import handle_chat, handle_completions
from pdgate.engines.sim.routes_info import (
    handle_detokenize,
    handle_get_model_info,
    handle_get_server_info,
    handle_health,
    handle_metrics,
    handle_models,
    handle_reset_prefix_cache,
    handle_state,
    handle_tokenize,
    handle_traces,
    handle_version,
)
from pdgate.engines.sim.routes_lora import lora_routes
from pdgate.engines.sim.routes_pooling import handle_embeddings, handle_rerank, handle_score
from pdgate.engines.sim.state import SIM_STATE, SimState, reply_route, route

MAX_BODY_BYTES = 64 * 1024 * 1024


def create_app(state: SimState) -> web.Application:
    """The engine's HTTP application; its cleanup context starts and stops the engine."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SIM_STATE] = state
    api = state.config.api
    if state.config.runner == "pooling":  # a pooling model serves vectors and scores, not tokens
        routes = [
            web.post("/v1/embeddings", route(handle_embeddings)),
            web.post("/v1/score", route(handle_score)),
            web.post("/score", route(handle_score)),
            web.post("/v1/rerank", route(handle_rerank)),
            web.post("/rerank", route(handle_rerank)),
        ]
    else:
        routes = [
            web.post("/v1/completions", reply_route(handle_completions)),
            web.post("/v1/chat/completions", reply_route(handle_chat)),
        ]
    routes += lora_routes(state)
    routes += [
        web.get("/v1/models", route(handle_models)),
        web.get("/health", route(handle_health)),
        web.get("/version", route(handle_version)),
        web.post("/tokenize", route(handle_tokenize)),
        web.post("/detokenize", route(handle_detokenize)),
        web.get("/metrics", reply_route(handle_metrics)),
        web.get("/sim/state", route(handle_state)),
        web.get("/sim/traces", route(handle_traces)),
        web.post("/sim/kv/read", route(handle_kv_read)),
        web.post("/sim/migrate", reply_route(handle_migrate)),
        web.post("/sim/migrate/reserve", route(handle_reserve)),
        web.post("/sim/migrate/release", route(handle_release)),
        web.get("/sim/migrations", route(handle_migrations)),
    ]
    if api == "vllm":
        routes.append(web.post("/reset_prefix_cache", route(handle_reset_prefix_cache)))
    else:
        routes += [
            web.get("/health_generate", route(handle_health)),
            web.get("/get_model_info", route(handle_get_model_info)),
            web.get("/get_server_info", route(handle_get_server_info)),
            web.post("/flush_cache", route(handle_reset_prefix_cache)),
        ]
    app.add_routes(routes)
    app.cleanup_ctx.append(_engine_lifecycle)
    return app


def create_bootstrap_app(state: SimState) -> web.Application:
    app = web.Application()
    app[SIM_STATE] = state
    app.add_routes(
        [
            web.get("/route", route(handle_bootstrap_route)),
            web.get("/health", route(handle_bootstrap_health)),
            web.get("/sim/bootstrap/{room}", route(handle_bootstrap_room)),
        ]
    )
    return app


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[SIM_STATE]
    session = aiohttp.ClientSession()
    state.peers = HttpPeerLink(session)
    if state.config.kv_events_endpoint:
        state.publisher = KvEventPublisher(
            state.config.kv_events_endpoint,
            replay_endpoint=state.config.kv_events_replay_endpoint,
            topic=state.config.kv_events_topic,
        )
        await state.publisher.start()
        state.engine.set_event_publisher(state.publisher.publish)
    if state.config.otlp_traces_endpoint:  # import the OpenTelemetry SDK only when asked for
        from pdgate.engines.sim.tracing import RequestTracer

        state.tracer = RequestTracer(state.config.otlp_traces_endpoint, state.clock.now)
        state.core.on_finish(state.tracer.finish)
    await state.engine.start()
    try:
        yield
    finally:
        state.migration.close()
        await state.engine.close()
        if state.publisher is not None:
            await state.publisher.close()
        if state.tracer is not None:
            await asyncio.to_thread(state.tracer.shutdown)  # flushes the spans still queued
        await session.close()


class SimServer:
    """Runs one engine's HTTP site (and an SGLang prefill's bootstrap site) on this loop.

    ``ssl_context``: serve the engine's API over HTTPS (as vLLM's ``--ssl-certfile``); the
    bootstrap site and the simulator's engine-to-engine calls (KV reads, migration) stay plain
    HTTP, so a TLS engine serves whole requests, not PD hand-offs.
    """

    def __init__(self, config: SimEngineConfig, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.ssl_context = ssl_context
        self.state = build_state(config)
        self._runners: list[web.AppRunner] = []
        self.bootstrap_port: int | None = None  # the SGLang bootstrap port bound (``--bootstrap-port 0``: a free one)

    @property
    def port(self) -> int:
        return self.state.bound_port

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.config.host}:{self.port}"

    async def start(self) -> None:
        runner = web.AppRunner(create_app(self.state), handler_cancellation=True, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.config.host, self.config.port, ssl_context=self.ssl_context)
        await site.start()
        self.state.bound_port = runner.addresses[0][1]
        bootstrap_port = self.config.resolved_bootstrap_port()
        if bootstrap_port is not None:
            boot = web.AppRunner(create_bootstrap_app(self.state), handler_cancellation=True, access_log=None)
            await boot.setup()
            self._runners.append(boot)
            await web.TCPSite(boot, self.config.host, bootstrap_port).start()
            self.bootstrap_port = boot.addresses[0][1]

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
