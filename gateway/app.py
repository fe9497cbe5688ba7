"""The gateway's HTTP application: routes, auth and error shape; what one gateway owns (:class:`Gateway`,
built by :func:`build_gateway`; run by :class:`~pdgate.gateway.server.GatewayServer`).

Served by :mod:`pdgate.common.http_server` (no web framework on the request path). Every error a client
gets is OpenAI's error JSON; an unknown path is a 404, a known path with the wrong method a 405.
"""

from __future__ import annotations

import hmac
import importlib.util
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdgate.gateway.discovery.kube_discovery import KubeDiscovery

from pdgate.adapters import Upstream
from pdgate.common.http_server import HttpRequest, Responder
from pdgate.common.tokenizer import Tokenizer, load_tokenizer
from pdgate.gateway.actuators import actuator_params
from pdgate.gateway.admin import AdminApi
from pdgate.gateway.admission import AdmissionController
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import DEFAULT_SCHEDULING, GatewayConfig
from pdgate.gateway.console import CONSOLE_ROUTES, ConsolePage, ConsoleState
from pdgate.gateway.costs import CostModelService
from pdgate.gateway.fleet import FleetManager
from pdgate.gateway.leadership import Leadership
from pdgate.gateway.load_sharing import LoadSharing
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.migration import MigrationController
from pdgate.gateway.nats_state import NatsState
from pdgate.gateway.openapi import openapi_document
from pdgate.gateway.passthrough import POOLING_ROUTES, TOKENIZER_ROUTES, PassThrough
from pdgate.gateway.peers import PeerStreams
from pdgate.gateway.proxy import Proxy
from pdgate.gateway.requests import GatewayError
from pdgate.gateway.role_balancing import RoleBalancing
from pdgate.gateway.scaling import Scaling
from pdgate.gateway.signal_sharing import SignalSharing
from pdgate.gateway.tenant_service import TenantService
from pdgate.gateway.tenant_sharing import TenantSharing
from pdgate.gateway.tracing import Tracing
from pdgate.gateway.tracing_setup import resolve_settings
from pdgate.scheduler.framework import Admitter, MigrationPolicy, Profile, ProfileHandler
from pdgate.scheduler.registry import PluginRegistry, SchedulingConfig

log = logging.getLogger("pdgate.gateway")

Route = Callable[[HttpRequest, Responder], Awaitable[None]]


@dataclass
class Gateway:
    """Everything one gateway owns. Built by :func:`build_gateway`; started by :class:`GatewayServer`."""

    config: GatewayConfig
    profiles: dict[str, Profile]
    tokenizers: dict[str, Tokenizer]
    metrics: GatewayMetrics
    admitter: Admitter
    migration_policy: MigrationPolicy
    profile_handler: ProfileHandler
    migrations: MigrationController | None = None
    fleet: FleetManager | None = None
    shared: NatsState | None = None
    load_sharing: LoadSharing | None = None
    peers: PeerStreams | None = None
    signals: SignalSharing | None = None
    leadership: Leadership | None = None
    roles: RoleBalancing | None = None  # the role balancer (role_balancer.enabled)
    scaling: Scaling | None = None  # the scaling plan and its actuator (scaling.enabled)
    pool: Upstream | None = None
    cluster: Cluster | None = None
    proxy: Proxy | None = None
    admission: AdmissionController | None = None
    costs: CostModelService | None = None
    tracing: Tracing | None = None
    tenants: TenantService | None = None  # tenants' budgets and fair share (tenants configured)
    tenant_sharing: TenantSharing | None = None  # their budgets shared with the other replicas
    discovery: KubeDiscovery | None = None  # engine pods found through the Kubernetes API (discovery.kubernetes)
    started_at: float = 0.0
    stopping: bool = False  # SIGTERM came: /ready answers 503 while the last requests finish


