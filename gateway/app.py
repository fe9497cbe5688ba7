"""The gateway's HTTP application: routes, auth, error shape and lifecycle.

Served by :mod:`pdgate.common.http_server` (no web framework on the request path). Every error a client
gets is OpenAI's error JSON; an unknown path is a 404, a known path with the wrong method a 405.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from pdgate.gateway.discovery.kube_discovery import KubeDiscovery

from pdgate.adapters import Upstream, UpstreamPool
from pdgate.adapters.kv_events import KvEventSubscriber
from pdgate.common.http_server import HttpRequest, HttpServer, Responder
from pdgate.common.tasks import OwnedTasks
from pdgate.common.tls import ServerTls, TlsError, client_context
from pdgate.common.tokenizer import Tokenizer, load_tokenizer
from pdgate.gateway.actuators import actuator_params
from pdgate.gateway.admin import AdminApi
from pdgate.gateway.admission import AdmissionController
from pdgate.gateway.cluster import Cluster, KvFeedFactory
from pdgate.gateway.config import DEFAULT_SCHEDULING, ConfigError, GatewayConfig
from pdgate.gateway.console import CONSOLE_ROUTES, ConsolePage, ConsoleState
from pdgate.gateway.costs import CostModelService
from pdgate.gateway.discovery_config import KubernetesDiscoveryConfig
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


@dataclass(frozen=True)
class EngineLinks:
    """How a gateway reaches its engines and what time it keeps. The default is production's: the
    HTTP pool, KV events over ZMQ, the monotonic clock. ``pdgate simulate`` gives an in-memory
    transport, an in-memory KV-event feed, a virtual clock and ``inline_refits`` (the cost model
    refits on the loop's thread: deterministic, and no worker process)."""

    upstream: Callable[[], Upstream] = UpstreamPool
    kv_feed: KvFeedFactory = KvEventSubscriber
    clock: Callable[[], float] = time.monotonic
    inline_refits: bool = False


class GatewayServer:
    """Runs one gateway on this loop: its cluster monitor, upstream pool, tracer and HTTP server.

    ``span_exporter`` replaces the configured trace exporter (and turns tracing on): tests read
    the spans from an in-memory one. ``links`` replaces the transport and the clock, and with
    ``listen=False`` no HTTP server is started: :attr:`app` takes requests in memory.

    TLS (docs/tls.md): the server serves HTTPS when ``tls`` gives a certificate (:attr:`tls`;
    :meth:`reload` reads it again), and the default transport verifies ``https://`` engines as
    ``upstream_tls`` says.
    """

    def __init__(
        self,
        gateway: Gateway,
        *,
        span_exporter: SpanExporter | None = None,
        reload_config: Callable[[], GatewayConfig] | None = None,
        reuse_port: bool = False,
        links: EngineLinks | None = None,
        listen: bool = True,
    ) -> None:
        self.gateway = gateway
        self.reuse_port = reuse_port  # one of several workers on this address (SO_REUSEPORT)
        self.span_exporter = span_exporter
        self.reload_config = reload_config  # reads the config file again (SIGHUP)
        self.links = links or EngineLinks(upstream=self._upstream_pool)
        self.listen = listen
        self.app: GatewayApp | None = None
        self.tls: ServerTls | None = None  # HTTPS: the live server context (set by start)
        self._http: HttpServer | None = None
        self._reloads = OwnedTasks()
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.gateway.config.host}:{self.port}"

    def _upstream_pool(self) -> UpstreamPool:
        """Production's transport: the HTTP pool, verifying ``https://`` engines against
        ``upstream_tls`` (the system's trust store when it names no CA). :class:`TlsError` when
        its files do not load."""
        files = self.gateway.config.upstream_tls.files()
        return UpstreamPool(ssl_context=client_context(files) if files.configured else None)

    async def start(self) -> None:
        gw, links = self.gateway, self.links
        gw.pool = links.upstream()
        gw.cluster = Cluster(gw.config, gw.pool, clock=links.clock, kv_feed=links.kv_feed)
        gw.costs = CostModelService(
            gw.config.cost_model,
            {i.cost_key(): i.prior_spec() for i in gw.config.instances},
            clock=links.clock,
            inline=links.inline_refits,
        )
        if gw.config.tenants.enabled:
            gw.tenants = TenantService(gw.config.tenants, links.clock, gw.metrics.registry)
        gw.admission = AdmissionController(
            gw.config.admission,
            gw.admitter,
            on_outcome=gw.metrics.observe_admission,
            clock=links.clock,
            fair_share=gw.tenants.counters if gw.tenants is not None else None,
        )
        gw.cluster.on_release = gw.admission.wake
        gw.tracing = Tracing.from_config(gw.config.tracing, exporter=self.span_exporter)
        gw.proxy = Proxy(
            gw.config,
            gw.cluster,
            gw.profiles,
            gw.profile_handler,
            gw.tokenizers,
            gw.metrics,
            admission=gw.admission,
            costs=gw.costs,
            tracing=gw.tracing,
            migration_policy=gw.migration_policy,
            tenants=gw.tenants,
        )
        migrations = gw.migrations = gw.proxy.migrations
        assert migrations is not None  # the proxy was given a migration policy
        gw.started_at = time.time()
        try:
            await gw.costs.start()
            gw.admission.start()
            if gw.tenants is not None:
                gw.tenants.start()
            await gw.cluster.start()
            migrations.start()
            gw.fleet = FleetManager(gw.config, gw.cluster, migrations, gw.metrics, gw.costs)
            gw.fleet.tracing = gw.tracing
            admin = AdminApi(gw.config, gw.cluster, migrations, gw.fleet)
            nats_url = gw.config.sharing.url()
            if nats_url is not None:  # replicas: share through NATS
                shared = NatsState(nats_url, gw.config.sharing.replica_id, copies=gw.config.sharing.stream_replicas)
                await self._share(shared, admin, migrations)
            gw.leadership = Leadership(gw.shared, gw.metrics, lease_s=gw.config.sharing.leader_lease_s)
            migrations.plans_here = lambda: gw.leadership is not None and gw.leadership.duties_here
            gw.leadership.start()
            if gw.config.role_balancer.enabled:
                leadership = gw.leadership
                gw.roles = RoleBalancing(
                    gw.config, gw.cluster, gw.fleet, gw.costs, gw.metrics, lambda: leadership.duties_here
                )
                gw.roles.start()
                admin.roles = gw.roles
            if gw.config.scaling.enabled:
                leadership = gw.leadership
                gw.scaling = Scaling(
                    gw.config, gw.cluster, gw.fleet, gw.costs, gw.metrics, lambda: leadership.duties_here
                )
                await gw.scaling.start()
                admin.scaling = gw.scaling
            if gw.config.discovery.kubernetes is not None:
                await self._discover(gw.config.discovery.kubernetes, gw.fleet, gw.leadership, admin)
            self.app = GatewayApp(gw, gw.cluster, gw.proxy, admin)
            if self.listen:
                tls_files = gw.config.tls.files()
                self.tls = ServerTls(tls_files) if tls_files is not None else None
                self._http = HttpServer(
                    self.app,
                    gw.config.limits.http_limits(gw.config.max_body_bytes),
                    on_limit=gw.metrics.process.limit_hit,
                )
                gw.metrics.process.watch(self._http)
                await self._http.start(
                    gw.config.host,
                    gw.config.port,
                    reuse_port=self.reuse_port,
                    ssl_context=self.tls.context if self.tls is not None else None,
                )
                self.port = self._http.port
        except BaseException:
            await self.stop()
            raise

    async def _discover(
        self, settings: KubernetesDiscoveryConfig, fleet: FleetManager, leadership: Leadership, admin: AdminApi
    ) -> None:
        """Watch the engine pods (every replica); the leader adds, drains and removes them."""
        from pdgate.gateway.discovery.kube_discovery import DiscoveryMetrics, KubeDiscovery

        metrics = DiscoveryMetrics(self.gateway.metrics.registry)
        discovery = self.gateway.discovery = KubeDiscovery(settings, fleet, metrics, lambda: leadership.duties_here)
        await discovery.start()
        admin.discovery = discovery

    async def _share(self, shared: NatsState, admin: AdminApi, migrations: MigrationController) -> None:
        """The fleet's changes and drains, the in-flight load and the streams, shared with the other replicas."""
        gw = self.gateway
        assert gw.fleet is not None and gw.cluster is not None
        sharing = gw.config.sharing
        gw.shared = shared
        gw.fleet.share(shared)
        gw.load_sharing = LoadSharing(
            shared, gw.cluster, gw.metrics, interval_s=sharing.load_interval_s, expiry_s=sharing.load_expiry_s
        )
        gw.peers = PeerStreams(
            shared,
            migrations.running_all,
            admin.execute_move,
            gw.cluster.clock,
            interval_s=gw.config.migration.interval_s,
            expiry_s=sharing.load_expiry_s,
        )
        migrations.peers = admin.peers = gw.peers
        gw.signals = SignalSharing(shared, gw.cluster)
        assert gw.costs is not None
        gw.costs.share(shared, lambda: gw.leadership is not None and gw.leadership.duties_here)
        admin.replica_id = shared.replica_id
        await shared.start()
        gw.load_sharing.start()
        gw.peers.start()
        gw.signals.start()
        if gw.tenants is not None:  # tenant budgets hold across the replicas
            gw.tenant_sharing = TenantSharing(
                shared, gw.tenants.budgets, interval_s=gw.config.tenants.charge_interval_s
            )
            gw.tenant_sharing.start()

    def reload(self) -> None:
        """SIGHUP: read the TLS certificate and key files again (new connections get the new
        certificate, open ones keep theirs; files that do not load leave the old one serving), then
        read the config file again and apply its instances; other settings, the TLS files' paths
        among them, need a restart. The config runs in a task this server owns; a file that cannot
        be read changes nothing."""
        self._reload_certificate()
        if self.reload_config is None or self.gateway.fleet is None:
            if self.tls is None:
                log.warning("reload asked for, but this gateway has no config file to read again")
            return
        self._reloads.spawn(self._reload(self.reload_config, self.gateway.fleet), "config-reload")

    def _reload_certificate(self) -> None:
        """Load the TLS certificate files again into the live context; on failure, log and keep serving the old one."""
        if self.tls is None:
            return
        try:
            self.tls.reload()
        except TlsError as exc:
            log.error("TLS certificate reload failed, still serving the previous certificate: %s", exc)
            return
        log.info("TLS certificate reloaded from %s and %s", self.tls.files.cert_file, self.tls.files.key_file)

    async def _reload(self, read: Callable[[], GatewayConfig], fleet: FleetManager) -> None:
        try:
            new = await asyncio.to_thread(read)
        except (ConfigError, ValueError, OSError) as exc:
            log.error("config reload failed, nothing changed: %s", exc)
            return
        await fleet.apply(new, timeout_s=self.gateway.config.admin.drain_wait_s)

    async def stop(self) -> None:
        """End gracefully (the ``shutdown`` section): ``/ready`` 503 for ``ready_delay_s`` while still
        serving, then no new connections and ``grace_s`` for the requests in flight, then the rest."""
        gw = self.gateway
        shutdown = gw.config.shutdown
        await self._reloads.close()
        if self._http is not None:
            gw.stopping = True
            if shutdown.ready_delay_s > 0:
                log.warning("stopping: /ready answers 503; serving on for %g s", shutdown.ready_delay_s)
                await asyncio.sleep(shutdown.ready_delay_s)
            active = self._http.active_requests()
            log.warning("stopping: no new connections; %d request(s) in flight get %g s", active, shutdown.grace_s)
            await self._http.close(shutdown.grace_s)
            self._http = None
        if gw.discovery is not None:
            await gw.discovery.close()
            gw.discovery = None
        if gw.scaling is not None:
            await gw.scaling.close()  # the actuator stops the engines it started
            gw.scaling = None
        if gw.roles is not None:
            await gw.roles.close()
            gw.roles = None
        if gw.leadership is not None:
            await gw.leadership.close()
            gw.leadership = None
        if gw.peers is not None:
            await gw.peers.close()
            gw.peers = None
        if gw.signals is not None:
            await gw.signals.close()
            gw.signals = None
        if gw.load_sharing is not None:
            await gw.load_sharing.close()
            gw.load_sharing = None
        if gw.fleet is not None:
            await gw.fleet.close()
        if gw.shared is not None:
            await gw.shared.close()
            gw.shared = None
        if gw.migrations is not None:
            await gw.migrations.close()
        if gw.admission is not None:
            await gw.admission.close()
        if gw.tenant_sharing is not None:
            await gw.tenant_sharing.close()
            gw.tenant_sharing = None
        if gw.tenants is not None:
            await gw.tenants.close()
        if gw.costs is not None:
            await gw.costs.close()
        if gw.cluster is not None:
            await gw.cluster.close()
        if gw.pool is not None:
            await gw.pool.close()
        if gw.tracing is not None:
            await gw.tracing.close()  # after the HTTP server: the last requests' spans are exported
            gw.tracing = None
