"""Tenant budgets held across gateway replicas: each replica's usage, shared through NATS.

Every ``tenants.charge_interval_s`` (and at least every second) a replica publishes on
``pdgate.tenants`` what its tenants have used since it started: requests and tokens, as running
totals. A replica that hears another's totals charges the difference from the last totals it
heard to its own buckets, so every replica's buckets drain with the whole gateway's use (a lost
message is made up by the next one; totals that fall back mean the other replica restarted, and
count from zero). Budgets are then enforced within a charging interval's use of exact.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pdgate.common.tasks import OwnedTasks, every
from pdgate.gateway.sharing import SharedState
from pdgate.gateway.tenants import TenantBudgets

log = logging.getLogger("pdgate.tenants")

TENANTS_SUBJECT = "pdgate.tenants"


class TenantSharing:
    """Publishes this replica's tenant usage and charges the others' to the local buckets."""

    def __init__(self, shared: SharedState, budgets: TenantBudgets, *, interval_s: float) -> None:
        self.shared = shared
        self.budgets = budgets
        self.interval_s = interval_s
        self.heard: dict[str, dict[str, tuple[int, int]]] = {}  # replica -> tenant -> (requests, tokens) totals
        self._tasks = OwnedTasks()
        shared.subscribe(TENANTS_SUBJECT, self._on_message)

    def start(self) -> None:
        self._tasks.spawn(every(self.interval_s, self.publish, "tenant usage sharing", log), "tenant-sharing")

    async def close(self) -> None:
        await self._tasks.close()

    def totals(self) -> dict[str, tuple[int, int]]:
        return {tenant: (u.requests, u.prompt_tokens + u.output_tokens) for tenant, u in self.budgets.usage.items()}

    async def publish(self) -> None:
        message = {"replica": self.shared.replica_id, "usage": self.totals()}
        await self.shared.publish(TENANTS_SUBJECT, json.dumps(message, separators=(",", ":")).encode())

    async def _on_message(self, data: bytes) -> None:
        try:
            message: dict[str, Any] = json.loads(data)
            replica = str(message["replica"])
            usage = {str(t): (int(v[0]), int(v[1])) for t, v in message["usage"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            log.warning("tenant sharing: a malformed message ignored")
            return
        if replica == self.shared.replica_id:
            return
        before = self.heard.get(replica, {})
        for tenant, (requests, tokens) in usage.items():
            last_requests, last_tokens = before.get(tenant, (0, 0))
            if requests < last_requests or tokens < last_tokens:  # the replica restarted: its totals start again
                last_requests = last_tokens = 0
            self.budgets.charge_remote(tenant, requests - last_requests, tokens - last_tokens)
        self.heard[replica] = usage
