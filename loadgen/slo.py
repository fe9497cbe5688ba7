"""Service-level objectives: per-class latency limits, and whether a request met its own.

Definitions (all times in seconds, on the client's clock, relative to the run's start):

* **TTFT** ``first_token_s - sent_s``; **TPOT** ``(E2E - TTFT) / (output_tokens - 1)`` (``None``
  for fewer than two tokens); **E2E** ``end_s - sent_s``.
* A request **meets** its SLO as :func:`meets` says; a failed request never does.

What a whole run made of them (attainment, goodput, percentiles) is :mod:`loadgen.stats`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pdgate.common.yamlfile import read_yaml_mapping
from pdgate.loadgen.types import RequestResult

DEFAULT_CLASS = "default"
_LIMIT_KEYS = {
    "ttft": "ttft_s",
    "ttft_s": "ttft_s",
    "tpot": "tpot_s",
    "tpot_s": "tpot_s",
    "e2e": "e2e_s",
    "e2e_s": "e2e_s",
}
_NO_LIMIT = {"none", "null", "inf", "infinity", "off", ""}
_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)?\s*$")


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
        """From a YAML or JSON file (JSON is YAML); an empty file means no limits. Raises
        :class:`~pdgate.common.yamlfile.YamlFileError` (a ``ValueError``) naming the file when it is
        missing, not YAML or not a mapping, and ``ValueError`` for bad keys or values."""
        return cls.from_dict(read_yaml_mapping(path, what="a mapping of SLO limits"))

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
