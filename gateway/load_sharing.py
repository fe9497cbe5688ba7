"""In-flight load shared between gateway replicas: every snapshot counts the whole gateway's work.

Each replica publishes, on the NATS subject ``pdgate.load``, what it has in flight on each
instance (requests, prefill and decode tokens, prefill legs and their predicted wait, decode
legs and their context, the strictest TPOT SLO among them; and, per model, the predicted
prefill seconds and legs it has sent in total, for the leader's role balancer and scaling
plan): as soon as a lease opens or closes,
at most every ``sharing.load_interval_s`` (20 ms: what opened meanwhile goes out together), and
at least every second as a heartbeat. The sooner the others know, the less replicas
that place at the same moment pile onto the same "best" instance. Every replica keeps the others'
latest figures and adds them to its own when it builds an :class:`~pdgate.scheduler.snapshot.
InstanceView` (:attr:`pdgate.gateway.cluster.Cluster.remote`), so placement and admission see
the load other replicas sent too. Nothing on the request path waits for it: a message is a
few hundred bytes sent from a background task.

A replica that stops publishing (it died, or NATS is away) is forgotten after
``sharing.load_expiry_s``. The delay from publishing to applying is exported
(``pdgate_sharing_load_staleness_seconds``), and so is how many replicas are heard from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdgate.common.tasks import OwnedTasks
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.instance_state import NO_REMOTE_LOAD, InstanceState, RemoteLoad, min_known
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.sharing import SharedState

log = logging.getLogger("pdgate.sharing")

LOAD_SUBJECT = "pdgate.load"
HEARTBEAT_S = 1.0


@dataclass
class _Heard:
    at: float  # this replica's monotonic clock when the figures came
    instances: dict[str, list[float]]
    prefill_work: dict[str, tuple[float, int]]  # model -> predicted prefill seconds and legs the replica sent, in total


def _figures(state: InstanceState, now: float) -> list[float]:
    """One instance's in-flight figures, in :class:`RemoteLoad`'s field order."""
    return [
        state.inflight_requests,
        state.inflight_prefill_tokens,
        state.inflight_decode_tokens,
        len(state.prefill_work),
        state.prefill_wait(now),
        state.decode_inflight,
        state.decode_context_tokens,
        min(state.tpot_slos) if state.tpot_slos else -1.0,
    ]


class LoadSharing:
    """Publishes this replica's in-flight load and merges the others' into the cluster's views."""

    def __init__(
        self,
        shared: SharedState,
        cluster: Cluster,
        metrics: GatewayMetrics,
        *,
        interval_s: float,
        expiry_s: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.shared = shared
        self.cluster = cluster
        self.metrics = metrics
        self.interval_s = interval_s
        self.expiry_s = expiry_s
        self.wall_clock = wall_clock
        self.heard: dict[str, _Heard] = {}  # replica id -> its latest figures
        self._changed = asyncio.Event()  # a lease opened or closed since the last publication
        self._tasks = OwnedTasks()
        shared.subscribe(LOAD_SUBJECT, self._on_message)

    def start(self) -> None:
        self.cluster.on_load_change = self._changed.set
        self._tasks.spawn(self._publish_loop(), "load-sharing")

    async def close(self) -> None:
        self.cluster.on_load_change = None
        await self._tasks.close()

    # -------------------------------------------------------------- publish
    async def _publish_loop(self) -> None:
        """Publish when a lease opened or closed (at most every ``interval_s``: the changes meanwhile
        go out together), and at least every ``HEARTBEAT_S``."""
        last: dict[str, list[float]] | None = None
        last_sent = 0.0
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT_S):  # (wait_for would start a task per wait)
                    await self._changed.wait()
            except TimeoutError:
                pass
            wait = last_sent + self.interval_s - self.cluster.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            self._changed.clear()
            now = self.cluster.clock()
            self.metrics.sharing_sync.set(1 if self.shared.connected else 0)
            try:
                figures = {i: _figures(s, now) for i, s in self.cluster.instances.items()}
                if figures != last or now - last_sent >= HEARTBEAT_S:
                    message = {
                        "replica": self.shared.replica_id,
                        "sent_at": self.wall_clock(),
                        "instances": figures,
                        "prefill_work": {
                            m: [w, self.cluster.prefill_legs_sent.get(m, 0)]
                            for m, w in self.cluster.prefill_work_sent.items()
                        },
                    }
                    await self.shared.publish(LOAD_SUBJECT, json.dumps(message, separators=(",", ":")).encode())
                    last, last_sent = figures, now
                self._expire(now)
            except Exception:  # a bad figure must not stop the sharing for good
                log.exception("load sharing: publishing failed")

    # -------------------------------------------------------------- receive
    async def _on_message(self, data: bytes) -> None:
        try:
            message: dict[str, Any] = json.loads(data)
            replica = str(message["replica"])
            instances = {str(k): [float(x) for x in v] for k, v in message["instances"].items()}
            sent_at = float(message["sent_at"])
            work = {str(k): (float(v[0]), int(v[1])) for k, v in message.get("prefill_work", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("load sharing: a malformed message ignored")
            return
        if replica == self.shared.replica_id:
            return
        self.metrics.observe_sharing_staleness(max(0.0, self.wall_clock() - sent_at))
        before = self.heard.get(replica)
        if before is not None:
            corrections = [abs(f[0] - before.instances.get(i, [0.0])[0]) for i, f in instances.items()]
            self.metrics.sharing_load_divergence.set(max(corrections, default=0.0))
        self.heard[replica] = _Heard(self.cluster.clock(), instances, work)
        self._merge()

    def _expire(self, now: float) -> None:
        gone = [r for r, h in self.heard.items() if now - h.at > self.expiry_s]
        for replica in gone:
            log.warning(
                "load sharing: replica %s not heard from for %.1f s; its load is forgotten", replica, self.expiry_s
            )
            del self.heard[replica]
        if gone:
            self._merge()

    def _merge(self) -> None:
        """The other replicas' figures, summed per instance, for the cluster's views."""
        merged: dict[str, RemoteLoad] = {}
        for heard in self.heard.values():
            for instance_id, f in heard.instances.items():
                base = merged.get(instance_id, NO_REMOTE_LOAD)
                merged[instance_id] = RemoteLoad(
                    base.requests + int(f[0]),
                    base.prefill_tokens + int(f[1]),
                    base.decode_tokens + int(f[2]),
                    base.prefill_legs + int(f[3]),
                    base.prefill_wait_s + f[4],
                    base.decode_legs + int(f[5]),
                    base.decode_context_tokens + int(f[6]),
                    min_known(base.tightest_tpot_s, f[7] if f[7] >= 0 else None),
                )
        self.cluster.remote = merged
        self.cluster.remote_prefill_work = {r: h.prefill_work for r, h in self.heard.items()}
        self.metrics.sharing_replicas.set(len(self.heard))
        if self.cluster.on_release is not None:  # capacity another replica freed: requests held here may go
            self.cluster.on_release()
