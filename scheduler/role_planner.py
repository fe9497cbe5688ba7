"""How many instances of a model should prefill and how many decode, and which flex one to move.

Pure over its inputs (no clock, no I/O), like every scheduling decision; the gateway's role
balancer (:mod:`pdgate.gateway.role_balancing`) measures the demand, keeps the forecast and
carries the moves out.

* **Demand** (:class:`PoolDemand`): the prefill work arriving, in predicted prefill seconds per
  second, and the decode streams running at once, with their mean context.
* **Capacity**, from the cost model's latency fits: an instance prefilling keeps its TTFT target
  while it is busy at most :func:`prefill_busy_limit` of the time (its queue's predicted tail
  wait plus a prefill within the target, at most ``prefill_utilisation``); an instance decoding
  keeps its TPOT target (the strictest TPOT SLO of the streams in flight, when stricter) with
  up to the largest batch whose predicted step time is within it.
* **Split**: among the splits that keep at least one prefill and one decode instance (and every
  instance that is not flex in its role), the one with the lowest utilisation of the busier
  pool. A flex instance is moved toward it, one per call, only when that lowers the busier
  pool's utilisation by more than ``hysteresis`` (relative) and the instance may move (its dwell
  time is over: the caller's ``movable``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from pdgate.scheduler.costmodel.model import CostModel
from pdgate.scheduler.snapshot import InstanceView

MAX_BATCH = 1024


@dataclass(frozen=True)
class PoolDemand:
    """What a model's requests ask of its instances (measured, or forecast for the next interval)."""

    prefill_work_s_per_s: float  # predicted prefill seconds arriving per second
    decode_streams: float  # decode streams running at once
    context_tokens_per_stream: float  # their mean context
    mean_prefill_s: float | None = None  # predicted prefill seconds of one request (None: none seen)


@dataclass(frozen=True)
class RolePlan:
    """The split a model's pools should have, why, and the one move toward it (or none)."""

    prefill: int
    decode: int
    prefill_utilisation: float  # of the prefill pool at the planned split
    decode_utilisation: float
    current_prefill: int
    move: tuple[str, Literal["prefill", "decode"]] | None
    reason: str
    demand: PoolDemand  # what it planned for (the forecast)


TAIL_FACTOR = math.log(10)  # an M/M/1 queue's 90th-percentile wait is about ln(10) x its mean
MIN_BUSY = 0.05


def prefill_busy_limit(cap: float, ttft_target_s: float | None, mean_prefill_s: float | None) -> float:
    """The share of time a prefill instance may be busy and still keep ``ttft_target_s`` for nine
    requests in ten: its queue's wait (``rho / (1 - rho)`` prefills, as M/M/1's mean, times
    ``TAIL_FACTOR`` for the 90th percentile) plus the request's own prefill within the target;
    never above ``cap`` (``prefill_utilisation``), nor below ``MIN_BUSY``. ``cap`` alone without
    a target or a measured prefill time."""
    if ttft_target_s is None or not mean_prefill_s or mean_prefill_s <= 0:
        return cap
    room = (ttft_target_s - mean_prefill_s) / (TAIL_FACTOR * mean_prefill_s)  # rho / (1 - rho) at most
    if room <= 0:
        return MIN_BUSY
    return max(MIN_BUSY, min(cap, room / (1 + room)))


def tpot_in_force(target_s: float, instances: Sequence[InstanceView]) -> float:
    """The TPOT decode batches must keep: ``target_s``, or the strictest TPOT SLO of the streams
    decoding now when that is stricter (the SLO classes in force)."""
    slos = [i.tightest_tpot_s for i in instances if i.tightest_tpot_s is not None]
    return min([target_s, *slos])


def decode_capacity(view: InstanceView, costs: CostModel, tpot_target_s: float, context_tokens: float) -> int:
    """The largest decode batch whose predicted step time keeps ``tpot_target_s`` (at least 1)."""
    low, high = 1, MAX_BATCH
    while low < high:
        mid = (low + high + 1) // 2
        if costs.decode_step_s(view, mid, mid * context_tokens) <= tpot_target_s:
            low = mid
        else:
            high = mid - 1
    return low


