"""One replica of the gateway does the exactly-once duties: the leader, elected with a lease.

The lease is a key in a JetStream key-value bucket whose entries live ``sharing.leader_lease_s``
(:meth:`~pdgate.gateway.sharing.SharedState.claim`): a replica that holds it renews it every
third of that; the others try to take it as often, and one of them gets it within a lease of
the leader's death (or of its losing NATS).

Duties (:attr:`Leadership.duties_here`): the migration controller's planning and the cost
model's refits. They run on the leader; with no sharing (one replica) they run here; and while
NATS is away every replica runs them on its own local view, as it did before there were
replicas (at worst two plans for a few seconds, never none).
"""

from __future__ import annotations

import asyncio
import logging

from pdgate.common.tasks import OwnedTasks
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.sharing import SharedState

log = logging.getLogger("pdgate.sharing")

LEASE = "leader"


class Leadership:
    """This replica's part in the election; ``shared`` None: a lone gateway, always the leader."""

    def __init__(self, shared: SharedState | None, metrics: GatewayMetrics, *, lease_s: float) -> None:
        self.shared = shared
        self.metrics = metrics
        self.lease_s = lease_s
        self.is_leader = shared is None
        self.leader_id: str | None = None if shared is not None else "local"
        self._tasks = OwnedTasks()

    @property
    def duties_here(self) -> bool:
        return self.shared is None or self.is_leader or not self.shared.connected

    def start(self) -> None:
        if self.shared is not None:
            self._tasks.spawn(self._campaign(self.shared), "leader-election")

    async def close(self) -> None:
        """Stop campaigning; a leader gives the lease up, so another replica leads within a third of a lease."""
        await self._tasks.close()
        if self.shared is not None and self.is_leader:
            self.is_leader = False
            self.metrics.sharing_leader.set(0)
            await self.shared.release(LEASE)
            log.warning("replica %s gave up the leadership", self.shared.replica_id)

    async def _campaign(self, shared: SharedState) -> None:
        while True:
            try:
                held = await shared.claim(LEASE, self.lease_s)
                if held != self.is_leader:
                    log.warning("replica %s %s the leader", shared.replica_id, "is now" if held else "is no longer")
                self.is_leader = held
                self.leader_id = shared.replica_id if held else await shared.holder(LEASE)
                self.metrics.sharing_leader.set(1 if held else 0)
            except Exception:  # the election must go on
                log.exception("leader election failed a round")
            await asyncio.sleep(self.lease_s / 3)
