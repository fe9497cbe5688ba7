"""Token length distributions for synthetic workloads: fixed, uniform, lognormal, or read from a file."""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token lengths (always integers >= 1).

    ``fixed`` (``params = (n,)``), ``uniform`` (``(lo, hi)``, inclusive), ``lognormal``
    (``(mean, sigma, max)``: ``mean`` is the distribution's mean, ``sigma`` the log-space standard
    deviation, samples clipped to ``1..max``; ``max`` 0 means no upper clip) or ``empirical``
    (``values``, sampled uniformly).
    """

    kind: str
    params: tuple[float, ...] = ()
    values: tuple[int, ...] = ()

    @classmethod
    def parse(cls, spec: LengthSpec) -> LengthDist:
        """``"128"``/``"fixed:128"``, ``"uniform:64:512"``, ``"lognormal:1024:0.5[:MAX]"``,
        ``"file:PATH[:COLUMN]"`` (one number per line, or a CSV column by name or 0-based index)."""
        if isinstance(spec, LengthDist):
            return spec
        if isinstance(spec, int):
            return cls.fixed(spec)
        text = spec.strip()
        kind, _, rest = text.partition(":")
        try:
            if kind.isdigit() and not rest:
                return cls.fixed(int(kind))
            if kind == "file":
                return cls.from_file(*_split_file_spec(rest))
            args = [float(a) for a in rest.split(":")] if rest else []
            if kind == "fixed" and len(args) == 1:
                return cls.fixed(_as_int(args[0]))
            if kind == "uniform" and len(args) == 2:
                return cls.uniform(_as_int(args[0]), _as_int(args[1]))
            if kind == "lognormal" and len(args) in (2, 3):
                return cls.lognormal(args[0], args[1], _as_int(args[2]) if len(args) == 3 else None)
        except ValueError as exc:
            raise ValueError(f"bad length distribution {spec!r}: {exc}") from None
        raise ValueError(
            f"bad length distribution {spec!r}: expected fixed:N, uniform:LO:HI, "
            "lognormal:MEAN:SIGMA[:MAX] or file:PATH[:COLUMN]"
        )

    @classmethod
    def fixed(cls, n: int) -> LengthDist:
        if n < 1:
            raise ValueError("a length must be at least 1")
        return cls("fixed", (n,))

    @classmethod
    def uniform(cls, lo: int, hi: int) -> LengthDist:
        if not 1 <= lo <= hi:
            raise ValueError("uniform needs 1 <= LO <= HI")
        return cls("uniform", (lo, hi))

    @classmethod
    def lognormal(cls, mean: float, sigma: float, max_len: int | None = None) -> LengthDist:
        if mean < 1 or sigma < 0:
            raise ValueError("lognormal needs MEAN >= 1 and SIGMA >= 0")
        if max_len is not None and max_len < 1:
            raise ValueError("lognormal MAX must be at least 1")
        return cls("lognormal", (mean, sigma, max_len or 0))

    @classmethod
    def empirical(cls, values: list[int] | tuple[int, ...]) -> LengthDist:
        if not values:
            raise ValueError("an empirical distribution needs at least one value")
        if min(values) < 1:
            raise ValueError("lengths must be at least 1")
        return cls("empirical", values=tuple(values))

    @classmethod
    def from_file(cls, path: str | Path, column: str | None = None) -> LengthDist:
        """Lengths from a file: one number per line (``#`` comments and blank lines skipped), or a
        CSV with a header whose ``column`` (name or 0-based index; optional for one column) is used."""
        return cls.empirical(read_lengths(path, column))

    def sample(self, rng: random.Random) -> int:
        """One length."""
        if self.kind == "fixed":
            return int(self.params[0])
        if self.kind == "uniform":
            return rng.randint(int(self.params[0]), int(self.params[1]))
        if self.kind == "lognormal":
            mean, sigma, cap = self.params
            value = max(1, round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))
            return min(value, int(cap)) if cap else value
        if self.kind == "empirical":
            return rng.choice(self.values)
        raise ValueError(f"unknown length distribution {self.kind!r}")

    def __str__(self) -> str:
        if self.kind == "empirical":
            return f"empirical({len(self.values)} values)"
        return ":".join([self.kind, *(f"{p:g}" for p in self.params if not (self.kind == "lognormal" and p == 0))])


LengthSpec = int | str | LengthDist


def _as_int(value: float) -> int:
    if value != int(value):
        raise ValueError(f"{value} is not a whole number")
    return int(value)


def _split_file_spec(rest: str) -> tuple[str, str | None]:
    """``PATH`` or ``PATH:COLUMN`` (a path that exists as given wins over a column split)."""
    if not rest:
        raise ValueError("file: needs a path")
    if Path(rest).exists() or ":" not in rest:
        return rest, None
    path, column = rest.rsplit(":", 1)
    return path, column


def read_lengths(path: str | Path, column: str | None = None) -> list[int]:
    """The lengths in ``path`` (see :meth:`LengthDist.from_file`); errors name the line."""
    path = Path(path)
    with path.open(newline="") as handle:
        rows = [
            (n, row)
            for n, row in enumerate(csv.reader(handle), 1)
            if row and any(c.strip() for c in row) and not row[0].lstrip().startswith("#")
        ]
    if not rows:
        raise ValueError(f"{path}: no lengths")
    header = [c.strip() for c in rows[0][1]]
    if all(_is_number(c) for c in header):
        header = []
    else:
        rows = rows[1:]
    if column is None:
        width = len(header) if header else len(rows[0][1]) if rows else 1
        if width != 1:
            raise ValueError(f"{path}: {width} columns, name one ({', '.join(header) or '0, 1, ...'})")
        index = 0
    elif column in header:
        index = header.index(column)
    elif column.isdigit():
        index = int(column)
    else:
        raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(header)})")
    values = []
    for line, row in rows:
        if index >= len(row):
            raise ValueError(f"{path}:{line}: no column {index}")
        cell = row[index].strip()
        try:
            value = float(cell)
        except ValueError:
            raise ValueError(f"{path}:{line}: not a number: {cell!r}") from None
        if not math.isfinite(value) or value < 1:
            raise ValueError(f"{path}:{line}: a length must be a number >= 1, not {cell!r}")
        values.append(round(value))
    if not values:
        raise ValueError(f"{path}: no lengths")
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