def build_gateway(config: GatewayConfig, registry: PluginRegistry | None = None) -> Gateway:
    """Validate plugins and load tokenizers up front, so a bad config fails before serving."""
    registry = registry or PluginRegistry()
    scheduling = config.scheduling or DEFAULT_SCHEDULING
    profiles = registry.build(scheduling)
    if not isinstance(scheduling, SchedulingConfig):
        scheduling = SchedulingConfig.model_validate(scheduling)
    handler = registry.create_profile_handler(scheduling.profile_handler, profiles)
    tokenizers = {m.name: load_tokenizer(m.tokenizer) for m in config.models}
    admitter = registry.create_admitter(config.admission.admitter, config.admission.parameters)
    resolve_settings(config.tracing)  # a tracing setup that cannot work fails here (TracingSetupError)
    if config.sharing.url() is not None and importlib.util.find_spec("nats") is None:
        raise ValueError("sharing.nats_url needs the NATS client: pip install 'pdgate[replicas]'")
    policy = registry.create_migration_policy(config.migration.policy, config.migration.parameters)
    if config.scaling.enabled:
        actuator_params(config.scaling.actuator)  # a bad actuator or parameter fails here (ValueError)
    if config.discovery.enabled and importlib.util.find_spec("lightkube") is None:
        raise ValueError("discovery.kubernetes needs the Kubernetes client: pip install 'pdgate[kubernetes]'")
    return Gateway(config, profiles, tokenizers, GatewayMetrics(), admitter, policy, handler)


