"""The scheduling framework: filter -> score -> pick over an immutable cluster snapshot.

Modelled on the llm-d / Gateway API Inference Extension endpoint picker:

* :class:`Filter` drops instances, :class:`Scorer` returns a score in [0, 1] per instance,
  :class:`Picker` chooses one. Scorers know nothing of weights: a :class:`Profile` holds the
  weights and the framework clamps every score to [0, 1] before weighting.
* Decisions are pure functions of a :class:`~scheduler.snapshot.ClusterSnapshot` and a
  :class:`~scheduler.snapshot.RequestInfo`. State a plugin keeps (round-robin counters,
  affinity tables) changes only in the lifecycle hooks called after the decision
  (:class:`LifecycleHooks`), never inside ``filter``/``score``/``pick``.
* Every plugin call is timed; the calls come back with the decision (:attr:`Decision.calls`),
  from which the gateway builds its metrics and, when tracing, one span per plugin call.

Three plugin kinds sit beside the profiles: a :class:`ProfileHandler` (which profiles run for a
request, in which order: colocated, or prefill then decode; the PD decision, as llm-d's
profile handler), an :class:`Admitter` (whether a request goes now) and a
:class:`MigrationPolicy` (which running requests move where, Llumnix-style).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from pdgate.scheduler.snapshot import (
    ClusterSnapshot,
    InstanceView,
    RequestInfo,
    RunningRequest,
)


class PluginParams(BaseModel):
    """Base of every plugin's parameters model (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


class Plugin:
    """Base class of all plugins. ``type_name`` is the kebab-case name used in configs."""

    type_name: ClassVar[str] = ""
    Params: ClassVar[type[PluginParams]] = PluginParams

    def __init__(self, name: str, params: PluginParams) -> None:
        self.name = name
        self.params = params


class LifecycleHooks:
    """Optional hooks, called after a decision with what happened. Default: do nothing."""

    def on_sent(self, request: RequestInfo, instance: InstanceView, phase: str) -> None: ...

    def on_first_token(self, request: RequestInfo, instance_id: str) -> None: ...

    def on_finished(self, request: RequestInfo, instance_id: str, ok: bool) -> None: ...


