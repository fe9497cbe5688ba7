"""Service-level objectives and the statistics of a run: attainment, goodput, latency percentiles.

Definitions (all times in seconds, on the client's clock, relative to the run's start):

* **TTFT** ``first_token_s - sent_s``; **TPOT** ``(E2E - TTFT) / (output_tokens - 1)`` (``None``
  for fewer than two tokens); **E2E** ``end_s - sent_s``; **ITL** the gaps between consecutive
  output chunks; **lateness** ``sent_s - scheduled_s``, the load generator's own delay in sending
  (client overhead, not the server's).
* A request **meets** its SLO as :func:`meets` says; a failed request never does.
* The **measured window** is ``[warmup_s, duration_s - cooldown_s]``; a request is measured iff its
  ``scheduled_s`` lies in it. Its length is the denominator of every rate (goodput, throughput).
* **Attainment** = met / measured (failed requests count as measured and not met);
  **goodput** = met / window length, in requests per second (DistServe's definition).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pdgate.loadgen.types import RequestResult

DEFAULT_CLASS = "default"
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p999", 99.9),
)
"""The reported percentiles: field name and percent (linear interpolation, numpy's default)."""

_LIMIT_KEYS = {
    "ttft": "ttft_s",
    "ttft_s": "ttft_s",
    "tpot": "tpot_s",
    "tpot_s": "tpot_s",
    "e2e": "e2e_s",
    "e2e_s": "e2e_s",
}
_NO_LIMIT = {"none", "null", "inf", "infinity", "off", ""}
_DIST_FIELDS = ("ttft", "tpot", "e2e", "itl", "lateness")
_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)?\s*$")


# --------------------------------------------------------------------------- SLO definitions


@dataclass(frozen=True)
class Slo:
    """Latency limits for one request class, in seconds; ``None`` means no limit on that metric."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"SLO limit {f.name} must be a positive number of seconds, got {value!r}")

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def describe(self) -> str:
        """E.g. ``ttft<=500ms tpot<=50ms`` (``no limit`` when none is set)."""
        parts = [
            f"{name[:-2]}<={_fmt_seconds(getattr(self, name))}"
            for name in ("ttft_s", "tpot_s", "e2e_s")
            if getattr(self, name) is not None
        ]
        return " ".join(parts) or "no limit"


def _fmt_seconds(value: float) -> str:
    return f"{value * 1e3:g}ms" if value < 1 else f"{value:g}s"


def parse_seconds(value: Any) -> float | None:
    """A limit from a number (seconds) or a string like ``0.5``, ``500ms``, ``2s``; ``none``/``inf``
    (or ``None``) means no limit."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return None if math.isinf(value) else float(value)
    text = str(value).strip().lower()
    if text in _NO_LIMIT:
        return None
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"not a duration: {value!r} (use seconds, e.g. 0.5, or 500ms)")
    number = float(match.group(1))
    return number / 1e3 if match.group(2) == "ms" else number


def _limits(raw: Mapping[str, Any], where: str) -> dict[str, float | None]:
    """Normalize ``{ttft|ttft_s|tpot|...: value}`` to ``{ttft_s: seconds|None, ...}`` (given keys only)."""
    out: dict[str, float | None] = {}
    for key, value in raw.items():
        name = _LIMIT_KEYS.get(str(key).strip().lower())
        if name is None:
            raise ValueError(f"{where}: unknown SLO key {key!r}; known: ttft, tpot, e2e")
        out[name] = parse_seconds(value)
    return out


