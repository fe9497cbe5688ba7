"""Running a workload against one target: arrivals, concurrency, sessions, caps.

* Each request is sent at its arrival time (:mod:`loadgen.arrivals`), or as soon as a slot frees
  when ``max_concurrency`` is reached; the difference (the client's lateness) is recorded.
* The turns of a multi-turn session go in order: a turn is sent at its arrival time or when the
  previous turn ends, whichever is later.
* ``duration_s`` stops sending new requests; in-flight ones then have ``drain_s`` to finish
  before they are cancelled (and recorded as failed).
* One owner: :func:`run_load` creates every task and cancels and awaits whatever is left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdgate.common.http_client import Upstream, UpstreamPool
from pdgate.loadgen.arrivals import ArrivalKind, arrival_times
from pdgate.loadgen.client import Target, send
from pdgate.loadgen.types import BenchRequest, RequestResult


@dataclass
class LoadConfig:
    arrivals: ArrivalKind = "poisson"
    rate: float | None = None  # requests/s (not for trace arrivals)
    burstiness: float = 1.0
    speedup: float = 1.0  # trace arrivals
    max_concurrency: int | None = None
    max_requests: int | None = None
    duration_s: float | None = None
    drain_s: float = 60.0
    timeout_s: float = 600.0
    seed: int = 0


@dataclass
class ClientOverhead:
    """What the load generator itself cost during the run."""

    cpu_s: float
    wall_s: float
    requests: int

    @property
    def cpu_per_request_us(self) -> float:
        return 1e6 * self.cpu_s / self.requests if self.requests else 0.0

    @property
    def cpu_share(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s else 0.0


async def run_load(
    target: Target,
    requests: Sequence[BenchRequest],
    config: LoadConfig,
    *,
    on_result: Callable[[RequestResult], None] | None = None,
    upstream: Upstream | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[RequestResult], ClientOverhead]:
    """Send ``requests`` to ``target`` as ``config`` says; the results in request order.

    ``upstream`` (the caller's, which it closes) replaces the HTTP pool this run opens and closes
    itself, and ``clock`` the monotonic clock (``pdgate simulate``: in memory, virtual time)."""
    n = len(requests) if config.max_requests is None else min(len(requests), config.max_requests)
    requests = list(requests[:n])
    times = arrival_times(
        config.arrivals,
        n,
        rate=config.rate,
        burstiness=config.burstiness,
        seed=config.seed,
        requests=requests,
        speedup=config.speedup,
    )
    pool = upstream or UpstreamPool(idle_timeout_s=4.0)
    slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    previous_turn: dict[str, asyncio.Task[RequestResult]] = {}
    tasks: list[asyncio.Task[RequestResult]] = []
    loop = asyncio.get_running_loop()
    cpu0, start = time.process_time(), clock()

    async def one(request: BenchRequest, at: float, before: asyncio.Task[RequestResult] | None) -> RequestResult:
        if before is not None:
            await asyncio.gather(before, return_exceptions=True)
        if slots is not None:
            await slots.acquire()
        try:
            result = await send(
                pool, target, request, scheduled_s=at, start=start, timeout_s=config.timeout_s, clock=clock
            )
        finally:
            if slots is not None:
                slots.release()
        if on_result is not None:
            on_result(result)
        return result

    try:
        for request, at in zip(requests, times, strict=True):
            if config.duration_s is not None and at > config.duration_s:
                break
            delay = start + at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            before = previous_turn.get(request.session) if request.session else None
            task = loop.create_task(one(request, at, before))
            if request.session:
                previous_turn[request.session] = task
            tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=config.drain_s if config.duration_s is not None else None)
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        if upstream is None:
            await pool.close()
    overhead = ClientOverhead(time.process_time() - cpu0, clock() - start, len(tasks))
    results = []
    for request, at, outcome in zip(requests, times, outcomes, strict=False):
        if isinstance(outcome, RequestResult):
            results.append(outcome)
        else:  # cancelled at the end of the run, or a bug: recorded, never lost
            now = clock() - start
            results.append(
                RequestResult(
                    index=request.index,
                    target=target.name,
                    slo_class=request.slo_class,
                    scheduled_s=at,
                    sent_s=at,
                    end_s=now,
                    error="not finished within the drain time"
                    if isinstance(outcome, asyncio.CancelledError)
                    else repr(outcome),
                )
            )
    return results, overhead
