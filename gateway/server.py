"""Running one gateway: :class:`GatewayServer` starts what a :class:`~pdgate.gateway.app.Gateway`
owns (cluster monitor, upstream pool, tracer, sharing, leadership, discovery, the HTTP server),
reloads its config and certificate on SIGHUP, and stops it gracefully (the ``shutdown`` section).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter


from pdgate.adapters import Upstream, UpstreamPool
from pdgate.adapters.kv_events import KvEventSubscriber
from pdgate.common.http_server import HttpServer
from pdgate.common.tasks import OwnedTasks
from pdgate.common.tls import ServerTls, TlsError, client_context
from pdgate.gateway.admin import AdminApi
from pdgate.gateway.admission import AdmissionController
from pdgate.gateway.app import Gateway, GatewayApp
from pdgate.gateway.cluster import Cluster, KvFeedFactory
from pdgate.gateway.config import ConfigError, GatewayConfig
from pdgate.gateway.costs import CostModelService
from pdgate.gateway.discovery_config import KubernetesDiscoveryConfig
from pdgate.gateway.fleet import FleetManager
from pdgate.gateway.leadership import Leadership
from pdgate.gateway.load_sharing import LoadSharing
from pdgate.gateway.migration import MigrationController
from pdgate.gateway.nats_state import NatsState
from pdgate.gateway.peers import PeerStreams
from pdgate.gateway.proxy import Proxy
from pdgate.gateway.role_balancing import RoleBalancing
from pdgate.gateway.scaling import Scaling
from pdgate.gateway.signal_sharing import SignalSharing
from pdgate.gateway.tenant_service import TenantService
from pdgate.gateway.tenant_sharing import TenantSharing
from pdgate.gateway.tracing import Tracing

log = logging.getLogger("pdgate.gateway")


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
