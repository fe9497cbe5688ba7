"""A streamed answer the gateway can move between instances while its client reads it.

:class:`LiveStream` relays one client's stream from whichever engine currently produces it.
When that engine's stream ends without the answer's end, it takes over from a prepared
:class:`Handover` (a migration) or asks for one (failover), and splices: the client sees one
SSE stream, every token once (:mod:`gateway.splice`).

A migration that is not live is *make before break*: :meth:`LiveStream.freeze` holds back what
the source sends from then on, the continuation opens on the target from the tokens the client
has, and only once the target's first token is in is the source cut. If the target fails, the
held events go out and the source carries on (:meth:`LiveStream.thaw`): nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pdgate.adapters import UpstreamError, UpstreamReply
from pdgate.gateway.splice import Splice, StreamTrail
from pdgate.gateway.tracing import NO_LEG, LegTrace

if TYPE_CHECKING:
    from pdgate.gateway.answer import Answer
    from pdgate.gateway.instance_state import InstanceState, Lease
    from pdgate.gateway.intake import Routed

log = logging.getLogger("pdgate.migration")


class MidStreamFailure(Exception):
    """The answer broke after it started and could not be continued elsewhere."""

    def __init__(self, instance_id: str, reason: str) -> None:
        super().__init__(f"{instance_id}: {reason}")
        self.instance_id = instance_id
        self.reason = reason


@dataclass(eq=False)
class Handover:
    """A continuation ready to take over: its instance, its open stream and first piece of it."""

    state: InstanceState
    upstream: UpstreamReply
    first: bytes
    tokens: int  # output tokens the client had when it was opened (it continues after them)
    mechanism: str
    leases: list[Lease] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)  # e.g. a concurrent (SGLang) prefill leg
    leg: LegTrace = NO_LEG
    decode_leg: LegTrace = NO_LEG  # the continuation's engine call
    reason: str = ""  # why it moves: balance, defrag, drain, admin, failover
    request_id: str = ""  # the id the continuation's engine knows it by

    def discard(self, reason: str) -> None:
        """Not used after all: abort it on its engine and release what it holds."""
        self.upstream.close()
        for lease in self.leases:
            lease.release()
        for task in self.tasks:
            task.cancel()
        self.leg.end(error=reason)
        self.decode_leg.end(error=reason)


Failover = Callable[["LiveStream", str], Awaitable["Handover | None"]]


class LiveStream:
    """One streamed answer in flight, relayed through a :class:`StreamTrail`.

    ``observe`` is called with every piece that reaches the client (the relay's accounting);
    ``rewrite`` (optional) changes each piece on its way out (the usage of a PD answer);
    ``on_switch`` after each hand-over with the instance left and the client-visible gap in seconds.
    """

    def __init__(
        self,
        routed: Routed,
        *,
        trail: StreamTrail,
        state: InstanceState,
        upstream: UpstreamReply,
        leases: list[Lease],
        responder: Answer,
        observe: Callable[[bytes], None],
        clock: Callable[[], float],
        rewrite: Callable[[bytes], bytes] | None = None,
    ) -> None:
        info = routed.info
        self.routed = routed  # what a continuation is built from
        self.request_id: str = info.request_id
        self.upstream_id: str = info.request_id  # the id the current engine knows the request by
        self.model: str = info.model
        self.kind: str = routed.kind
        self.prompt_tokens: int = info.prompt_tokens
        self.max_tokens: int = info.max_tokens
        self.priority: int = info.priority
        self.tpot_slo_s: float | None = info.slo.tpot_s
        self.predicted_output: float | None = info.output.median if info.output is not None else None
        options = routed.body.get("stream_options") or {}
        self.include_usage = bool(options.get("include_usage"))
        self.want_ids = bool(routed.want_ids)
        self.trail = trail
        self.state = state
        self.upstream = upstream
        self.leases = leases
        self.responder = responder
        self.observe = observe
        self.rewrite = rewrite
        self.clock = clock
        self.splice: Splice | None = None
        self.started_at = clock()
        self.last_write = self.last_read = self.started_at
        self.frozen = False
        self.held: list[bytes] = []
        self.pending: asyncio.Future[Handover | None] | None = None  # a move under way
        self.move_task: asyncio.Task[Any] | None = None
        self.move_target: str | None = None  # where the last move went (or tried to)
        self.source_ended = asyncio.Event()
        self.moves = 0
        self.failovers = 0
        self.failed_instances: set[str] = set()
        self.stall_reason: str | None = None
        self.source_released = False  # a live migration stopped the source on purpose
        self.decode_leg: LegTrace | None = None  # the span of the current continuation's engine call
        self.first_leg: LegTrace | None = None  # the span of the first engine call (the proxy ends it unless it moved)
        self.tasks: list[asyncio.Task[Any]] = []
        self.on_switch: Callable[[LiveStream, InstanceState, Handover, float], None] | None = None

    # ------------------------------------------------------------------ state
    @property
    def instance_id(self) -> str:
        return self.state.spec.id

    @property
    def generated(self) -> int:
        return len(self.trail.token_ids)

    @property
    def moving(self) -> bool:
        return self.pending is not None

    # ------------------------------------------------------------ relaying
    def sink(self, data: bytes) -> None:
        """Called from the engine connection's ``data_received`` with each read."""
        now = self.last_read = self.clock()
        out = self.splice.feed(data) if self.splice is not None else self.trail.feed(data)
        if not out:
            return
        if self.frozen:
            self.held.append(out)
        else:  # _send, written out: this runs for every piece of every stream
            self.last_write = now
            self.observe(out)
            self.responder.write(out if self.rewrite is None else self.rewrite(out))

    def _send(self, out: bytes, now: float | None = None) -> None:
        self.last_write = self.clock() if now is None else now
        self.observe(out)
        self.responder.write(out if self.rewrite is None else self.rewrite(out))

    async def run(self, failover: Failover) -> None:
        """Relay until the answer's end, moving it whenever its engine's stream ends early."""
        while True:
            error: str | None = None
            try:
                await self.upstream.relay(self.sink)
            except UpstreamError as exc:
                error = str(exc)
            self.source_ended.set()
            if self.trail.done:
                await self.cancel_move()
                self.thaw()
                return
            handover = None
            if self.pending is not None:
                handover = await asyncio.shield(self.pending)
                self.pending = None
            if handover is not None and self.trail.finished:  # the client has its finish: only the end is left
                handover.discard("the answer ended first")
                handover = None
            if handover is None:
                reason = self.stall_reason or error or "the stream ended before the answer did"
                self.stall_reason = None
                self.thaw()  # what a frozen source sent before it broke is the client's: send it, continue after it
                if self._finish_without_engine():
                    return
                ending = self.decode_leg if self.decode_leg is not None else self.first_leg
                if ending is not None:
                    ending.end(error=reason)
                handover = await failover(self, reason)
                if handover is None:
                    raise MidStreamFailure(self.instance_id, reason)
            self.switch(handover)

    def _finish_without_engine(self) -> bool:
        """End the answer here when no token is left to generate (its end was all that was lost)."""
        if not self.trail.finished and self.generated < self.max_tokens:
            return False
        splice = self.splice or Splice(self.trail, self.kind, self.prompt_tokens, self.generated, self.want_ids)
        splice.offset = self.generated
        self._send(splice.closing_events(None if self.trail.finished else "length", self.include_usage))
        return True

    def switch(self, handover: Handover) -> None:
        """Continue from ``handover``: cut the old stream, splice the new one in."""
        gap_from = self.last_write
        old = self.state
        self.upstream.close()
        for lease in self.leases:
            lease.release()
        k = handover.tokens
        del self.trail.token_ids[k:]
        self.trail.finished = False
        self.trail.partial = b""
        self.held.clear()
        self.frozen = False
        self.splice = Splice(self.trail, self.kind, self.prompt_tokens, k, self.want_ids)
        self.state, self.upstream, self.leases = handover.state, handover.upstream, handover.leases
        self.upstream_id = handover.request_id or self.upstream_id
        ending = self.decode_leg if self.decode_leg is not None else self.first_leg
        if ending is not None:
            ending.end(attributes={"pdgate.moved": True})
        self.decode_leg = handover.decode_leg
        self.tasks.extend(handover.tasks)
        self.moves += 1
        self.source_ended = asyncio.Event()
        self.last_read = self.clock()
        self.responder.on_flow(handover.upstream.pause_reading, handover.upstream.resume_reading)
        first = self.splice.feed(handover.first)
        if first:
            self._send(first)
        handover.leg.end(
            attributes={
                "pdgate.migration.gap_s": self.clock() - gap_from,
                "pdgate.migration.to": handover.state.spec.id,
                "pdgate.migration.mechanism": handover.mechanism,
            }
        )
        if self.on_switch is not None:
            self.on_switch(self, old, handover, self.clock() - gap_from)

    # --------------------------------------------------------- make before break
    def freeze(self) -> int:
        """Hold back what the source sends from now on; returns the tokens the client has."""
        self.frozen = True
        return self.generated

    def thaw(self) -> None:
        """Send what was held back and relay as before."""
        self.frozen = False
        held, self.held = self.held, []
        for out in held:
            self._send(out)

    def abort_source(self, reason: str) -> None:
        self.upstream.abort(reason)

    async def cancel_move(self) -> None:
        task = self.move_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.pending is not None and self.pending.done() and not self.pending.cancelled():
            leftover = self.pending.result()
            if leftover is not None:
                leftover.discard("the answer ended first")
        self.pending = None

    async def close(self) -> None:
        """The request is over (or its client left): stop any move, free the continuation."""
        await self.cancel_move()
        if self.decode_leg is not None:
            self.decode_leg.end(status=self.upstream.status, attributes={"pdgate.moves": self.moves})
        if self.moves:  # the first upstream belongs to the proxy, continuations to us
            self.upstream.close()
        for lease in self.leases:
            lease.release()
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
