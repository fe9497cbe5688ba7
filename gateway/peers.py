"""The streams other gateway replicas serve, and moves asked of the replica that holds a stream.

A client's stream lives in the replica that holds its connection: only that replica can move
it. So that one replica (the leader, :mod:`pdgate.gateway.leadership`) can plan migrations for
the whole gateway and any replica's admin API can act on any stream:

* every replica publishes its running streams (as a migration policy sees them:
  :class:`~pdgate.scheduler.snapshot.RunningRequest`) on ``pdgate.streams`` every
  ``migration.interval_s``; every replica keeps the others' latest list, and forgets a replica
  not heard from for ``sharing.load_expiry_s``;
* every replica answers move requests on its own subject (``pdgate.replica.<hex id>.move``):
  the same checks and answer as ``POST /admin/requests/{id}/migrate`` on that replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pdgate.common.tasks import OwnedTasks
from pdgate.gateway.sharing import SharedState
from pdgate.scheduler.snapshot import RunningRequest

log = logging.getLogger("pdgate.sharing")

STREAMS_SUBJECT = "pdgate.streams"
MOVE_TIMEOUT_S = 30.0
# (request id, target instance or None, reason) -> (HTTP status, body), as the admin API answers
MoveExecutor = Callable[[str, str | None, str], Awaitable[tuple[int, dict[str, Any]]]]
_FIELDS = [f.name for f in dataclasses.fields(RunningRequest)]


def move_subject(replica_id: str) -> str:
    """The subject a replica answers move requests on (ids may hold characters subjects may not)."""
    return f"pdgate.replica.{replica_id.encode().hex()}.move"


@dataclass
class _Heard:
    at: float
    streams: list[RunningRequest]


class PeerStreams:
    """This replica's streams published; the others' kept; moves routed to the owning replica."""

    def __init__(
        self,
        shared: SharedState,
        local: Callable[[], list[RunningRequest]],
        execute: MoveExecutor,
        clock: Callable[[], float],
        *,
        interval_s: float,
        expiry_s: float,
    ) -> None:
        self.shared = shared
        self.local = local  # this replica's running streams
        self.execute = execute
        self.clock = clock
        self.interval_s = interval_s
        self.expiry_s = expiry_s
        self.heard: dict[str, _Heard] = {}
        self._tasks = OwnedTasks()
        shared.subscribe(STREAMS_SUBJECT, self._on_streams)
        shared.respond(move_subject(shared.replica_id), self._on_move_request)

    def start(self) -> None:
        self._tasks.spawn(self._publish_loop(), "peer-streams")

    async def close(self) -> None:
        await self._tasks.close()

    # ------------------------------------------------------------------ views
    def running(self, model: str) -> list[RunningRequest]:
        """Other replicas' streams of ``model``."""
        return [s for h in self._fresh().values() for s in h.streams if s.model == model]

    def models(self) -> set[str]:
        return {s.model for h in self._fresh().values() for s in h.streams}

    def owner_of(self, request_id: str) -> str | None:
        fresh = self._fresh()
        return next((r for r, h in fresh.items() if any(s.request_id == request_id for s in h.streams)), None)

    def on(self, instance_id: str) -> list[tuple[str, RunningRequest]]:
        """(replica, stream) for the other replicas' streams on ``instance_id``."""
        return [(r, s) for r, h in self._fresh().items() for s in h.streams if s.instance_id == instance_id]

    def _fresh(self) -> dict[str, _Heard]:
        """The replicas heard from within ``expiry_s`` (the others are dropped at the next publish)."""
        now = self.clock()
        return {r: h for r, h in self.heard.items() if now - h.at <= self.expiry_s}

    # ------------------------------------------------------------------ moves
    async def ask_move(
        self, replica: str, request_id: str, target: str | None, reason: str
    ) -> tuple[int, dict[str, Any]] | None:
        """Ask ``replica`` to move its stream; its answer, or None when it did not answer."""
        request = json.dumps({"request_id": request_id, "target": target, "reason": reason}).encode()
        reply = await self.shared.request(move_subject(replica), request, MOVE_TIMEOUT_S)
        if reply is None:
            return None
        answer = json.loads(reply)
        return int(answer["status"]), dict(answer["body"])

    def delegate(self, plan_request_id: str, target: str | None, reason: str) -> None:
        """A move the leader planned for another replica's stream: sent, not awaited here."""
        owner = self.owner_of(plan_request_id)
        if owner is not None:
            self._tasks.spawn(self._delegated(owner, plan_request_id, target, reason), f"move-{plan_request_id}")

    async def _delegated(self, owner: str, request_id: str, target: str | None, reason: str) -> None:
        answer = await self.ask_move(owner, request_id, target, reason)
        log.info("planned move of %s (replica %s) to %s: %s", request_id, owner, target, answer)

    async def _on_move_request(self, data: bytes) -> bytes:
        try:
            request = json.loads(data)
            status, body = await self.execute(str(request["request_id"]), request.get("target"), request["reason"])
        except (ValueError, KeyError, TypeError):
            status, body = 400, {"error": {"message": "malformed move request", "type": "invalid_request_error"}}
        return json.dumps({"status": status, "body": body}).encode()

    # -------------------------------------------------------------- publish
    async def _publish_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                rows = [dataclasses.astuple(s) for s in self.local()]
                message = {"replica": self.shared.replica_id, "streams": rows}
                await self.shared.publish(STREAMS_SUBJECT, json.dumps(message, separators=(",", ":")).encode())
                self._expire()
            except Exception:
                log.exception("peer streams: publishing failed")

    async def _on_streams(self, data: bytes) -> None:
        try:
            message = json.loads(data)
            replica = str(message["replica"])
            streams = [RunningRequest(**dict(zip(_FIELDS, row, strict=True))) for row in message["streams"]]
        except (ValueError, KeyError, TypeError):
            log.warning("peer streams: a malformed message ignored")
            return
        if replica != self.shared.replica_id:
            self.heard[replica] = _Heard(self.clock(), streams)

    def _expire(self) -> None:
        now = self.clock()
        for replica in [r for r, h in self.heard.items() if now - h.at > self.expiry_s]:
            del self.heard[replica]
