"""Synthetic workloads: lists of :class:`~loadgen.types.BenchRequest`, reproducible from a seed.

Every generator takes a :class:`~loadgen.prompts.PromptBuilder` (the tokenizer that counts) and a
``seed``; the same builder seed and workload seed give identical requests. Common conventions:

* ``max_tokens`` is the request's output length and ``extra`` is ``{"ignore_eos": True}`` unless
  ``ignore_eos=False``, so the server generates exactly that many tokens.
* ``prompt_tokens``: for completions the exact token count of the prompt text (special tokens such
  as a BOS, which the server adds, not included); for chat the count of the rendered chat template
  (:meth:`PromptBuilder.chat_tokens`), which is what the engine reports as prompt tokens.
* Lengths are given as an ``int`` or a :class:`LengthDist` (or its string form, see
  :meth:`LengthDist.parse`).
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.types import Api, BenchRequest


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


def _dist(length: LengthSpec) -> LengthDist:
    return LengthDist.parse(length)


def _extra(ignore_eos: bool) -> dict[str, Any]:
    return {"ignore_eos": True} if ignore_eos else {}


def _request(
    index: int,
    api: Api,
    builder: PromptBuilder,
    text: str,
    tokens: int,
    max_tokens: int,
    *,
    ignore_eos: bool,
    system: str | None = None,
    **fields: Any,
) -> BenchRequest:
    """A single-prompt request: ``text`` (of ``tokens`` tokens) after an optional ``system`` text."""
    if api == "chat":
        messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": text})
        return BenchRequest(
            index=index,
            api="chat",
            max_tokens=max_tokens,
            messages=tuple(messages),
            prompt_tokens=builder.chat_tokens(messages),
            extra=_extra(ignore_eos),
            **fields,
        )
    if api != "completions":
        raise ValueError(f"api must be 'completions' or 'chat', not {api!r}")
    prompt = text if system is None else system + text
    return BenchRequest(
        index=index,
        api="completions",
        max_tokens=max_tokens,
        prompt=prompt,
        prompt_tokens=tokens,
        extra=_extra(ignore_eos),
        **fields,
    )


def synthetic(
    n: int,
    input_dist: LengthSpec,
    output_dist: LengthSpec,
    builder: PromptBuilder,
    seed: int = 0,
    api: Api = "completions",
    *,
    ignore_eos: bool = True,
    slo_class: str = "default",
) -> list[BenchRequest]:
    """``n`` independent requests with random prompts; input (prompt text) and output lengths
    drawn from the distributions."""
    inputs, outputs = _dist(input_dist), _dist(output_dist)
    rng = random.Random(f"synthetic:{seed}")
    requests = []
    for i in range(n):
        n_in, n_out = inputs.sample(rng), outputs.sample(rng)
        requests.append(
            _request(i, api, builder, builder.text(n_in, rng), n_in, n_out, ignore_eos=ignore_eos, slo_class=slo_class)
        )
    return requests


def shared_prefix(
    tenants: int,
    prefix_tokens: int,
    questions_per_tenant: int,
    question_tokens: LengthSpec,
    output_tokens: LengthSpec,
    builder: PromptBuilder,
    seed: int = 0,
    api: Api = "completions",
    *,
    ignore_eos: bool = True,
    slo_class: str = "default",
) -> list[BenchRequest]:
    """``tenants`` system prompts of ``prefix_tokens`` tokens each, each followed by
    ``questions_per_tenant`` different short questions; tenants interleaved in a seeded random
    order. Chat puts the prefix in a system message; completions prepends it to the question, and
    the prompt's tokens are exactly the prefix's followed by the question's."""
    questions, outputs = _dist(question_tokens), _dist(output_tokens)
    rng = random.Random(f"shared_prefix:{seed}")
    prefixes = [
        builder.block_text(f"tenant-{seed}-{t}", prefix_tokens) if prefix_tokens else "" for t in range(tenants)
    ]
    order = [t for t in range(tenants) for _ in range(questions_per_tenant)]
    rng.shuffle(order)
    requests = []
    for i, tenant in enumerate(order):
        n_q, n_out = questions.sample(rng), outputs.sample(rng)
        requests.append(
            _request(
                i,
                api,
                builder,
                builder.text(n_q, rng),
                prefix_tokens + n_q,
                n_out,
                ignore_eos=ignore_eos,
                system=prefixes[tenant] or None,
                slo_class=slo_class,
            )
        )
    return requests


def multi_turn(
    conversations: int,
    turns: int,
    question_tokens: LengthSpec,
    answer_tokens: LengthSpec,
    builder: PromptBuilder,
    seed: int = 0,
    *,
    ignore_eos: bool = True,
    slo_class: str = "default",
) -> list[BenchRequest]:
    """Chat conversations of ``turns`` turns. Turn ``k`` of conversation ``i`` (``session
    "conv-i"``, ``turn=k``) sends the history (the earlier questions, each followed by a synthetic
    assistant answer of that turn's answer length) plus a new question, and asks for an answer of
    that length (``max_tokens``). Requests are ordered turn by turn (every conversation's turn 0,
    then every turn 1, ...), so conversations progress side by side; the runner sends a turn only
    after the session's previous one ends."""
    questions, answers = _dist(question_tokens), _dist(answer_tokens)
    rng = random.Random(f"multi_turn:{seed}")
    plans = []
    for _ in range(conversations):
        plan = []
        for _ in range(turns):
            n_q, n_a = questions.sample(rng), answers.sample(rng)
            plan.append((builder.text(n_q, rng), builder.text(n_a, rng), n_a))
        plans.append(plan)
    requests = []
    for k in range(turns):
        for c, plan in enumerate(plans):
            messages: list[dict[str, Any]] = []
            for question, answer, _ in plan[:k]:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            messages.append({"role": "user", "content": plan[k][0]})
            requests.append(
                BenchRequest(
                    index=len(requests),
                    api="chat",
                    max_tokens=plan[k][2],
                    messages=tuple(messages),
                    prompt_tokens=builder.chat_tokens(messages),
                    session=f"conv-{c}",
                    turn=k,
                    slo_class=slo_class,
                    extra=_extra(ignore_eos),
                )
            )
    return requests
