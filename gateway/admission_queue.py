"""The orders an admission queue can keep: by rank alone, or fair between tenants first.

:class:`RankQueue` is one list in rank order (priority, SLO before best effort, TTFT deadline,
arrival). :class:`FairQueue` keeps one such list per tenant and serves, among the tenants' heads
of the highest priority, the tenant with the least virtual token counter
(:class:`~pdgate.gateway.fair_share.VirtualCounters`); a full fair queue turns away the worst
request of the tenant that has had the most. Both answer the admission controller's questions the
same way.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pdgate.gateway.fair_share import VirtualCounters
from pdgate.scheduler.snapshot import RequestInfo

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from pdgate.scheduler.snapshot import ClusterSnapshot

TENANT_TAG = "tenant"


@dataclass(eq=False)
class Waiter:
    """One queued request (equal only to itself: the queue finds and removes it by identity)."""

    info: RequestInfo
    snapshot_of: Callable[[RequestInfo], ClusterSnapshot]
    seq: int
    future: asyncio.Future[RequestInfo] = field(repr=False)
    work_s: float = 0.0
    enqueued_at: float = 0.0

    @property
    def key(self) -> tuple[float, float, float, int]:
        return rank_key(self.info, self.seq)

    @property
    def tenant(self) -> str:
        return tenant_of(self.info)


def rank_key(info: RequestInfo, seq: int) -> tuple[float, float, float, int]:
    """Queue order: priority (higher first), SLO before best effort, TTFT deadline, then ``seq``."""
    slo = info.slo
    deadline = info.arrival + slo.ttft_s if slo.ttft_s is not None else math.inf
    return (-slo.priority, 0.0 if slo.ttft_s is not None else 1.0, deadline, seq)


def tenant_of(info: RequestInfo) -> str:
    return info.tags.get(TENANT_TAG, "")


def _rank(waiter: Waiter) -> tuple[float, float, float, int]:
    return waiter.key


class WaitQueue(Protocol):
    """What the admission controller asks of a queue."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Waiter]: ...

    def insert(self, waiter: Waiter) -> None: ...

    def head(self) -> Waiter | None: ...

    def pop_head(self) -> Waiter: ...

    def pop_worst(self) -> Waiter: ...

    def remove(self, waiter: Waiter) -> bool: ...

    def clear(self) -> None: ...

    def ahead_of(self, info: RequestInfo) -> bool:
        """Whether a queued request goes before a newcomer ``info`` (which wins ties)."""

    def work_ahead(self, info: RequestInfo) -> float:
        """Predicted prefill work of the queued requests that go before ``info`` (which loses ties)."""


class RankQueue:
    """One list in rank order."""

    def __init__(self) -> None:
        self.items: list[Waiter] = []

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(list(self.items))

    def insert(self, waiter: Waiter) -> None:
        self.items.insert(bisect.bisect(self.items, waiter.key, key=_rank), waiter)

    def head(self) -> Waiter | None:
        return self.items[0] if self.items else None

    def pop_head(self) -> Waiter:
        return self.items.pop(0)

    def pop_worst(self) -> Waiter:
        return self.items.pop()

    def remove(self, waiter: Waiter) -> bool:
        if waiter in self.items:
            self.items.remove(waiter)
            return True
        return False

    def clear(self) -> None:
        self.items.clear()

    def ahead_of(self, info: RequestInfo) -> bool:
        return bool(self.items) and self.items[0].key < rank_key(info, -1)

    def work_ahead(self, info: RequestInfo) -> float:
        ahead = bisect.bisect_left(self.items, rank_key(info, 1 << 62), key=_rank)  # the list is in rank order
        return sum(w.work_s for w in self.items[:ahead])


class FairQueue:
    """A rank-ordered lane per tenant; the next request comes from the least-served tenant's lane."""

    def __init__(self, counters: VirtualCounters) -> None:
        self.counters = counters
        self.lanes: dict[str, RankQueue] = {}

    def __len__(self) -> int:
        return sum(len(lane) for lane in self.lanes.values())

    def __iter__(self) -> Iterator[Waiter]:
        return iter([w for lane in self.lanes.values() for w in lane])

    def backlogged(self) -> list[str]:
        return [t for t, lane in self.lanes.items() if lane.items]

    def insert(self, waiter: Waiter) -> None:
        lane = self.lanes.get(waiter.tenant)
        if lane is None:
            lane = self.lanes[waiter.tenant] = RankQueue()
        lane.insert(waiter)

    def _order(self, tenant: str, key: tuple[float, float, float, int]) -> tuple[float, float, tuple]:
        """Service order: priority first, then the tenant's counter, then rank."""
        return (key[0], self.counters.counter(tenant), key)

    def head(self) -> Waiter | None:
        heads = [lane.items[0] for lane in self.lanes.values() if lane.items]
        return min(heads, key=lambda w: self._order(w.tenant, w.key), default=None)

    def pop_head(self) -> Waiter:
        head = self.head()
        if head is None:
            raise IndexError("pop from an empty queue")
        self.remove(head)
        return head

    def pop_worst(self) -> Waiter:
        tenants = self.backlogged()
        if not tenants:
            raise IndexError("pop from an empty queue")
        heaviest = max(tenants, key=lambda t: (self.counters.counter(t), len(self.lanes[t])))
        worst = self.lanes[heaviest].pop_worst()
        self._drop_empty(heaviest)
        return worst

    def remove(self, waiter: Waiter) -> bool:
        lane = self.lanes.get(waiter.tenant)
        if lane is None or not lane.remove(waiter):
            return False
        self._drop_empty(waiter.tenant)
        return True

    def _drop_empty(self, tenant: str) -> None:
        if not self.lanes[tenant].items:
            del self.lanes[tenant]

    def clear(self) -> None:
        self.lanes.clear()

    def ahead_of(self, info: RequestInfo) -> bool:
        head = self.head()
        if head is None:
            return False
        return self._order(head.tenant, head.key) < self._order(tenant_of(info), rank_key(info, -1))

    def work_ahead(self, info: RequestInfo) -> float:
        mine = self._order(tenant_of(info), rank_key(info, 1 << 62))
        return sum(w.work_s for w in self if self._order(w.tenant, w.key) < mine)
