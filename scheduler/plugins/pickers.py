"""In-tree pickers."""

from __future__ import annotations

import random

from pdgate.scheduler.framework import Picker, PluginParams
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo


class SeededParams(PluginParams):
    seed: int | None = None


class _Seeded(Picker):
    Params = SeededParams

    def __init__(self, name: str, params: SeededParams) -> None:
        super().__init__(name, params)
        self._rng = random.Random(params.seed)


class MaxScorePicker(_Seeded):
    """The instance with the highest total weighted score; ties broken uniformly at random."""

    type_name = "max-score"

    def pick(
        self, request: RequestInfo, snapshot: ClusterSnapshot, ranked: list[tuple[InstanceView, float]]
    ) -> InstanceView | None:
        if not ranked:
            return None
        best = ranked[0][1]
        tied = [inst for inst, score in ranked if score >= best - 1e-12]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class RandomPicker(_Seeded):
    """Uniformly at random among the candidates (scores ignored)."""

    type_name = "random"

    def pick(
        self, request: RequestInfo, snapshot: ClusterSnapshot, ranked: list[tuple[InstanceView, float]]
    ) -> InstanceView | None:
        return self._rng.choice(ranked)[0] if ranked else None


class RoundRobinPicker(Picker):
    """Cycles through the candidates in instance-id order.

    The position advances in the ``on_sent`` hook, after the decision, so ``pick`` is pure.
    """

    type_name = "round-robin"

    def __init__(self, name: str, params: PluginParams) -> None:
        super().__init__(name, params)
        self._next = 0

    def pick(
        self, request: RequestInfo, snapshot: ClusterSnapshot, ranked: list[tuple[InstanceView, float]]
    ) -> InstanceView | None:
        if not ranked:
            return None
        ordered = sorted((inst for inst, _ in ranked), key=lambda i: i.id)
        return ordered[self._next % len(ordered)]

    def on_sent(self, request: RequestInfo, instance: InstanceView, phase: str) -> None:
        self._next += 1


class PowerOfTwoPicker(_Seeded):
    """Power of two choices: sample two candidates at random, take the one with less load
    (``max(running + waiting, in-flight)``; ties go to the higher score)."""

    type_name = "power-of-two"

    def pick(
        self, request: RequestInfo, snapshot: ClusterSnapshot, ranked: list[tuple[InstanceView, float]]
    ) -> InstanceView | None:
        if len(ranked) <= 1:
            return ranked[0][0] if ranked else None
        (a, sa), (b, sb) = self._rng.sample(ranked, 2)
        return min((a, b), key=lambda inst: (inst.queue_depth, -(sa if inst is a else sb)))