class GatewayApp:
    """Routes a parsed request to its handler, after the API-key check on ``/v1/``."""

    def __init__(self, gateway: Gateway, cluster: Cluster, proxy: Proxy, admin: AdminApi | None = None) -> None:
        self.gw = gateway
        self.cluster = cluster
        self.proxy = proxy
        self.admin = admin
        self._keys = [k.encode() for k in gateway.config.client_api_keys()]
        self.passthrough = PassThrough(gateway.config, cluster, gateway.metrics, gateway.tenants)
        self.console = ConsolePage()
        if admin is not None:  # the console's state sits behind the admin API's auth
            admin.console = ConsoleState(
                gateway.metrics,
                gateway.admission,
                max_queue=gateway.config.admission.max_queue,
                started_at=gateway.started_at,
            )
        self.routes: dict[str, dict[str, Route]] = {
            "/v1/completions": {"POST": self.completions},
            "/v1/chat/completions": {"POST": self.chat_completions},
            "/v1/responses": {"POST": self.responses},
            "/v1/models": {"GET": self.models},
            **{path: {"POST": self.passthrough.handle} for path in (*POOLING_ROUTES, *TOKENIZER_ROUTES)},
            "/health": {"GET": self.health},
            "/ready": {"GET": self.ready},
            "/metrics": {"GET": self.metrics},
            "/cost-model": {"GET": self.cost_model},
            "/openapi.json": {"GET": self.openapi},
            **{path: {"GET": self.console.serve} for path in CONSOLE_ROUTES},
        }

    async def __call__(self, request: HttpRequest, responder: Responder) -> None:
        try:
            methods = self.routes.get(request.path)
            if methods is None and self.admin is not None and request.path.startswith("/admin/"):
                await self.admin(request, responder)
                return
            if methods is None and request.path.startswith("/v1/responses/"):
                raise GatewayError(404, "pdgate does not store responses: they cannot be read, cancelled or deleted")
            if methods is None:
                raise GatewayError(404, f"no route {request.method} {request.path}")
            handler = methods.get(request.method)
            if handler is None:
                raise GatewayError(
                    405, f"method {request.method} not allowed on {request.path}", headers={"Allow": ", ".join(methods)}
                )
            if self._keys and (request.path.startswith("/v1/") or request.path in TOKENIZER_ROUTES):
                self._authenticate(request)
            await handler(request, responder)
        except GatewayError as err:
            if responder.started:  # cannot happen before the first byte; log rather than corrupt the stream
                log.warning("error after the response started: %s", err.message)
                return
            responder.send_json(err.status, err.body(), headers=err.headers)

    def _authenticate(self, request: HttpRequest) -> None:
        supplied = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
        # compare against every key so timing does not reveal which prefix matched
        if not any([hmac.compare_digest(supplied, key) for key in self._keys]):
            raise GatewayError(401, "invalid or missing API key", code="invalid_api_key")

    async def completions(self, request: HttpRequest, responder: Responder) -> None:
        await self.proxy.handle(request, responder, "completion")

    async def chat_completions(self, request: HttpRequest, responder: Responder) -> None:
        await self.proxy.handle(request, responder, "chat")

    async def responses(self, request: HttpRequest, responder: Responder) -> None:
        await self.proxy.handle(request, responder, "responses")

    async def models(self, request: HttpRequest, responder: Responder) -> None:
        created = int(self.gw.started_at)
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": created,
                "owned_by": "pdgate",
                "root": m.name,
                "max_model_len": m.max_model_len,
            }
            for m in self.gw.config.models
        ]
        lengths = {m.name: m.max_model_len for m in self.gw.config.models}
        data += [  # each LoRA adapter once, as vLLM lists its own: root its path, parent its base model
            {
                "id": card.name,
                "object": "model",
                "created": created,
                "owned_by": "pdgate",
                "root": card.path,
                "parent": card.parent,
                "max_model_len": lengths[card.parent],
            }
            for card in self.cluster.loras.cards()
        ]
        responder.send_json(200, {"object": "list", "data": data})

    async def health(self, request: HttpRequest, responder: Responder) -> None:
        responder.send_json(200, {"status": "ok"})

    async def ready(self, request: HttpRequest, responder: Responder) -> None:
        status = {m.name: self.cluster.ready(m.name) for m in self.gw.config.models}
        code = 200 if all(status.values()) and not self.gw.stopping else 503
        headers = {} if code == 200 else {"Retry-After": "1"}
        body: dict[str, object] = {"ready": code == 200, "models": status, "sync": self._sync()}
        if self.gw.stopping:
            body["stopping"] = True
        if self.gw.leadership is not None and self.gw.shared is not None:
            body["replica"] = self.gw.shared.replica_id
            body["leader"] = self.gw.leadership.leader_id
        responder.send_json(code, body, headers=headers)

    def _sync(self) -> str:
        """``off`` (no sharing), ``ok`` (sharing through NATS) or ``degraded`` (NATS away: serving
        on this replica's local view; nothing about a request waits for NATS)."""
        if self.gw.shared is None:
            return "off"
        return "ok" if self.gw.shared.connected else "degraded"

    async def metrics(self, request: HttpRequest, responder: Responder) -> None:
        responder.send(
            200,
            self.gw.metrics.render(self.cluster, self.gw.admission, self.gw.costs),
            content_type="text/plain; version=0.0.4; charset=utf-8",
        )

    async def openapi(self, request: HttpRequest, responder: Responder) -> None:
        """This gateway's OpenAPI 3.1 description (:mod:`pdgate.gateway.openapi`)."""
        adapters = [card.name for card in self.cluster.loras.cards()]
        responder.send_json(200, openapi_document(self.gw.config, adapters=adapters, admin=self.admin is not None))

    async def cost_model(self, request: HttpRequest, responder: Responder) -> None:
        """The cost model in force: version, refits, records held, latency coefficients per group."""
        costs = self.gw.costs
        current = costs.current if costs is not None else None
        if costs is None or current is None:
            raise GatewayError(503, "the cost model is not loaded yet", headers={"Retry-After": "1"})
        output = current.output
        responder.send_json(
            200,
            {
                "version": current.version,
                "refits": costs.refits,
                "refit_failures": costs.refit_failures,
                "records": costs.held,
                "latency": current.latency.describe(),
                "output_length": {"n_train": getattr(output, "n_train", 0), "q_high": getattr(output, "q_high", None)},
            },
        )