def plan_roles(
    instances: Sequence[InstanceView],
    demand: PoolDemand,
    costs: CostModel,
    *,
    tpot_target_s: float,
    prefill_utilisation: float,
    hysteresis: float,
    movable: Collection[str],
    ttft_target_s: float | None = None,
) -> RolePlan | None:
    """The split of ``instances`` (one model's) that ``demand`` needs; None when it has no flex
    instance in the prefill or decode role, or no instance serving one of them. Prefill
    instances are kept within :func:`prefill_busy_limit` of ``ttft_target_s``, decode batches
    within :func:`tpot_in_force` of ``tpot_target_s``."""
    pool = [i for i in instances if i.role in ("prefill", "decode") and i.available]
    flex = [i for i in pool if i.flexible]
    prefill_now = sum(1 for i in pool if i.role == "prefill")
    fixed_prefill = sum(1 for i in pool if i.role == "prefill" and not i.flexible)
    fixed_decode = sum(1 for i in pool if i.role == "decode" and not i.flexible)
    decoders = [i for i in pool if i.role == "decode"]
    if not flex or prefill_now == 0 or not decoders:
        return None
    tpot = tpot_in_force(tpot_target_s, pool)
    streams_each = decode_capacity(decoders[0], costs, tpot, max(1.0, demand.context_tokens_per_stream))
    busy = prefill_busy_limit(prefill_utilisation, ttft_target_s, demand.mean_prefill_s)

    def utilisation(prefill: int) -> tuple[float, float]:
        decode = len(pool) - prefill
        return (
            demand.prefill_work_s_per_s / (prefill * busy),
            demand.decode_streams / (decode * streams_each),
        )

    choices = range(max(1, fixed_prefill), len(pool) - max(1, fixed_decode) + 1)
    busiest = {n: max(utilisation(n)) for n in choices}
    best = min(busiest, key=lambda n: (busiest[n], abs(n - prefill_now)))  # ties: the fewest moves
    up, down = utilisation(best)
    now = busiest.get(prefill_now, float("inf"))
    move: tuple[str, Literal["prefill", "decode"]] | None = None
    if best != prefill_now and now - busiest[best] > hysteresis * now:
        if best > prefill_now:
            options = [i for i in flex if i.role == "decode" and i.id in movable]
            if options:
                move = (min(options, key=lambda i: (i.decode_inflight, i.id)).id, "prefill")
        else:
            options = [i for i in flex if i.role == "prefill" and i.id in movable]
            if options:
                move = (min(options, key=lambda i: (i.prefill_inflight, i.id)).id, "decode")
    now_p, now_d = utilisation(prefill_now) if prefill_now in busiest else (float("inf"), float("inf"))
    reason = (
        f"prefill {now_p:.0%} / decode {now_d:.0%} busy with {prefill_now} prefill of {len(pool)}; "
        f"{best} prefill would make it {up:.0%} / {down:.0%} (prefill busy at most {busy:.0%}, decode batches of "
        f"{streams_each} within {tpot * 1000:g} ms TPOT)"
    )
    return RolePlan(best, len(pool) - best, up, down, prefill_now, move, reason, demand)


@dataclass
class Holt:
    """Holt's linear smoothing of one series (level and trend): the next value, forecast."""

    alpha: float = 0.5
    beta: float = 0.3
    level: float | None = None
    trend: float = 0.0

    def update(self, value: float) -> float:
        """Add this interval's value; the forecast of the next one (never below zero)."""
        if self.level is None:
            self.level = value
        else:
            previous = self.level
            self.level = self.alpha * value + (1 - self.alpha) * (previous + self.trend)
            self.trend = self.beta * (self.level - previous) + (1 - self.beta) * self.trend
        return max(0.0, self.level + self.trend)
