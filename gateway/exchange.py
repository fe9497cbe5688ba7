"""The exchange: one request's way from admission to the end of its answer.

Admit (or queue, or refuse), place, open the answer's legs and relay it; a leg that fails
before anything reached the client is retried on other instances (``retries``), the failed
instance excluded and recorded in its circuit breaker. In-flight accounting (leases) is
released when the answer ends, not at response headers; the client's disconnect cancels the
request's task, which closes every upstream connection and so aborts the request on the engines.
"""

from __future__ import annotations

import asyncio

from pdgate.gateway.admission import AdmissionController
from pdgate.gateway.answer import Answer
from pdgate.gateway.intake import Routed
from pdgate.gateway.legs import Opened, UpstreamFailed, failure_reason
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.outcome import OutcomeRecorder
from pdgate.gateway.pd_legs import PdLegs
from pdgate.gateway.placement import RETRY_AFTER_S, Placement, Placer
from pdgate.gateway.relay import Relay
from pdgate.gateway.requests import GatewayError
from pdgate.gateway.tenant_service import TenantService
from pdgate.scheduler.snapshot import ClusterSnapshot

CLIENT_CLOSED = 499  # the status recorded for a request whose client went away (nginx's convention)


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
        tenants: TenantService | None = None,
    ) -> None:
        self.placer = placer
        self.legs = legs
        self.relay = relay
        self.outcome = outcome
        self.metrics = metrics
        self.retries = retries
        self.admission = admission
        self.tenants = tenants

    async def serve(self, routed: Routed, responder: Answer) -> None:
        """Admit, place and execute ``routed``; raises :class:`GatewayError` for an answer that cannot be given."""
        if self.tenants is None:
            await self._serve(routed, responder)
            return
        status = 500
        try:
            self.tenants.admit(routed)  # the tenant's budgets first: 429 before it queues
            await self._serve(routed, responder)
            status = routed.obs.status or 200
        except GatewayError as err:
            status = err.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            self.tenants.ended(routed, status)

    async def _serve(self, routed: Routed, responder: Answer) -> None:
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
        if self.tenants is not None:
            self.tenants.started(routed)
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

    async def _execute(self, responder: Answer, routed: Routed, placement: Placement) -> None:
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
