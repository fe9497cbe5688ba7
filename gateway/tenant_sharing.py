"""Tenant budgets held across gateway replicas: each replica's usage, shared through NATS.

Every ``tenants.charge_interval_s`` a replica publishes on
``pdgate.tenants`` what its tenants have used since it started: requests and tokens, as running
totals. A replica that hears another's totals charges the difference from the last totals it
heard to its own buckets, so every replica's buckets drain with the whole gateway's use (a lost
message is made up by the next one; totals go down too when a refused request's charge is given
back; a new ``epoch`` means the other replica restarted, and its totals count from zero). Budgets are then enforced within a charging interval's use of exact.
"""

from __future__ import annotations

import json
import logging
import uuid
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
        self.epoch = uuid.uuid4().hex  # this replica's run: its totals count from its start
        self.heard: dict[str, tuple[str, dict[str, tuple[int, int]]]] = {}  # replica -> (epoch, tenant -> totals)
        self._tasks = OwnedTasks()
        shared.subscribe(TENANTS_SUBJECT, self._on_message)

    def start(self) -> None:
        self._tasks.spawn(every(self.interval_s, self.publish, "tenant usage sharing", log), "tenant-sharing")

    async def close(self) -> None:
        await self._tasks.close()

    def totals(self) -> dict[str, tuple[int, int]]:
        return {tenant: (u.requests, u.prompt_tokens + u.output_tokens) for tenant, u in self.budgets.usage.items()}

    async def publish(self) -> None:
        message = {"replica": self.shared.replica_id, "epoch": self.epoch, "usage": self.totals()}
        await self.shared.publish(TENANTS_SUBJECT, json.dumps(message, separators=(",", ":")).encode())

    async def _on_message(self, data: bytes) -> None:
        try:
            message: dict[str, Any] = json.loads(data)
            replica = str(message["replica"])
            epoch = str(message["epoch"])
            usage = {str(t): (int(v[0]), int(v[1])) for t, v in message["usage"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            log.warning("tenant sharing: a malformed message ignored")
            return
        if replica == self.shared.replica_id:
            return
        last_epoch, before = self.heard.get(replica, (epoch, {}))
        if last_epoch != epoch:  # the replica restarted: its totals count from zero again
            before = {}
        for tenant, (requests, tokens) in usage.items():
            last_requests, last_tokens = before.get(tenant, (0, 0))
            self.budgets.charge_remote(tenant, requests - last_requests, tokens - last_tokens)
        self.heard[replica] = (epoch, usage)
