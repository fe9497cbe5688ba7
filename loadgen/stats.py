"""The statistics of a run: attainment, goodput, latency percentiles, per SLO class.

Definitions (all times in seconds, on the client's clock, relative to the run's start):

* **TTFT**, **TPOT**, **E2E** as in :mod:`loadgen.slo`; **ITL** the gaps between consecutive
  output chunks; **lateness** ``sent_s - scheduled_s``, the load generator's own delay in sending
  (client overhead, not the server's).
* A request **meets** its SLO as :func:`loadgen.slo.meets` says; a failed request never does.
* The **measured window** is ``[warmup_s, duration_s - cooldown_s]``; a request is measured iff its
  ``scheduled_s`` lies in it. Its length is the denominator of every rate (goodput, throughput).
* **Attainment** = met / measured (failed requests count as measured and not met);
  **goodput** = met / window length, in requests per second (DistServe's definition).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from pdgate.loadgen.slo import SloSpec
from pdgate.loadgen.types import RequestResult

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p999", 99.9),
)
"""The reported percentiles: field name and percent (linear interpolation, numpy's default)."""

_DIST_FIELDS = ("ttft", "tpot", "e2e", "itl", "lateness")


@dataclass(frozen=True)
class Dist:
    """A distribution's summary; every value is ``None`` when there were no samples."""

    count: int = 0
    mean: float | None = None
    min: float | None = None
    max: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    p999: float | None = None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Dist:
        """Summarize ``values`` (``None`` entries skipped); percentiles interpolate linearly."""
        data = np.asarray([v for v in values if v is not None], dtype=float)
        if data.size == 0:
            return cls()
        pct = np.percentile(data, [p for _, p in PERCENTILES])
        return cls(
            count=int(data.size),
            mean=float(data.mean()),
            min=float(data.min()),
            max=float(data.max()),
            **{name: float(v) for (name, _), v in zip(PERCENTILES, pct, strict=True)},
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Dist:
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class GroupStats:
    """The statistics of a set of measured requests (a whole run, or one SLO class of it).

    Latency distributions (``ttft``, ``tpot``, ``e2e``, ``itl``) are over the successful requests;
    ``lateness`` over all of them. Rates divide by the measured window's length. Token
    throughputs count the tokens of successful requests (``prompt_tokens`` where reported).
    ``cached_fraction`` is sum(cached) / sum(prompt) over the successful requests that report
    both (``None`` when none does).
    """

    total: int
    ok: int
    failed: int
    met: int
    attainment: float | None  # met / total; None when nothing was measured
    goodput_rps: float  # met requests per second of the measured window
    offered_rps: float  # measured requests per second of the window (what was scheduled)
    request_rps: float  # successful requests per second of the window
    output_tps: float
    input_tps: float
    cached_fraction: float | None
    ttft: Dist
    tpot: Dist
    e2e: Dist
    itl: Dist
    lateness: Dist

    @classmethod
    def of(cls, results: Sequence[RequestResult], met: Sequence[bool], window_s: float) -> GroupStats:
        total = len(results)
        good = [r for r in results if r.ok]
        n_met = int(sum(met))
        cache_pairs = [
            (r.cached_tokens, r.prompt_tokens)
            for r in good
            if r.cached_tokens is not None and r.prompt_tokens is not None
        ]
        cached_prompt = sum(p for _, p in cache_pairs)
        return cls(
            total=total,
            ok=len(good),
            failed=total - len(good),
            met=n_met,
            attainment=n_met / total if total else None,
            goodput_rps=n_met / window_s,
            offered_rps=total / window_s,
            request_rps=len(good) / window_s,
            output_tps=sum(r.output_tokens for r in good) / window_s,
            input_tps=sum(r.prompt_tokens or 0 for r in good) / window_s,
            cached_fraction=sum(c for c, _ in cache_pairs) / cached_prompt if cached_prompt else None,
            ttft=Dist.of(r.ttft_s for r in good),
            tpot=Dist.of(r.tpot_s for r in good),
            e2e=Dist.of(r.e2e_s for r in good),
            itl=Dist.of(gap for r in good for gap in r.inter_chunk_s),
            lateness=Dist.of(r.sent_s - r.scheduled_s for r in results),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def _fields_from_dict(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(data)
        for name in _DIST_FIELDS:
            out[name] = Dist.from_dict(data[name])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GroupStats:
        return cls(**cls._fields_from_dict(data))


@dataclass(frozen=True, kw_only=True)
class RunStats(GroupStats):
    """A run's statistics: the measured window, the SLOs applied, the whole run's
    :class:`GroupStats` fields, and the same per SLO class (``classes``)."""

    duration_s: float
    warmup_s: float
    cooldown_s: float
    window_s: float
    excluded_warmup: int
    excluded_cooldown: int
    slo_spec: dict[str, Any]  # SloSpec.to_dict()
    classes: dict[str, GroupStats]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (plain numbers, strings, ``None``, lists and dicts)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunStats:
        out = cls._fields_from_dict(data)
        out["classes"] = {name: GroupStats.from_dict(value) for name, value in data["classes"].items()}
        return cls(**out)

    @property
    def slo(self) -> SloSpec:
        return SloSpec.from_dict(self.slo_spec)

    def is_measured(self, result: RequestResult) -> bool:
        return in_window(result, duration_s=self.duration_s, warmup_s=self.warmup_s, cooldown_s=self.cooldown_s)


def in_window(result: RequestResult, *, duration_s: float, warmup_s: float = 0.0, cooldown_s: float = 0.0) -> bool:
    """Whether ``result`` is measured: ``warmup_s <= scheduled_s <= duration_s - cooldown_s``.
    (Requests scheduled in the warm-up ``[0, warmup_s)`` or the cool-down
    ``(duration_s - cooldown_s, duration_s]``, or outside the run, are excluded.)"""
    return warmup_s <= result.scheduled_s <= duration_s - cooldown_s


def summarize(
    results: Iterable[RequestResult],
    slo_spec: SloSpec,
    *,
    duration_s: float,
    warmup_s: float = 0.0,
    cooldown_s: float = 0.0,
) -> RunStats:
    """The statistics of a run of ``duration_s`` seconds (see the module's definitions).

    Raises ``ValueError`` when the measured window ``duration_s - warmup_s - cooldown_s`` is not
    positive. An empty run gives zero counts and rates, ``None`` attainment and empty
    distributions.
    """
    if warmup_s < 0 or cooldown_s < 0:
        raise ValueError("warm-up and cool-down must not be negative")
    window_s = duration_s - warmup_s - cooldown_s
    if not window_s > 0:
        raise ValueError(
            f"empty measured window: duration {duration_s}s - warm-up {warmup_s}s - cool-down {cooldown_s}s"
        )
    measured: list[RequestResult] = []
    excluded_warmup = excluded_cooldown = 0
    for result in results:
        if result.scheduled_s < warmup_s:
            excluded_warmup += 1
        elif result.scheduled_s > duration_s - cooldown_s:
            excluded_cooldown += 1
        else:
            measured.append(result)
    met = [slo_spec.meets(r) for r in measured]
    by_class: dict[str, tuple[list[RequestResult], list[bool]]] = {}
    for result, ok in zip(measured, met, strict=True):
        group = by_class.setdefault(result.slo_class, ([], []))
        group[0].append(result)
        group[1].append(ok)
    overall = GroupStats.of(measured, met, window_s)
    return RunStats(
        **{f.name: getattr(overall, f.name) for f in fields(GroupStats)},
        duration_s=duration_s,
        warmup_s=warmup_s,
        cooldown_s=cooldown_s,
        window_s=window_s,
        excluded_warmup=excluded_warmup,
        excluded_cooldown=excluded_cooldown,
        slo_spec=slo_spec.to_dict(),
        classes={name: GroupStats.of(rs, ms, window_s) for name, (rs, ms) in sorted(by_class.items())},
    )


def max_rate_meeting(points: Iterable[tuple[float, float | None]], target: float) -> float | None:
    """The highest tested rate up to which every tested rate reached attainment ``>= target``
    (attainment and target as fractions in [0, 1]); ``None`` when the lowest rate already misses."""
    best: float | None = None
    for rate, attainment in sorted(points):
        if attainment is None or attainment < target:
            break
        best = rate
    return best
