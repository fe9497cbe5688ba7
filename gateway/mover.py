"""The mover: continues a running stream on another instance (migration) or after its engine failed (failover).

Mechanisms, chosen by the instances' capabilities (or forced by ``migration.mechanism``):

* ``live``: the source engine copies the KV while decoding, stops, and ends its stream; the
  continuation picks the KV up on the target (Llumnix-style; the simulated engine can).
* ``pd``: through the model's PD hand-off: prompt + generated tokens are prefilled on a prefill
  instance (the request's own, whose prefix cache holds the prompt) and continued on the target.
* ``recompute``: the target computes prompt + generated tokens itself.

Moves that are not live are make-before-break: the client's side freezes, the continuation
opens on the target, and the source is cut only once the target's first token is in; a move
that fails leaves the request where it was. The migration controller calls :meth:`StreamMover.move`
(it receives the mover as a :class:`~pdgate.gateway.migration.Mover`); the relay's live streams
call :meth:`StreamMover.failover`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from pdgate.adapters import MigrationError, UpstreamError
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import MigrationConfig
from pdgate.gateway.instance_state import InstanceState
from pdgate.gateway.intake import ROUTES, Routed
from pdgate.gateway.legs import Opened, UpstreamFailed, failure_reason, racing_prefill, read_all
from pdgate.gateway.livestream import Handover, LiveStream
from pdgate.gateway.logs import request_fields
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.outcome import OutcomeRecorder
from pdgate.gateway.pd_legs import PdLegs
from pdgate.gateway.placement import Placement, Placer
from pdgate.gateway.requests import GatewayError
from pdgate.gateway.splice import continuation_body

log = logging.getLogger("pdgate.proxy")


class StreamMover:
    """Moves and fails over running streams; one per gateway."""

    def __init__(
        self,
        config: MigrationConfig,
        cluster: Cluster,
        placer: Placer,
        legs: PdLegs,
        outcome: OutcomeRecorder,
        metrics: GatewayMetrics,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.placer = placer
        self.legs = legs
        self.outcome = outcome
        self.metrics = metrics

    def mechanism(self, source: InstanceState, target: InstanceState) -> str:
        """How a running request moves from ``source`` to ``target`` (``migration.mechanism``, or auto)."""
        forced = self.config.mechanism
        live = (
            source.adapter.capabilities.live_migration
            and target.adapter.capabilities.live_migration
            and source.spec.kind == target.spec.kind
        )
        pd = self.cluster.has_pd(source.spec.model) and target.adapter.capabilities.pd_protocol != "none"
        if forced == "live" and live or forced == "pd" and pd or forced == "recompute":
            return forced
        return "live" if live else "pd" if pd else "recompute"

    async def move(self, live: LiveStream, target: InstanceState, reason: str) -> bool:
        """Move a running stream to ``target``; False: it stayed where it was (see the module doc)."""
        source = live.state
        mechanism = self.mechanism(source, target)
        model = live.model
        span = live.routed.trace.migration(
            {
                "pdgate.migration.reason": reason,
                "pdgate.migration.mechanism": mechanism,
                "pdgate.migration.from": source.spec.id,
                "pdgate.migration.to": target.spec.id,
                "pdgate.migration.tokens": live.generated,
            }
        )
        pending: asyncio.Future[Handover | None] = asyncio.get_running_loop().create_future()
        live.pending = pending
        handover: Handover | None = None
        error = None
        try:
            async with asyncio.timeout(self.config.timeout_s):
                if mechanism == "live":
                    handover = await self._live_handover(live, source, target)
                else:
                    live.freeze()
                    # a source leaving the decode role for prefill holds the prompt and the tokens
                    # so far: the best prefill instance for the continuation (the KV then goes over)
                    to_prefill = reason == "role" and source.role == "prefill"
                    handover = await self._continuation(
                        live,
                        target=target,
                        exclude=set() if to_prefill else {source.spec.id},
                        mechanism=mechanism,
                        preferred_prefill=source.spec.id if to_prefill else None,
                    )
        except (UpstreamFailed, MigrationError, GatewayError, TimeoutError) as exc:
            error = failure_reason(exc)
        except asyncio.CancelledError:
            error = "cancelled"
            raise
        finally:
            if handover is None:
                if not pending.done():
                    pending.set_result(None)
                if live.pending is pending and not live.source_ended.is_set():
                    live.pending = None
                    live.thaw()  # the source carries on; what it sent meanwhile goes out now
                self.metrics.observe_migration(model, reason, mechanism, "failed")
                span.end(error=error or "failed")
                log.info(
                    "migration of %s from %s to %s (%s, %s) failed: %s",
                    live.request_id,
                    source.spec.id,
                    target.spec.id,
                    reason,
                    mechanism,
                    error,
                )
        if handover is None:
            return False
        mechanism = handover.mechanism  # "pd" becomes "recompute" when no prefill instance but the target was left
        handover.reason = reason
        handover.leg = span
        if pending.done():  # the answer ended first (the stream cancelled this move)
            handover.discard("the answer ended first")
            return False
        pending.set_result(handover)
        if mechanism != "live":
            live.abort_source(f"migrated to {target.spec.id}")
        self.metrics.observe_migration(model, reason, mechanism, "migrated")
        log.info(
            "migrated %s from %s to %s (%s, %s) after %d tokens",
            live.request_id,
            source.spec.id,
            target.spec.id,
            reason,
            mechanism,
            handover.tokens,
        )
        return True

    async def _live_handover(self, live: LiveStream, source: InstanceState, target: InstanceState) -> Handover:
        """Live migration: the source moves the KV and ends its stream; then the target continues."""
        moved = await source.adapter.live_migrate(live.upstream_id, target.adapter, timeout_s=self.config.timeout_s)
        live.source_released = True
        await live.source_ended.wait()  # every token the source produced has reached the client
        handoff: dict[str, Any] | None = moved.handoff
        produced = live.trail.token_ids[live.splice.offset :] if live.splice is not None else live.trail.token_ids
        if produced != moved.output_token_ids:  # (after an earlier move the engine made only the tokens since)
            log.warning(
                "live migration of %s: the engine reports %d tokens, the client got %d; recomputing",
                live.request_id,
                len(moved.output_token_ids),
                live.generated,
            )
            handoff = None
        return await self._continuation(
            live, target=target, exclude={source.spec.id}, mechanism="live", handoff=handoff
        )

    async def failover(self, live: LiveStream, reason: str) -> Handover | None:
        """The stream's engine failed mid-answer: continue from the client's last token elsewhere."""
        failed = live.state.spec.id
        if not live.source_released:  # (a live migration's source ended the stream on purpose)
            self.outcome.leg_failed(UpstreamFailed(failed, reason))
            live.failed_instances.add(failed)
        live.source_released = False
        model = live.model
        if not self.config.failover or live.failovers >= self.config.max_failovers or not live.trail.tracked:
            self.metrics.observe_migration(model, "failover", "none", "failed")
            return None
        live.failovers += 1
        span = live.routed.trace.migration(
            {
                "pdgate.migration.reason": "failover",
                "pdgate.migration.from": failed,
                "pdgate.migration.error": reason,
                "pdgate.migration.tokens": live.generated,
            }
        )
        try:
            async with asyncio.timeout(self.config.timeout_s):
                handover = await self._continuation(
                    live, target=None, exclude=set(live.failed_instances), mechanism="failover"
                )
        except (UpstreamFailed, GatewayError, TimeoutError) as exc:
            self.metrics.observe_migration(model, "failover", "recompute", "failed")
            span.end(error=failure_reason(exc))
            if isinstance(exc, UpstreamFailed):
                self.outcome.leg_failed(exc)
            return None
        handover.reason = "failover"
        handover.leg = span
        self.metrics.observe_migration(model, "failover", handover.mechanism, "migrated")
        self.metrics.recent.migration(live.request_id, failed, handover.state.spec.id, "failover", True)
        log.warning(
            "failed %s over from %s to %s after %d tokens (%s)",
            live.request_id,
            failed,
            handover.state.spec.id,
            handover.tokens,
            reason,
            extra=request_fields(live.request_id, live.routed.trace.trace_id),
        )
        return handover

    async def _continuation(
        self,
        live: LiveStream,
        *,
        target: InstanceState | None,
        exclude: set[str],
        mechanism: str,
        handoff: dict[str, Any] | None = None,
        preferred_prefill: str | None = None,
    ) -> Handover:
        """Open the rest of ``live``'s answer (from the tokens its client has) and read its first piece.

        ``target`` None: the scheduling profiles place it (failover); ``handoff``: fields that
        make the target take KV a live migration copied.
        """
        routed: Routed = live.routed
        cont, tokens = self._continuation_request(live, handoff)
        snapshot = self.placer.snapshot_for(cont)(cont.info)
        if target is None:
            placement = self.placer.place(cont, exclude, snapshot, attempt=routed.obs.attempts)
            mechanism = "pd" if placement.split else "recompute"
        else:
            prefill = None
            if mechanism == "pd":
                preferred = preferred_prefill or (routed.obs.prefill_id if routed.obs.split else None)
                prefill = self.placer.prefill_for(cont, snapshot, exclude, preferred)
            placement = Placement(target, prefill, [])
            if mechanism == "pd" and not placement.split:
                mechanism = "recompute"  # the prefill choice fell on the target itself
            self.placer.predict(cont, placement, snapshot)
        opened = Opened(placement.decode)
        try:
            await self.legs.open_answer(cont, placement, opened)
            assert opened.upstream is not None
            if opened.upstream.status >= 400:
                detail = (await read_all(placement.decode, opened.upstream))[:300].decode(errors="replace")
                raise UpstreamFailed(
                    placement.decode.spec.id, f"continuation refused: HTTP {opened.upstream.status}: {detail}"
                )
            try:
                first = await racing_prefill(opened.upstream.first_chunk(), opened.prefill_task)
            except UpstreamError as exc:
                raise UpstreamFailed(
                    placement.decode.spec.id, f"continuation broke before its first byte: {exc}"
                ) from None
        except BaseException as exc:
            opened.leg.end(error=failure_reason(exc))
            await opened.close()
            raise
        opened.leg.first_token()
        if opened.decode_lease is not None and not cont.obs.split:
            opened.decode_lease.prefill_done()  # recomputed on the target: its prompt is done, decoding goes on
        tasks = [opened.prefill_task] if opened.prefill_task is not None else []
        return Handover(
            placement.decode,
            opened.upstream,
            first,
            tokens,
            mechanism,
            opened.leases,
            tasks,
            request_id=cont.info.request_id,
            decode_leg=opened.leg,
        )

    def _continuation_request(self, live: LiveStream, handoff: dict[str, Any] | None) -> tuple[Routed, int]:
        """The rest of ``live``'s answer as a completion: prompt + the tokens its client has now
        (returned too: the stream goes on growing while the continuation opens)."""
        routed: Routed = live.routed
        info = routed.info
        generated = list(live.trail.token_ids)
        body = continuation_body(routed.body, routed.prompt_ids, generated, info.max_tokens)
        if routed.hashes.cache_salt is not None:  # isolated as the request was (and hashed so)
            body["cache_salt"] = routed.hashes.cache_salt
        if handoff:
            body.update(handoff)
        context = [*routed.prompt_ids, *generated]
        # the continuation is hashed as each instance hashes the request (its adapter and salt too)
        hashes = self.cluster.prompt_hashes(
            info.model, context, lora=routed.hashes.lora, cache_salt=routed.hashes.cache_salt
        )
        cont_info = dataclasses.replace(
            info,
            request_id=f"{info.request_id}-m{live.moves + 1}",
            prompt_tokens=len(context),
            max_tokens=info.max_tokens - len(generated),
            output=None,
            block_hashes=tuple(hashes.first_chain()),
        )
        cont = Routed("completion", ROUTES["completion"], body, cont_info, context, hashes, True, trace=routed.trace)
        return cont, len(generated)
