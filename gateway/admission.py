"""The gateway's admission queue: holds requests that cannot go yet, earliest deadline first.

Each model has its own queue, ordered by (priority desc, SLO before best effort, TTFT deadline,
arrival). The admitter plugin (:class:`scheduler.framework.Admitter`) judges a request on
arrival and, while it waits, whenever capacity frees up (a lease is released) or every
``recheck_ms``: *dispatch* (the request's own task goes on to placement), *wait*, or *reject*.
A rejected request gets 429 with ``Retry-After`` and ``x-pdgate-reject-reason``, or, per
``admission.on_infeasible``, is served as best effort or admitted anyway. A full queue turns
away its lowest-ranked request. A client that disconnects while queued leaves the queue.

One background task (the dispatcher) is owned by :class:`AdmissionController`;
:meth:`AdmissionController.close` cancels and awaits it and fails what is still queued with 503.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from pdgate.gateway.admission_queue import FairQueue, RankQueue, Waiter, WaitQueue, tenant_of
from pdgate.gateway.config import AdmissionConfig
from pdgate.gateway.fair_share import VirtualCounters
from pdgate.gateway.requests import GatewayError
from pdgate.scheduler.framework import Admitter, Verdict
from pdgate.scheduler.snapshot import ClusterSnapshot, RequestInfo, SloTarget

log = logging.getLogger("pdgate.admission")

BEST_EFFORT_PRIORITY = -(10**9)


@dataclass
class Outcome:
    """How admission went for one request (metrics, logs, response headers)."""

    action: str  # "dispatch" | "reject" | "degraded" | "forced"
    reason: str
    queued_s: float = 0.0
    verdict: Verdict | None = None
    snapshot: ClusterSnapshot | None = None  # what an immediate dispatch was judged on (still current)


class AdmissionController:
    """Admission for all models of one gateway."""

    def __init__(
        self,
        config: AdmissionConfig,
        admitter: Admitter,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_outcome: Callable[[RequestInfo, Outcome], None] | None = None,
        fair_share: VirtualCounters | None = None,
    ) -> None:
        self.config = config
        self.admitter = admitter
        self.clock = clock
        self.on_outcome = on_outcome
        self.fair_share = fair_share  # tenants: queues serve the least-served tenant first (VTC)
        self.queues: dict[str, WaitQueue] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._dispatch_loop(), name="admission-dispatcher")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for queue in self.queues.values():
            for waiter in queue:
                if not waiter.future.done():
                    waiter.future.set_exception(
                        GatewayError(503, "the gateway is shutting down", headers={"Retry-After": "1"})
                    )
            queue.clear()

    def wake(self) -> None:
        """Capacity may have freed up: re-assess the queue heads."""
        if any(self.queues.values()):
            self._wake.set()

    def queue_length(self, model: str) -> int:
        return len(self.queues.get(model, ()))

    # ---------------------------------------------------------------- admit
    async def admit(
        self, info: RequestInfo, snapshot_of: Callable[[RequestInfo], ClusterSnapshot]
    ) -> tuple[RequestInfo, Outcome]:
        """Return when ``info`` may be placed (possibly degraded to best effort), or raise 429."""
        if not self.config.enabled:
            return info, Outcome("dispatch", "admission-off")
        queue = self._queue(info.model)
        if isinstance(queue, FairQueue) and tenant_of(info) not in queue.lanes:
            queue.counters.joined(tenant_of(info), queue.backlogged())
        original = info
        now = self.clock()
        snapshot = snapshot_of(info)
        verdict = self.admitter.assess(info, snapshot, now, queue.work_ahead(info))
        if verdict.action == "dispatch" and not queue.ahead_of(info):
            return info, self._report(info, Outcome("dispatch", verdict.reason, 0.0, verdict, snapshot))
        if verdict.action == "reject":
            info, outcome = self._infeasible(info, verdict, now)
            if outcome.action == "forced":
                return info, self._report(info, outcome)
        if self.config.max_queue == 0:
            raise self._reject(info, Outcome("reject", "queue-full", 0.0, verdict))
        waiter = Waiter(
            info, snapshot_of, next(self._seq), asyncio.get_running_loop().create_future(), verdict.prefill_work_s, now
        )
        self._insert(queue, waiter)
        self._wake.set()
        try:
            admitted = await waiter.future
        finally:
            queue.remove(waiter)  # still there when cancelled (client gone) or failed while queued
        return admitted, self._report(
            admitted,
            Outcome(
                "dispatch" if admitted.slo is original.slo or admitted.slo == original.slo else "degraded",
                "queued",
                self.clock() - now,
                None,
            ),
        )

    def _queue(self, model: str) -> WaitQueue:
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = FairQueue(self.fair_share) if self.fair_share is not None else RankQueue()
        return queue

    def _insert(self, queue: WaitQueue, waiter: Waiter) -> None:
        queue.insert(waiter)
        while len(queue) > self.config.max_queue:
            worst = queue.pop_worst()  # the lowest-ranked one goes (possibly the newcomer)
            if not worst.future.done():
                worst.future.set_exception(
                    self._reject(worst.info, Outcome("reject", "queue-full", self.clock() - worst.enqueued_at))
                )

    def _infeasible(self, info: RequestInfo, verdict: Verdict, now: float) -> tuple[RequestInfo, Outcome]:
        mode = self.config.on_infeasible
        if mode == "admit":
            return info, Outcome("forced", verdict.reason, 0.0, verdict)
        if mode == "best-effort" and not info.slo.best_effort:
            degraded = replace(info, slo=SloTarget(None, None, BEST_EFFORT_PRIORITY, info.slo.slo_class))
            return degraded, Outcome("degraded", verdict.reason, 0.0, verdict)
        raise self._reject(info, Outcome("reject", verdict.reason, 0.0, verdict))

    def _reject(self, info: RequestInfo, outcome: Outcome) -> GatewayError:
        self._report(info, outcome)
        verdict = outcome.verdict
        retry = 1
        if verdict is not None and verdict.predicted_ttft_s is not None and math.isfinite(verdict.predicted_ttft_s):
            retry = max(1, math.ceil(verdict.predicted_ttft_s))
        detail = ""
        if verdict is not None and outcome.reason == "tpot-infeasible" and verdict.predicted_tpot_s is not None:
            limit = verdict.tpot_limit_s
            detail = (
                f" (predicted TPOT {verdict.predicted_tpot_s * 1000:.1f} ms with it in the least loaded decode batch"
            )
            detail += f", limit {limit * 1000:.1f} ms" if limit is not None else ""
            if verdict.decode_free_in_s:
                detail += (
                    f"; the first decode stream there is predicted to end in {verdict.decode_free_in_s * 1000:.0f} ms"
                )
                retry = max(retry, math.ceil(verdict.decode_free_in_s))
            detail += ")"
        elif verdict is not None and verdict.earliest_ttft_s is not None and verdict.ttft_limit_s is not None:
            # the figures the admitter compared (the least predicted TTFT alone can be under the SLO:
            # the time already waited and the work queued ahead count too)
            detail = (
                f" (earliest predicted TTFT {verdict.earliest_ttft_s * 1000:.0f} ms from arrival, limit "
                f"{verdict.ttft_limit_s * 1000:.0f} ms of a {info.slo.ttft_s * 1000 if info.slo.ttft_s else 0:.0f} ms SLO)"
            )
        elif verdict is not None and verdict.predicted_ttft_s is not None and info.slo.ttft_s is not None:
            detail = f" (predicted TTFT {verdict.predicted_ttft_s * 1000:.0f} ms, SLO {info.slo.ttft_s * 1000:.0f} ms)"
        return GatewayError(
            429,
            f"request cannot meet its latency SLO now: {outcome.reason}{detail}",
            code=outcome.reason,
            headers={"Retry-After": str(retry), "x-pdgate-reject-reason": outcome.reason},
        )

    def _report(self, info: RequestInfo, outcome: Outcome) -> Outcome:
        if self.on_outcome is not None:
            self.on_outcome(info, outcome)
        return outcome

    # ----------------------------------------------------------- dispatcher
    async def _dispatch_loop(self) -> None:
        recheck = self.config.recheck_ms / 1000.0
        while True:
            if not any(self.queues.values()):
                await self._wake.wait()
            else:
                try:
                    async with asyncio.timeout(recheck):  # (wait_for would start a task per wait)
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            for queue in list(self.queues.values()):
                await self._drain(queue)

    async def _drain(self, queue: WaitQueue) -> None:
        """Dispatch from the head while the admitter allows; drop what can no longer make it."""
        while (head := queue.head()) is not None:
            if head.future.done():
                queue.pop_head()
                continue
            now = self.clock()
            verdict = self.admitter.assess(head.info, head.snapshot_of(head.info), now, 0.0)
            if verdict.action == "wait":
                break
            queue.pop_head()
            if verdict.action == "reject":
                try:
                    info, outcome = self._infeasible(head.info, verdict, now)
                except GatewayError as err:
                    head.future.set_exception(err)
                    continue
                if outcome.action == "degraded":  # back in line as best effort
                    head.info = info
                    self._insert(queue, head)
                    continue
            head.future.set_result(head.info)
            await asyncio.sleep(0)  # let its task place it (and take its leases) before the next assessment