class Filter(Plugin, LifecycleHooks):
    def filter(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> list[InstanceView]:
        raise NotImplementedError


class Scorer(Plugin, LifecycleHooks):
    def score(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> Mapping[str, float]:
        """Score per instance id, in [0, 1] (higher is better). Missing ids score 0."""
        raise NotImplementedError


class Picker(Plugin, LifecycleHooks):
    def pick(
        self, request: RequestInfo, snapshot: ClusterSnapshot, ranked: list[tuple[InstanceView, float]]
    ) -> InstanceView | None:
        """Choose from ``ranked`` (instances with their total weighted score, best first)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Verdict:
    """An admitter's answer for one request at one moment.

    ``dispatch``: place it now; ``wait``: hold it in the gateway's queue and ask again later;
    ``reject``: it cannot meet its SLO (the gateway answers 429, or degrades it, per config).
    """

    action: Literal["dispatch", "wait", "reject"]
    reason: str = ""
    predicted_ttft_s: float | None = None
    best_case_ttft_s: float | None = None
    predicted_tpot_s: float | None = None
    prefill_work_s: float = 0.0  # predicted prefill seconds of the request (for the queue's work-ahead)
    # what a TTFT verdict compared: the earliest first token it sees possible, counted from the
    # request's arrival (time waited, work queued ahead, the prefill itself), against its limit
    earliest_ttft_s: float | None = None
    ttft_limit_s: float | None = None
    # what a TPOT verdict compared: the least predicted TPOT of a batch with the request added
    # (``predicted_tpot_s``) against the limit that batch must keep, and, when no batch takes it,
    # the predicted seconds until the first decode stream ends
    tpot_limit_s: float | None = None
    decode_free_in_s: float | None = None


class Admitter(Plugin):
    """Decides whether a request goes now, waits at the gateway, or is turned away.

    ``work_ahead_s`` is the predicted prefill work of the requests queued ahead of this one.
    Called on arrival and again (for the head of the queue) whenever the cluster changes.
    """

    def assess(self, request: RequestInfo, snapshot: ClusterSnapshot, now: float, work_ahead_s: float) -> Verdict:
        raise NotImplementedError


@dataclass(frozen=True)
class MigrationPlan:
    """One move: take ``request_id`` off instance ``source`` and continue it on ``target``."""

    request_id: str
    source: str  # instance id
    target: str  # instance id
    reason: str  # "balance" | "defrag" | "drain" (policies may add others)


class MigrationPolicy(Plugin):
    """Decides which running requests move where (Llumnix-style).

    A migration controller in the gateway calls :meth:`plan` periodically with a snapshot and
    the requests decoding now, executes the moves it returns, and reports each outcome through
    :meth:`on_migrated`. For a request that must leave its instance (drain, failover) it asks
    :meth:`target_for`. Both are pure over their inputs; state a policy keeps (cooldowns)
    changes only in :meth:`on_migrated`.

    Target candidates (:func:`migration_candidates`): instances of the request's model that are
    healthy, not draining and serve decode, other than the request's own and those excluded.
    """

    def plan(self, snapshot: ClusterSnapshot, running: Sequence[RunningRequest], now: float) -> list[MigrationPlan]:
        """The moves to make now (at most one per request), best first."""
        raise NotImplementedError

    def target_for(
        self,
        request: RunningRequest,
        snapshot: ClusterSnapshot,
        running: Sequence[RunningRequest],
        exclude: Collection[str] = (),
    ) -> str | None:
        """Where a request that must leave its instance (drain, failover) should go; None: nowhere."""
        raise NotImplementedError

    def on_migrated(self, plan: MigrationPlan, ok: bool, now: float) -> None:
        """Called by the controller after each move it attempted (``ok``: the request now runs on
        ``plan.target``). Default: do nothing."""


def migration_candidates(
    request: RunningRequest, snapshot: ClusterSnapshot, exclude: Collection[str] = ()
) -> list[InstanceView]:
    """Instances ``request`` may move to: its model, healthy, not draining, serving decode,
    not its own instance, not in ``exclude``."""
    return [
        i
        for i in snapshot.instances
        if i.model == request.model
        and i.healthy
        and not i.draining
        and i.serves("decode")
        and i.id != request.instance_id
        and i.id not in exclude
    ]


@dataclass(frozen=True)
class ProfileStep:
    plugin: Plugin
    weight: float = 1.0


@dataclass(frozen=True)
class Profile:
    """An ordered list of filters, weighted scorers and exactly one picker."""

    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[tuple[Scorer, float], ...]
    picker: Picker

    @property
    def plugins(self) -> tuple[Plugin, ...]:
        return (*self.filters, *(s for s, _ in self.scorers), self.picker)


PluginCall = tuple[Plugin, float, float, int]
"""One plugin call: the plugin, its start and end (``time.perf_counter``), and the candidates
left after it (a filter's survivors; for scorers and pickers, the candidates it was given)."""


@dataclass
class Decision:
    """The outcome of running one profile, with what the plugins saw and how long they took."""

    profile: str
    instance: InstanceView | None
    candidates: int
    scores: dict[str, float] = field(default_factory=dict)
    calls: list[PluginCall] = field(default_factory=list)
    rejected_by: str | None = None  # the filter that left no candidate

    @property
    def instance_id(self) -> str | None:
        return self.instance.id if self.instance else None

    @property
    def plugin_seconds(self) -> dict[str, float]:
        """Seconds per plugin (by plugin name)."""
        return {plugin.name: end - start for plugin, start, end, _ in self.calls}


def run_profile(
    profile: Profile, request: RequestInfo, snapshot: ClusterSnapshot, candidates: Sequence[InstanceView] | None = None
) -> Decision:
    """Filter, score and pick one instance for ``request``; records every plugin call."""
    clock = time.perf_counter
    current = list(snapshot.instances if candidates is None else candidates)
    decision = Decision(profile.name, None, len(current))
    calls = decision.calls
    for flt in profile.filters:
        t0 = clock()
        current = list(flt.filter(request, snapshot, current))
        calls.append((flt, t0, clock(), len(current)))
        if not current:
            decision.rejected_by = flt.name
            return decision
    totals = {inst.id: 0.0 for inst in current}
    for scorer, weight in profile.scorers:
        t0 = clock()
        scores = scorer.score(request, snapshot, current)
        calls.append((scorer, t0, clock(), len(current)))
        for inst_id in totals:
            raw = scores.get(inst_id, 0.0)
            clamped = raw if raw > 0.0 else 0.0  # NaN -> 0
            totals[inst_id] += weight * (clamped if clamped < 1.0 else 1.0)
    ranked = sorted(((inst, totals[inst.id]) for inst in current), key=lambda item: -item[1])
    t0 = clock()
    chosen = profile.picker.pick(request, snapshot, ranked)
    calls.append((profile.picker, t0, clock(), len(current)))
    decision.instance = chosen
    decision.scores = totals
    decision.candidates = len(current)
    return decision


RunProfile = Callable[[str, Sequence[InstanceView]], Decision]
"""Runs the named profile over the given candidates (the gateway's: it times the plugin calls and
answers "no instance" for the request, so a handler never sees a decision without an instance)."""


@dataclass(frozen=True)
class PdPlan:
    """Where a request runs: ``decode`` answers it; ``prefill`` (when set) computes its prompt first
    on another instance and hands the KV over. How the legs run (one after the other, or both at
    once) is the engines' protocol, which the gateway's adapters know; the plan only says where."""

    decode: Decision
    prefill: Decision | None = None
    reason: str = ""  # why this shape (traced as pdgate.pd_decision)

    @property
    def split(self) -> bool:
        return self.prefill is not None and self.prefill.instance_id != self.decode.instance_id

    @property
    def decisions(self) -> list[Decision]:
        return [self.prefill, self.decode] if self.prefill is not None else [self.decode]


class ProfileHandler(Plugin):
    """Decides, per request, which scheduling profiles run and in which order (the PD decision).

    ``run`` runs one profile; the handler chooses the profiles and their candidates and returns
    a :class:`PdPlan`. ``profiles`` names the profiles it may run, so a config missing one fails
    at load. Pure over its inputs, like every scheduling plugin.
    """

    profiles: ClassVar[tuple[str, ...]] = ()

    def plan(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: Sequence[InstanceView], run: RunProfile
    ) -> PdPlan:
        raise NotImplementedError


PLUGIN_KINDS: tuple[type[Plugin], ...] = (Filter, Scorer, Picker, Admitter, MigrationPolicy, ProfileHandler)
"""The plugin kinds; every registered plugin subclasses one of them."""


def plugin_kind(plugin_cls: type[Plugin]) -> str:
    """``Filter``, ``Scorer``, ``Picker``, ``Admitter``, ``MigrationPolicy``, ``ProfileHandler`` (or ``Plugin``)."""
    return next((k.__name__ for k in PLUGIN_KINDS if issubclass(plugin_cls, k)), "Plugin")


def describe(plugin_cls: type[Plugin]) -> dict[str, Any]:
    """What a plugin is and takes, for ``--help`` style listings and docs."""
    return {
        "type": plugin_cls.type_name,
        "kind": plugin_kind(plugin_cls),
        "doc": (plugin_cls.__doc__ or "").strip().splitlines()[0] if plugin_cls.__doc__ else "",
        "parameters": plugin_cls.Params.model_json_schema().get("properties", {}),
    }
