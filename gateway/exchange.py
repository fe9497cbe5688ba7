"""The exchange: one request's way from admission to the end of its answer.

Admit (or queue, or refuse), place, open the answer's legs and relay it; a leg that fails
before anything reached the client is retried on other instances (``retries``), the failed
instance excluded and recorded in its circuit breaker. In-flight accounting (leases) is
released when the answer ends, not at response headers; the client's disconnect cancels the
request's task, which closes every upstream connection and so aborts the request on the engines.
"""

from __future__ import annotations

import asyncio

from pdgate.common.http_server import Responder
from pdgate.gateway.admission import AdmissionController
from pdgate.gateway.intake import Routed
from pdgate.gateway.legs import Opened, UpstreamFailed, failure_reason
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.outcome import OutcomeRecorder
from pdgate.gateway.pd_legs import PdLegs
from pdgate.gateway.placement import RETRY_AFTER_S, Placement, Placer
from pdgate.gateway.relay import Relay
from pdgate.gateway.requests import GatewayError
from pdgate.scheduler.snapshot import ClusterSnapshot


class Exchange:
    """Runs requests' legs; one per gateway."""

    def __init__(
        self,
        placer: Placer,
        legs: PdLegs,
        relay: Relay,
        outcome: OutcomeRecorder,
        metrics: GatewayMetrics,
        *,
        retries: int,
        admission: AdmissionController | None = None,
    ) -> None:
        self.placer = placer
        self.legs = legs
        self.relay = relay
        self.outcome = outcome
        self.metrics = metrics
        self.retries = retries
        self.admission = admission

    async def serve(self, routed: Routed, responder: Responder) -> None:
        """Admit, place and execute ``routed``; raises :class:`GatewayError` for an answer that cannot be given."""
        trace = routed.trace
        snapshot: ClusterSnapshot | None = None  # admitted at once: the snapshot admission judged on is current
        if self.admission is not None:
            trace.admission_started()
            try:
                info, outcome = await self.admission.admit(routed.info, self.placer.snapshot_for(routed))
            except GatewayError as err:
                trace.admission_rejected(
                    err.status, err.headers.get("x-pdgate-reject-reason") or err.code or err.message
                )
                raise
            trace.admitted(outcome)
            routed.info = info
            routed.obs.queued_s = outcome.queued_s
            snapshot = outcome.snapshot
        excluded: set[str] = set()
        last_error = "no instance could serve the request"
        attempts = 1 + self.retries
        for attempt in range(1, attempts + 1):
            placement = self.placer.place(routed, excluded, snapshot, attempt)
            snapshot = None
            try:
                await self._execute(responder, routed, placement)
                self.outcome.completed(routed)
                return
            except asyncio.CancelledError:
                if routed.obs.saw_done:  # the client read the whole answer and hung up first
                    self.outcome.completed(routed)
                raise
            except UpstreamFailed as failure:
                excluded.add(failure.instance_id)
                self.outcome.leg_failed(failure)
                self.metrics.retries.labels(model=routed.info.model).inc()
                if attempt < attempts:
                    trace.retry(attempt + 1, failure.instance_id, failure.reason)
                last_error = str(failure)
        raise GatewayError(502, f"upstream failed: {last_error}", headers={"Retry-After": RETRY_AFTER_S})

    async def _execute(self, responder: Responder, routed: Routed, placement: Placement) -> None:
        """One attempt: open the legs, relay the answer, release everything whatever happens."""
        opened = Opened(placement.decode)
        try:
            await self.legs.open_answer(routed, placement, opened)
            assert opened.upstream is not None
            await self.relay.relay(
                responder,
                routed,
                placement.decode,
                opened.upstream,
                opened.prefill_task,
                opened.decode_lease,
                opened.leg,
            )
            obs = routed.obs
            obs.batch_at_end, obs.context_at_end = (
                placement.decode.decode_inflight,
                placement.decode.decode_context_tokens,
            )
            if opened.prefill_task is not None and (failure := await opened.prefill_task) is not None:
                self.outcome.leg_failed(failure)
            if obs.error is None:  # the instance that finished the answer served it well
                self.placer.cluster.record_success(obs.answered_by or placement.decode.spec.id)
            opened.leg.end(status=opened.upstream.status, error=obs.error)
        except BaseException as exc:
            opened.leg.end(
                status=opened.upstream.status if opened.upstream is not None else None, error=failure_reason(exc)
            )
            raise
        finally:
            await opened.close()
