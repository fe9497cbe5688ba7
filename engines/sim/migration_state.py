"""Per-engine live-migration bookkeeping: live requests, reservations, records and metrics.

Plain data (plus its Prometheus metrics), so that :class:`engines.sim.state.SimState` can own it
without depending on the migration protocol itself (:mod:`engines.sim.migration`) or its HTTP
routes (:mod:`engines.sim.migration_routes`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from pdgate.engines.sim.request import SimRequest

MIGRATION_LOG_SIZE = 256  # records /sim/migrations keeps
DOWNTIME_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(eq=False)
class LiveRequest:
    """A generation request while its HTTP handler runs: what /sim/migrate finds by external id."""

    request_id: str  # the external id: X-Request-Id, else the response id
    sim_request: SimRequest
    prefill_leg: bool
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the handler returned
    end_reason: str | None = None  # how the client's response ended ("migrated", "stop", ...)
    migrating: bool = False
    cancelled: bool = False  # the /sim/migrate caller went away before the stop


@dataclass(eq=False)
class Reservation:
    """Target side: blocks set aside for a request the source is about to migrate here."""

    reservation_id: str
    blocks: list[Any]
    source_engine_id: Any
    request_id: Any
    timer: asyncio.TimerHandle | None = None


class MigrationState:
    """Per-engine bookkeeping: live requests, reservations, records and metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.live: dict[str, list[LiveRequest]] = {}
        self.by_internal: dict[str, LiveRequest] = {}
        self.reservations: dict[str, Reservation] = {}
        self.outgoing: dict[str, dict[str, Any]] = {}  # hold key -> what the target's "in" record shows
        self.records: deque[dict[str, Any]] = deque(maxlen=MIGRATION_LOG_SIZE)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.migrated_in = 0  # requests that arrived here by a live migration
        self._total = Counter(
            "sim_migrations", "Live migrations by direction and outcome.", ["direction", "outcome"], registry=registry
        )
        self._downtime = Histogram(
            "sim_migration_downtime_seconds",
            "Stop-and-copy downtime of live migrations (simulated seconds).",
            buckets=DOWNTIME_BUCKETS,
            registry=registry,
        )

    # ----------------------------------------------------------- live index
    def track(self, request_id: str, sim_request: SimRequest, prefill_leg: bool) -> LiveRequest:
        live = LiveRequest(request_id, sim_request, prefill_leg)
        self.live.setdefault(request_id, []).append(live)
        self.by_internal[sim_request.request_id] = live
        return live

    def untrack(self, live: LiveRequest) -> None:
        live.done.set()
        entries = self.live.get(live.request_id, [])
        if live in entries:
            entries.remove(live)
        if not entries:
            self.live.pop(live.request_id, None)
        if self.by_internal.get(live.sim_request.request_id) is live:
            del self.by_internal[live.sim_request.request_id]

    def find(self, request_id: str) -> LiveRequest | None:
        """The oldest unfinished request with this external id."""
        for live in self.live.get(request_id, []):
            if not live.sim_request.status.finished:
                return live
        return None

    # ------------------------------------------------------------- records
    def record(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        self._total.labels(rec["direction"], rec["outcome"]).inc()
        if rec["direction"] == "in" and rec["outcome"] == "migrated":
            self.migrated_in += 1
        if rec["direction"] == "out" and rec["outcome"] == "migrated" and rec.get("downtime_s") is not None:
            self._downtime.observe(rec["downtime_s"])

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for res in self.reservations.values():
            if res.timer is not None:
                res.timer.cancel()
