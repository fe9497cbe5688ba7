"""Tenant budgets held across gateway replicas: each replica's usage, shared through NATS.

Every ``tenants.charge_interval_s`` a replica publishes on
``pdgate.tenants`` what its tenants have used since it started: requests and tokens, as running
totals. A replica that hears another's totals charges the difference from the last totals it
heard to its own buckets, so every replica's buckets drain with the whole gateway's use (a lost
message is made up by the next one; totals go down too when a refused request's charge is given
back). A message also carries its replica's run (``epoch``) and when it started: the totals of a
run that began after this replica's count from zero; the first totals heard of an older run are a
baseline, so a replica that starts late does not charge the others' whole history). Budgets are then enforced within a charging interval's use of exact.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from pdgate.common.tasks import OwnedTasks, every
from pdgate.gateway.sharing import SharedState
from pdgate.gateway.tenants import TenantBudgets

log = logging.getLogger("pdgate.tenants")

TENANTS_SUBJECT = "pdgate.tenants"
CLOCK_SKEW_S = 1.0  # hosts' wall clocks may differ this much when runs' starts are compared


class TenantSharing:
    """Publishes this replica's tenant usage and charges the others' to the local buckets."""

    def __init__(
        self,
        shared: SharedState,
        budgets: TenantBudgets,
        *,
        interval_s: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.shared = shared
        self.started_at = wall_clock()  # when this replica's totals began (a listener compares it)
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
        message = {
            "replica": self.shared.replica_id,
            "epoch": self.epoch,
            "started_at": self.started_at,
            "usage": self.totals(),
        }
        await self.shared.publish(TENANTS_SUBJECT, json.dumps(message, separators=(",", ":")).encode())

    async def _on_message(self, data: bytes) -> None:
        try:
            message: dict[str, Any] = json.loads(data)
            replica = str(message["replica"])
            epoch = str(message["epoch"])
            started_at = float(message["started_at"])
            usage = {str(t): (int(v[0]), int(v[1])) for t, v in message["usage"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            log.warning("tenant sharing: a malformed message ignored")
            return
        if replica == self.shared.replica_id:
            return
        heard = self.heard.get(replica)
        if heard is not None and heard[0] == epoch:
            before = heard[1]
        elif started_at >= self.started_at - CLOCK_SKEW_S:
            before = {}  # a run that began after ours: all of its use is new to us
        else:
            before = usage  # a run older than ours: its totals so far are a baseline, not new use
        for tenant, (requests, tokens) in usage.items():
            last_requests, last_tokens = before.get(tenant, (0, 0))
            self.budgets.charge_remote(tenant, requests - last_requests, tokens - last_tokens)
        self.heard[replica] = (epoch, usage)
