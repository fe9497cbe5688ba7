"""The gateway's aiohttp application: routes, auth, error shape and lifecycle."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from engines.sim.tokenizer import Tokenizer, load_tokenizer
from gateway.cluster import Cluster
from gateway.config import DEFAULT_SCHEDULING, GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.proxy import Proxy
from gateway.requests import GatewayError
from scheduler.framework import Profile
from scheduler.registry import PluginRegistry

log = logging.getLogger("pdgate.gateway")

REQUIRED_PROFILES = ("prefill", "decode", "colocated")


@dataclass
class Gateway:
    """Everything one gateway owns. Built by :func:`build_gateway`; started by the app."""

    config: GatewayConfig
    profiles: dict[str, Profile]
    tokenizers: dict[str, Tokenizer]
    metrics: GatewayMetrics
    session: aiohttp.ClientSession | None = None
    cluster: Cluster | None = None
    proxy: Proxy | None = None
    started_at: float = 0.0


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")


def build_gateway(config: GatewayConfig, registry: PluginRegistry | None = None) -> Gateway:
    """Validate plugins and load tokenizers up front, so a bad config fails before serving."""
    registry = registry or PluginRegistry()
    scheduling = config.scheduling or DEFAULT_SCHEDULING
    profiles = registry.build(scheduling)
    missing = [p for p in REQUIRED_PROFILES if p not in profiles]
    if missing:
        raise ValueError(f"scheduling.profiles: missing profile(s) {missing} (needed: {list(REQUIRED_PROFILES)})")
    tokenizers = {m.name: load_tokenizer(m.tokenizer) for m in config.models}
    return Gateway(config, profiles, tokenizers, GatewayMetrics())


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as err:
        return err.response()
    except web.HTTPRequestEntityTooLarge as exc:
        return GatewayError(413, f"request body too large: {exc.text}").response()
    except web.HTTPNotFound:
        return GatewayError(404, f"no route {request.method} {request.path}").response()
    except web.HTTPMethodNotAllowed:
        return GatewayError(405, f"method {request.method} not allowed on {request.path}").response()
    except web.HTTPException:
        raise
    except Exception:  # never a bare 500: log it and answer in OpenAI's shape
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return GatewayError(500, "internal error in the gateway (logged)", err_type="server_error").response()


def auth_middleware(keys: list[str]) -> Callable:
    encoded = [k.encode() for k in keys]

    @web.middleware
    async def check(request: web.Request, handler: Callable) -> web.StreamResponse:
        if encoded and request.path.startswith("/v1/"):
            supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip().encode()
            # compare against every key so timing does not reveal which prefix matched
            if not any([hmac.compare_digest(supplied, key) for key in encoded]):
                raise GatewayError(401, "invalid or missing API key", code="invalid_api_key")
        return await handler(request)

    return check


async def completions(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].proxy.handle(request, "completion")  # type: ignore[union-attr]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].proxy.handle(request, "chat")  # type: ignore[union-attr]


async def models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    created = int(gw.started_at)
    data = [{"id": m.name, "object": "model", "created": created, "owned_by": "pdgate", "root": m.name,
             "max_model_len": m.max_model_len} for m in gw.config.models]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    assert gw.cluster is not None
    status = {m.name: gw.cluster.ready(m.name) for m in gw.config.models}
    code = 200 if all(status.values()) else 503
    headers = {} if code == 200 else {"Retry-After": "1"}
    return web.json_response({"ready": code == 200, "models": status}, status=code, headers=headers)


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    assert gw.cluster is not None
    return web.Response(body=gw.metrics.render(gw.cluster), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
    gw.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    gw.cluster = Cluster(gw.config, gw.session)
    gw.proxy = Proxy(gw.config, gw.cluster, gw.profiles, gw.tokenizers, gw.metrics)
    gw.started_at = time.time()
    await gw.cluster.start()
    try:
        yield
    finally:
        await gw.cluster.close()
        await gw.session.close()


def create_app(gateway: Gateway) -> web.Application:
    app = web.Application(
        client_max_size=gateway.config.max_body_bytes,
        middlewares=[errors_middleware, auth_middleware(gateway.config.client_api_keys())],
    )
    app[GATEWAY] = gateway
    app.add_routes([
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat_completions),
        web.get("/v1/models", models),
        web.get("/health", health),
        web.get("/ready", ready),
        web.get("/metrics", metrics),
    ])
    app.cleanup_ctx.append(_lifecycle)
    return app


class GatewayServer:
    """Runs the gateway's site on this loop."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.gateway.config.host}:{self.port}"

    async def start(self) -> None:
        self._runner = web.AppRunner(create_app(self.gateway), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.gateway.config.host, self.gateway.config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
