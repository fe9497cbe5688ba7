"""Capacity planning over simulations: the smallest fleet of each shape that serves a request
rate within its SLOs, and the goodput curve of one fleet.

A **shape** is a fleet's make-up: prefill and decode instances (PD), colocated instances, or
flexible instances whose roles the role balancer sets. A shape **meets** the target at a rate
when at least ``target_pct`` % of the requests meet their SLOs there (DistServe's goodput
criterion). :func:`smallest_fleets` searches each family for the fewest instances that meet it:
the count grows by doubling until one meets it, then is bisected; for PD each count is tried at
every split up to :data:`ALL_SPLITS_UP_TO` instances, and above that at the split the last count
found best, scaled, and its neighbours. The search assumes more instances never serve worse.

Each evaluation is one simulation (:class:`Evaluate`): the search is pure and testable with a
stand-in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

ALL_SPLITS_UP_TO = 6
FAMILIES = ("pd", "colocated", "flex")


@dataclass(frozen=True, order=True)
class Shape:
    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    flex: int = 0

    @property
    def total(self) -> int:
        return self.prefill + self.decode + self.colocated + self.flex

    @property
    def family(self) -> str:
        if self.flex:
            return "flex"
        return "colocated" if self.colocated else "pd"

    @property
    def label(self) -> str:
        parts = [(self.prefill, "P"), (self.decode, "D"), (self.colocated, "C"), (self.flex, "F")]
        return "".join(f"{n}{tag}" for n, tag in parts if n)

    def counts(self) -> dict[str, int]:
        """Instances per config role (``both`` for colocated)."""
        roles = {"prefill": self.prefill, "decode": self.decode, "both": self.colocated, "flex": self.flex}
        return {role: n for role, n in roles.items() if n}


@dataclass(frozen=True)
class Evaluation:
    """One shape at one rate: how many requests met their SLOs and what that is per instance."""

    shape: Shape
    rate: float
    attainment: float  # met / measured, in [0, 1]
    goodput_rps: float  # requests per second that met their SLOs
    failed: int = 0

    @property
    def goodput_per_instance(self) -> float:
        return self.goodput_rps / self.shape.total if self.shape.total else 0.0

    def meets(self, target_pct: float) -> bool:
        return 100.0 * self.attainment >= target_pct


Evaluate = Callable[[Shape], Evaluation]


@dataclass
class PlanResult:
    rate: float
    target_pct: float
    evaluations: list[Evaluation] = field(default_factory=list)
    smallest: dict[str, Evaluation | None] = field(default_factory=dict)  # family -> its smallest fleet meeting it

    @property
    def best(self) -> Evaluation | None:
        """The fewest instances of all families (then the highest goodput)."""
        found = [e for e in self.smallest.values() if e is not None]
        return min(found, key=lambda e: (e.shape.total, -e.goodput_rps)) if found else None


class _Search:
    def __init__(self, evaluate: Evaluate, target_pct: float, result: PlanResult) -> None:
        self.evaluate = evaluate
        self.target_pct = target_pct
        self.result = result
        self._seen: dict[Shape, Evaluation] = {}
        self.pd_share = 0.5  # prefill's share of the best PD split found so far

    def run(self, shape: Shape) -> Evaluation:
        if shape not in self._seen:
            evaluation = self.evaluate(shape)
            self._seen[shape] = evaluation
            self.result.evaluations.append(evaluation)
        return self._seen[shape]

    def best_at(self, family: str, n: int) -> Evaluation:
        """The best shape of ``family`` with ``n`` instances (PD: over the splits tried)."""
        if family == "colocated":
            return self.run(Shape(colocated=n))
        if family == "flex":
            return self.run(Shape(flex=n))
        if n <= ALL_SPLITS_UP_TO:
            splits: Iterable[int] = range(1, n)
        else:
            guess = min(n - 1, max(1, round(n * self.pd_share)))
            splits = sorted({p for p in (guess - 1, guess, guess + 1) if 1 <= p < n})
        found = [self.run(Shape(prefill=p, decode=n - p)) for p in splits]
        best = max(found, key=lambda e: (e.attainment, e.goodput_rps))
        self.pd_share = best.shape.prefill / n
        return best

    def smallest(self, family: str, max_instances: int) -> Evaluation | None:
        low = 2 if family == "pd" else 1
        if low > max_instances:
            return None
        n, failing = low, low - 1
        while True:  # double until one meets the target
            best = self.best_at(family, n)
            if best.meets(self.target_pct):
                break
            if n >= max_instances:
                return None
            failing, n = n, min(max_instances, 2 * n)
        while n - failing > 1:  # bisect between the largest failing and the smallest meeting count
            middle = (n + failing) // 2
            candidate = self.best_at(family, middle)
            if candidate.meets(self.target_pct):
                n, best = middle, candidate
            else:
                failing = middle
        return best


def smallest_fleets(
    evaluate: Evaluate,
    *,
    rate: float,
    target_pct: float,
    max_instances: int,
    families: Iterable[str] = FAMILIES,
) -> PlanResult:
    """For each family, the fewest instances meeting ``target_pct`` at ``rate`` (None when even
    ``max_instances`` do not), with every evaluation made on the way."""
    result = PlanResult(rate, target_pct)
    search = _Search(evaluate, target_pct, result)
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"unknown fleet family {family!r}; known: {', '.join(FAMILIES)}")
        result.smallest[family] = search.smallest(family, max_instances)
    return result
