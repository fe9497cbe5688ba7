"""Azure LLM inference traces (CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``): random prompts
of the given lengths (seeded), no prefix sharing."""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.traces.base import Draft, Selection, TraceFormatError, finish, user_draft
from pdgate.loadgen.types import Api, BenchRequest

_TIMESTAMP = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?")


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch of ``2023-11-16 18:15:46.6805900`` (any number of fraction digits,
    optional ``T``, ``Z`` or ``+hh:mm``; no zone means UTC), or a plain number of seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise ValueError(f"not a timestamp: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    zone: timezone = UTC
    if match.group(8) and match.group(8) != "Z":
        sign = -1 if match.group(8)[0] == "-" else 1
        digits = match.group(8)[1:].replace(":", "")
        zone = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    base = datetime(year, month, day, hour, minute, second, tzinfo=zone).timestamp()
    fraction = match.group(7) or "0"
    return base + int(fraction) / 10 ** len(fraction)


def read_azure(
    path: str | Path,
    builder: PromptBuilder,
    *,
    seed: int = 0,
    truncate_input_tokens: int | None = None,
    limit: int | None = None,
    offset: int = 0,
    speedup: float = 1.0,
    api: Api = "completions",
    min_input_tokens: int | None = None,
    max_input_tokens: int | None = None,
    min_output_tokens: int | None = None,
    max_output_tokens: int | None = None,
    ignore_eos: bool = True,
) -> list[BenchRequest]:
    """Replay an Azure LLM inference trace: random prompts (seeded) of ``ContextTokens`` tokens
    (cut to ``truncate_input_tokens``), ``max_tokens = GeneratedTokens``, arrivals from
    ``TIMESTAMP``. Column names are matched case-insensitively."""
    sel = Selection(
        limit,
        offset,
        speedup,
        api,
        min_input_tokens,
        max_input_tokens,
        min_output_tokens,
        max_output_tokens,
        ignore_eos,
    )
    path = Path(path)
    rng = random.Random(f"azure:{seed}")

    def drafts() -> Iterator[Draft]:
        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            try:
                cols = [header.index(name) for name in ("timestamp", "contexttokens", "generatedtokens")]
            except ValueError:
                raise TraceFormatError(
                    f"{path}:1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens"
                ) from None
            skipped = 0
            for row in reader:
                line = reader.line_num
                if not row or not any(c.strip() for c in row):
                    continue
                if skipped < sel.offset:
                    skipped += 1
                    continue
                try:
                    stamp, context, generated = (row[c] for c in cols)
                    time_s, n_in, n_out = parse_timestamp(stamp), int(context), int(generated)
                except (IndexError, ValueError) as exc:
                    raise TraceFormatError(f"{path}:{line}: bad Azure row {row!r}: {exc}") from None
                if n_in < 0 or n_out < 0:
                    raise TraceFormatError(f"{path}:{line}: negative token count")
                if truncate_input_tokens is not None:
                    n_in = min(n_in, truncate_input_tokens)
                if not sel.keeps(n_in, n_out):  # before building text nobody will send
                    continue
                yield user_draft(builder, sel, builder.text(n_in, rng), n_in, n_out, time_s)

    return finish(drafts(), sel)
