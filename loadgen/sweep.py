"""Finding the highest request rate a target serves within its SLOs (DistServe's goodput).

For each target, a bracketing search over the request rate. Every probe is a fixed-duration run
of the same workload at that rate. A rate is **good** when at least ``target_pct`` % of the
measured requests meet their SLOs:

1. Start at ``start_rate``. While every probe is good, double the rate (up to ``max_rate``);
   while every probe is bad, halve it (down to ``min_rate``).
2. Once one good and one bad rate are known, bisect between them until the bracket is narrower
   than ``tolerance`` (relative) or ``max_probes`` probes are spent.
3. The answer is the highest good rate probed (``None`` if none was good).

Several targets are searched in rounds: each round runs the next probe of every unfinished
target one after the other (the order alternates between rounds), so the targets see the same
workload at interleaved times and slow drift of the host affects them alike.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from pdgate.loadgen.types import BenchRequest, RequestResult

# (target name, rate, duration) -> the run's results
Probe = Callable[[str, float, Sequence[BenchRequest]], Awaitable[list[RequestResult]]]
# (results, rate) -> the fraction of measured requests that met their SLOs, in [0, 1]
Attainment = Callable[[list[RequestResult], float], float]


@dataclass
class SweepConfig:
    target_pct: float = 90.0
    start_rate: float = 1.0
    min_rate: float = 0.05
    max_rate: float = 1000.0
    point_duration_s: float = 30.0
    min_requests: int = 20
    tolerance: float = 0.1
    max_probes: int = 8


@dataclass
class SweepResult:
    target: str
    points: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment 0..1), in probe order
    best_rate: float | None = None
    good: float | None = None  # highest good rate so far
    bad: float | None = None  # lowest bad rate so far
    finished: bool = False

    def record(self, rate: float, attainment: float, config: SweepConfig) -> None:
        self.points.append((rate, attainment))
        if attainment * 100.0 >= config.target_pct:
            self.good = rate if self.good is None else max(self.good, rate)
        else:
            self.bad = rate if self.bad is None else min(self.bad, rate)
        self.best_rate = self.good

    def next_rate(self, config: SweepConfig) -> float | None:
        """The next rate to probe, or ``None`` when the search is over."""
        if len(self.points) >= config.max_probes:
            return None
        if self.good is not None and self.bad is not None:
            if self.bad <= self.good or (self.bad - self.good) / self.bad <= config.tolerance:
                return None
            return (self.good + self.bad) / 2
        last = self.points[-1][0] if self.points else None
        if last is None:
            return min(max(config.start_rate, config.min_rate), config.max_rate)
        if self.bad is None:  # everything good so far: go up
            return None if last >= config.max_rate else min(last * 2, config.max_rate)
        return None if last <= config.min_rate else max(last / 2, config.min_rate)  # everything bad: go down


def requests_for(rate: float, config: SweepConfig) -> int:
    return max(config.min_requests, math.ceil(rate * config.point_duration_s))


async def sweep(
    targets: Sequence[str],
    workload: Callable[[int, float], Sequence[BenchRequest]],
    probe: Probe,
    attainment: Attainment,
    config: SweepConfig,
    on_point: Callable[[str, float, float], None] | None = None,
) -> dict[str, SweepResult]:
    """Search every target's goodput rate (see the module doc). ``workload(n, rate)`` gives the
    ``n`` requests of the probe at ``rate``; it must give every target the same requests."""
    results = {name: SweepResult(name) for name in targets}
    rounds = 0
    while True:
        pending = [
            (name, rate)
            for name, result in results.items()
            if not result.finished and (rate := result.next_rate(config)) is not None
        ]
        for name, result in results.items():
            if not result.finished and all(name != p for p, _ in pending):
                result.finished = True
        if not pending:
            return results
        rounds += 1
        # alternate who goes first: on a shared fleet the second run of a round finds warmer caches
        for name, rate in pending if rounds % 2 else pending[::-1]:
            requests = workload(requests_for(rate, config), rate)
            outcome = await probe(name, rate, requests)
            value = attainment(outcome, rate)
            results[name].record(rate, value, config)
            if on_point is not None:
                on_point(name, rate, value)