@dataclass(frozen=True)
class SloSpec:
    """The SLO of every request class: ``classes[name]``, else ``default``.

    Built from CLI strings (:meth:`parse`), a dict (:meth:`from_dict`) or a YAML/JSON file
    (:meth:`load`). A class's unspecified limits are inherited from the default; an explicit
    ``none`` (``null`` in YAML) removes that limit for the class.
    """

    default: Slo = field(default_factory=Slo)
    classes: Mapping[str, Slo] = field(default_factory=dict)

    def for_class(self, slo_class: str) -> Slo:
        return self.classes.get(slo_class, self.default)

    def meets(self, result: RequestResult) -> bool:
        """Whether ``result`` meets the SLO of its own class (see :func:`meets`)."""
        return meets(result, self.for_class(result.slo_class))

    @classmethod
    def _build(
        cls, default_raw: Mapping[str, float | None], class_raw: Mapping[str, Mapping[str, float | None]]
    ) -> SloSpec:
        default = Slo(**default_raw)
        classes = {name: Slo(**{**default.to_dict(), **raw}) for name, raw in class_raw.items()}
        return cls(default=default, classes=classes)

    @classmethod
    def parse(cls, specs: str | Iterable[str]) -> SloSpec:
        """From CLI strings: ``"ttft=0.5,tpot=0.05"`` sets the default; ``"class=chat:ttft=1,tpot=0.1"``
        (or ``class=chat,ttft=1``) a class. Values are seconds (``500ms`` also works); a later
        string for the same class overrides single keys of an earlier one."""
        if isinstance(specs, str):
            specs = [specs]
        default_raw: dict[str, float | None] = {}
        class_raw: dict[str, dict[str, float | None]] = {}
        for spec in specs:
            name: str | None = None
            pairs: dict[str, str] = {}
            for token in re.split(r"[,:]", spec):
                token = token.strip()
                if not token:
                    continue
                key, sep, value = token.partition("=")
                if not sep:
                    raise ValueError(f"SLO {spec!r}: expected key=value, got {token!r}")
                key = key.strip().lower()
                if key == "class":
                    name = value.strip()
                    if not name:
                        raise ValueError(f"SLO {spec!r}: empty class name")
                else:
                    pairs[key] = value
            limits = _limits(pairs, f"SLO {spec!r}")
            if name is None or name == DEFAULT_CLASS:
                default_raw.update(limits)
            else:
                class_raw.setdefault(name, {}).update(limits)
        return cls._build(default_raw, class_raw)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SloSpec:
        """From ``{"default": {...}, "classes": {name: {...}}}`` (what :meth:`to_dict` writes), the
        flat ``{"default": {...}, name: {...}}``, or a bare limits dict ``{"ttft": 0.5, ...}``.
        Raises ``ValueError`` for bad keys or values, ``TypeError`` for a non-mapping."""
        if not data:
            return cls()
        if not isinstance(data, Mapping):
            raise TypeError(f"SLO: expected a mapping, got {data!r}")
        if all(str(key).strip().lower() in _LIMIT_KEYS for key in data):
            return cls._build(_limits(data, "SLO"), {})
        default_raw = _limits(data.get(DEFAULT_CLASS) or {}, "SLO default")
        if "classes" in data:
            extra = set(data) - {DEFAULT_CLASS, "classes"}
            if extra:
                raise ValueError(f"SLO: unexpected keys {sorted(extra)} beside 'default' and 'classes'")
            raw_classes = data["classes"] or {}
        else:
            raw_classes = {name: value for name, value in data.items() if name != DEFAULT_CLASS}
        class_raw = {}
        for name, raw in raw_classes.items():
            if not isinstance(raw, Mapping):
                raise TypeError(f"SLO class {name!r}: expected a mapping of limits, got {raw!r}")
            class_raw[str(name)] = _limits(raw, f"SLO class {name!r}")
        return cls._build(default_raw, class_raw)

    @classmethod
    def load(cls, path: str | Path) -> SloSpec:
        """From a YAML or JSON file (JSON is YAML)."""
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        """Fully resolved limits: ``{"default": {...}, "classes": {name: {...}}}``."""
        return {
            "default": self.default.to_dict(),
            "classes": {name: slo.to_dict() for name, slo in sorted(self.classes.items())},
        }

    def describe(self) -> str:
        parts = [f"default: {self.default.describe()}"]
        parts += [f"{name}: {slo.describe()}" for name, slo in sorted(self.classes.items())]
        return "; ".join(parts)


def meets(result: RequestResult, slo: Slo) -> bool:
    """Whether one request meets ``slo``.

    A request meets its SLO iff all of:

    * it succeeded (``result.ok``: HTTP 200 and no error);
    * ``slo.ttft_s`` is unset, or the TTFT is known and ``TTFT <= slo.ttft_s`` (a successful
      request that produced no output token has no TTFT and misses a TTFT limit);
    * ``slo.tpot_s`` is unset, or TPOT is ``None`` (fewer than two output tokens), or
      ``TPOT <= slo.tpot_s``, where ``TPOT = (E2E - TTFT) / (output_tokens - 1)``;
    * ``slo.e2e_s`` is unset, or ``E2E <= slo.e2e_s``.

    Limits are inclusive.
    """
    if not result.ok:
        return False
    if slo.ttft_s is not None:
        ttft = result.ttft_s
        if ttft is None or ttft > slo.ttft_s:
            return False
    if slo.tpot_s is not None:
        tpot = result.tpot_s
        if tpot is not None and tpot > slo.tpot_s:
            return False
    return slo.e2e_s is None or result.e2e_s <= slo.e2e_s


# --------------------------------------------------------------------------- statistics


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
