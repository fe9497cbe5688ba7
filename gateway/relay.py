"""The relay: the answering leg's reply to the client, whole or chunk by chunk as it arrives.

Nothing reaches the client before the first piece of the answer is in, so a leg that fails
before it is still retried elsewhere (:class:`~pdgate.gateway.legs.UpstreamFailed`). A plain
stream is relayed straight from the engine connection's reads; a stream that can move goes
through a :class:`~pdgate.gateway.livestream.LiveStream`, which the migration controller can
move and which fails over when its engine dies. A stream that breaks and cannot go on ends
with an error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from pdgate.adapters import UpstreamError, UpstreamReply
from pdgate.gateway.answer import Answer
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.instance_state import InstanceState, Lease
from pdgate.gateway.intake import Routed
from pdgate.gateway.legs import UpstreamFailed, client_error, raced, read_all
from pdgate.gateway.livestream import Failover, LiveStream, MidStreamFailure
from pdgate.gateway.logs import request_fields
from pdgate.gateway.migration import MigrationController
from pdgate.gateway.observation import Observation
from pdgate.gateway.outcome import OutcomeRecorder
from pdgate.gateway.splice import StreamTrail, complete_events
from pdgate.gateway.tracing import LegTrace
from pdgate.gateway.usage import with_cached_tokens

log = logging.getLogger("pdgate.proxy")

_USAGE_KEY = b'"completion_tokens"'


class Relay:
    """Answers clients from engine replies; one per gateway."""

    def __init__(
        self,
        cluster: Cluster,
        outcome: OutcomeRecorder,
        failover: Failover,
        migrations: MigrationController | None = None,
    ) -> None:
        self.cluster = cluster
        self.outcome = outcome
        self.failover = failover
        self.migrations = migrations

    async def relay(
        self,
        responder: Answer,
        routed: Routed,
        decode: InstanceState,
        upstream: UpstreamReply,
        prefill_task: asyncio.Task[UpstreamFailed | None] | None = None,
        lease: Lease | None = None,
        leg: LegTrace | None = None,
    ) -> None:
        """Answer the client from the answering leg (``prefill_task``: a concurrent prefill leg
        whose failure abandons the answer before it starts)."""
        headers = {"X-Request-Id": routed.info.request_id}
        if upstream.status >= 400:
            raise client_error(upstream.status, await read_all(decode, upstream))
        obs = routed.obs
        clock = self.cluster.clock
        if not routed.stream:
            data = await raced(read_all(decode, upstream), prefill_task)
            obs.last_token = clock()
            obs.usage_chunk = data
            if prefill_task is not None:
                await asyncio.wait([prefill_task])  # its reply carries the cached tokens the client is told
            if obs.split:
                data = with_cached_tokens(data, obs.cached_tokens)
            responder.send(
                upstream.status,
                data,
                content_type=upstream.headers.get("content-type", "application/json"),
                headers=headers,
            )
            self.outcome.answered(routed, upstream.status)
            return
        try:
            first = await raced(upstream.first_chunk(), prefill_task)
        except UpstreamError as exc:
            raise UpstreamFailed(decode.spec.id, f"stream broke before the first byte: {exc}") from None
        obs.first_token = obs.last_token = clock()
        if leg is not None:
            leg.first_token()
        trail = StreamTrail(strip_ids=not routed.want_ids) if routed.movable else None
        if trail is not None:
            first = trail.feed(first)
        obs.events = first.count(b"data: ")
        if _USAGE_KEY in first:
            obs.usage_chunk = first
        rewrite = _cached_tokens_rewrite(obs) if obs.split else None
        if rewrite is not None:
            first = rewrite(first)
        if lease is not None and not obs.split:
            lease.prefill_done()  # colocated: the prompt is computed, the rest is decoding
        responder.start(
            upstream.status,
            content_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache"},
            first=first,
        )
        responder.on_flow(upstream.pause_reading, upstream.resume_reading)
        if trail is not None:
            await self._relay_movable(responder, routed, decode, upstream, trail, lease, leg, rewrite)
            return
        write = responder.write if rewrite is None else lambda data: responder.write(rewrite(data))
        observe = observer(obs, clock, lambda: decode)
        cut = _WholeEvents()  # only whole events reach the client: a break mid-event leaves it readable

        def sink(data: bytes) -> None:
            whole = cut.feed(data)
            if whole:
                observe(whole)
                write(whole)

        try:
            await upstream.relay(sink)
        except UpstreamError as exc:
            self.outcome.leg_failed(UpstreamFailed(decode.spec.id, f"stream broke mid-way: {exc}"))
            self.broke_mid_stream(responder, routed, decode.spec.id, str(exc))
            return
        if cut.rest:  # the engine ended without closing its last event: pass it on as it came
            observe(cut.rest)
            write(cut.rest)
        responder.end()
        self.outcome.answered(routed, upstream.status)

    async def _relay_movable(
        self,
        responder: Answer,
        routed: Routed,
        decode: InstanceState,
        upstream: UpstreamReply,
        trail: StreamTrail,
        lease: Lease | None,
        leg: LegTrace | None,
        rewrite: Callable[[bytes], bytes] | None,
    ) -> None:
        """Relay a stream that can move: through a LiveStream, which fails it over or migrates it."""
        obs = routed.obs
        clock = self.cluster.clock
        live: LiveStream | None = None
        observe = observer(obs, clock, lambda: live.state if live is not None else decode)
        live = LiveStream(
            routed,
            trail=trail,
            state=decode,
            upstream=upstream,
            leases=[lease] if lease is not None else [],
            responder=responder,
            observe=observe,
            clock=clock,
            rewrite=rewrite,
        )
        live.first_leg = leg
        if self.migrations is not None:
            self.migrations.register(live)
        try:
            await live.run(self.failover)
        except MidStreamFailure as failure:
            self.broke_mid_stream(responder, routed, failure.instance_id, failure.reason)
            return
        finally:
            if self.migrations is not None:
                self.migrations.unregister(live)
            obs.moves = live.moves
            obs.answered_by = live.state.spec.id
            obs.output_tokens = len(trail.token_ids) if trail.tracked else None
            # ``observe`` refers back to ``live``: dropped, the stream is freed by refcounting (no GC cycle)
            live.observe = _ignore_piece
            await live.close()
        responder.end()
        self.outcome.answered(routed, upstream.status)

    def broke_mid_stream(self, responder: Answer, routed: Routed, instance_id: str, reason: str) -> None:
        """The answer broke after it started and cannot go on: an error event ends the stream."""
        log.warning(
            "stream from %s broke mid-way: %s",
            instance_id,
            reason,
            extra=request_fields(routed.info.request_id, routed.trace.trace_id),
        )
        error = {
            "error": {
                "message": f"upstream {instance_id} failed mid-stream",
                "type": "upstream_error",
                "param": None,
                "code": None,
            }
        }
        responder.end(b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n")
        routed.obs.error = "upstream_failed_mid_stream"
        self.outcome.answered(routed, 502)


class _WholeEvents:
    """Cuts a relayed byte stream at SSE event ends; ``rest`` holds the start of an open event."""

    __slots__ = ("rest",)

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        """The whole events that ``data`` completes (with any held start), as they came."""
        whole, self.rest = complete_events(self.rest, data)
        return whole


def _cached_tokens_rewrite(obs: Observation) -> Callable[[bytes], bytes]:
    """For a split request: the client's cached tokens are the prefill leg's (read when the usage passes)."""
    return lambda data: with_cached_tokens(data, obs.cached_tokens)


def observer(
    obs: Observation, clock: Callable[[], float], instance: Callable[[], InstanceState]
) -> Callable[[bytes], None]:
    """What the gateway notes of each piece of a stream that reaches the client (``instance``: the
    one answering now)."""

    def observe(data: bytes) -> None:  # (rfind, not in: about twice as fast on this Python)
        obs.events += data.count(b"data: ")
        obs.last_token = clock()
        if data.rfind(_USAGE_KEY) >= 0:  # the usage chunk and [DONE] may arrive in separate reads
            obs.usage_chunk = data
        # [DONE] starts a line: a token whose text reads "data: [DONE]" is inside a JSON string
        if data.startswith(b"data: [DONE]") or data.rfind(b"\ndata: [DONE]") >= 0:
            obs.saw_done = True
            state = instance()
            obs.batch_at_end, obs.context_at_end = state.decode_inflight, state.decode_context_tokens

    return observe


def _ignore_piece(data: bytes) -> None:
    """The observer of a stream that is over."""
