"""The gateway process's own health in its metrics: client connections, limits hit, event-loop
tasks, and the process's memory, CPU and file descriptors (prometheus_client's ``process_*``)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

from pdgate.common.http_server import LIMIT_NAMES, HttpServer


class ProcessMetrics:
    """Registered on the gateway's registry by :class:`~pdgate.gateway.metrics.GatewayMetrics`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, process_open_fds, ...
        self.limit_hits = Counter(
            "pdgate_http_limit_hits",
            "Client requests or connections refused or dropped by a limit of the limits section "
            "(body: 413, header: 431, request_timeout: 408, malformed: 400, connections: 503, "
            "slow_reader and write_buffer: dropped mid-response).",
            ["limit"],
            registry=registry,
        )
        for name in LIMIT_NAMES:
            self.limit_hits.labels(limit=name)
        self.connections = Gauge(
            "pdgate_http_connections", "Client connections open to this gateway process.", registry=registry
        )
        self.tasks = Gauge(
            "pdgate_event_loop_tasks",
            "asyncio tasks alive in this gateway process (requests, streams and background work).",
            registry=registry,
        )

    def limit_hit(self, name: str) -> None:
        self.limit_hits.labels(limit=name).inc()

    def watch(self, server: HttpServer) -> None:
        """Read the connections and the loop's tasks at each scrape (from the loop's thread)."""
        loop = server.loop
        self.connections.set_function(server.open_connections)
        self.tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
