"""What happened at the gateway in the last minutes, for the ops console (:mod:`pdgate.gateway.console`).

* :class:`RequestHistory`: finished requests in fixed buckets of time (10 s by default) over a
  window (5 minutes): how many finished, how many had an SLO verdict (streamed: a TTFT), how many
  met their SLO, how many admission rejected. Goodput is the requests that met their SLO per
  second. Fed once per request where it completes (:meth:`GatewayMetrics.observe_request`) and
  where admission rejects one (:meth:`GatewayMetrics.observe_admission`).
* :class:`EventLog`: the last ``capacity`` fleet events, newest first: migrations of running
  streams (:class:`~pdgate.gateway.migration.MigrationController`) and role changes of flex
  instances (:meth:`GatewayMetrics.role_changed`).

Both are bounded whatever the load (a deque of whole buckets; a ring of events), cost O(1) per
record, and read time from an injected clock: wall-clock seconds by default, since the console
shows events with their time of day. One :class:`RecentActivity` per gateway holds both
(``GatewayMetrics.recent``). Each gateway process keeps its own (with ``--workers`` or replicas,
a console shows the replica that answers it).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BUCKET_S = 10.0
SPAN_S = 300.0
EVENT_CAPACITY = 50


@dataclass
class _Bucket:
    index: int  # start time // bucket_s
    finished: int = 0
    judged: int = 0
    met: int = 0
    rejected: int = 0


class RequestHistory:
    """Request outcomes per ``bucket_s`` over the last ``span_s`` seconds (see the module doc)."""

    def __init__(
        self, bucket_s: float = BUCKET_S, span_s: float = SPAN_S, clock: Callable[[], float] = time.time
    ) -> None:
        if bucket_s <= 0 or span_s < bucket_s:
            raise ValueError(f"need 0 < bucket_s <= span_s, got bucket_s={bucket_s}, span_s={span_s}")
        self.bucket_s = bucket_s
        self.count = max(1, round(span_s / bucket_s))
        self.clock = clock
        self._buckets: deque[_Bucket] = deque(maxlen=self.count)

    def _current(self) -> _Bucket:
        index = int(self.clock() // self.bucket_s)
        if not self._buckets or self._buckets[-1].index < index:
            self._buckets.append(_Bucket(index))
        return self._buckets[-1]  # (a clock that stepped back counts in the newest bucket)

    def finished(self, met: bool | None) -> None:
        """A request finished; ``met``: whether it met its SLO (None: no verdict, e.g. not streamed)."""
        bucket = self._current()
        bucket.finished += 1
        if met is not None:
            bucket.judged += 1
            bucket.met += met

    def rejected(self) -> None:
        """Admission turned a request away."""
        self._current().rejected += 1

    def view(self) -> dict[str, Any]:
        """Every bucket of the window, oldest first, empty ones included (a steady time axis), and
        the window's totals. ``seconds`` of the newest bucket is how much of it has passed."""
        now = self.clock()
        newest = int(now // self.bucket_s)
        held = {b.index: b for b in self._buckets}
        buckets = []
        for index in range(newest - self.count + 1, newest + 1):
            bucket = held.get(index, _Bucket(index))
            start = index * self.bucket_s
            seconds = min(self.bucket_s, max(now - start, 1e-3)) if index == newest else self.bucket_s
            buckets.append(_row(bucket, start, seconds))
        total = _Bucket(newest)
        for bucket in held.values():
            if bucket.index > newest - self.count:
                total.finished += bucket.finished
                total.judged += bucket.judged
                total.met += bucket.met
                total.rejected += bucket.rejected
        span = (self.count - 1) * self.bucket_s + buckets[-1]["seconds"]
        return {
            "bucket_s": self.bucket_s,
            "span_s": self.count * self.bucket_s,
            "buckets": buckets,
            "total": _row(total, buckets[0]["start"], span),
        }


def _row(bucket: _Bucket, start: float, seconds: float) -> dict[str, Any]:
    return {
        "start": start,
        "seconds": round(seconds, 3),
        "finished": bucket.finished,
        "judged": bucket.judged,
        "met": bucket.met,
        "rejected": bucket.rejected,
        "attainment": round(bucket.met / bucket.judged, 4) if bucket.judged else None,
        "goodput_rps": round(bucket.met / seconds, 4),
    }


@dataclass(frozen=True)
class Event:
    """One fleet event: ``kind`` (``migration``, ``role``), the instances concerned, why, and what happened."""

    time: float
    kind: str
    instances: tuple[str, ...]
    reason: str
    detail: str
    ok: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "kind": self.kind,
            "instances": list(self.instances),
            "reason": self.reason,
            "detail": self.detail,
            "ok": self.ok,
        }


class EventLog:
    """The last ``capacity`` events (a ring: the oldest goes when a new one comes)."""

    def __init__(self, capacity: int = EVENT_CAPACITY, clock: Callable[[], float] = time.time) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.clock = clock
        self._events: deque[Event] = deque(maxlen=capacity)
        self.recorded = 0  # every event ever added (the ring holds the last ``capacity``)

    def add(self, kind: str, instances: tuple[str, ...], reason: str, detail: str, ok: bool = True) -> None:
        self._events.append(Event(self.clock(), kind, instances, reason, detail, ok))
        self.recorded += 1

    def recent(self) -> list[dict[str, Any]]:
        """Newest first."""
        return [event.as_dict() for event in reversed(self._events)]


class RecentActivity:
    """One gateway's request history and fleet events, with the hooks that feed them."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.requests = RequestHistory(clock=clock)
        self.events = EventLog(clock=clock)

    def migration(self, request_id: str, source: str, target: str, reason: str, ok: bool) -> None:
        """A running stream moved from ``source`` to ``target`` (or the move failed: it stayed)."""
        detail = f"{request_id} {source} → {target}" + ("" if ok else " failed, stayed")
        self.events.add("migration", (source, target), reason, detail, ok)

    def role_change(self, instance_id: str, old: str, new: str, reason: str) -> None:
        """A flex instance serves as ``new`` (was ``old``)."""
        self.events.add("role", (instance_id,), reason, f"{instance_id} {old} → {new}")
