"""Mooncake traces (JSONL): ``timestamp`` (ms), ``input_length``, ``output_length`` and ``hash_ids``,
one id per ``block_tokens``-token block of the prompt (the last block possibly partial).

The replayed prompt is the concatenation of :meth:`PromptBuilder.block_text` of its ids, so requests
share exactly the leading token blocks whose ids they share and differ right after.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pdgate.common.jsonl import json_lines
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.traces.base import Draft, Selection, TraceFormatError, finish, user_draft
from pdgate.loadgen.types import Api, BenchRequest


@dataclass(frozen=True)
class MooncakeRecord:
    """One line of a Mooncake trace."""

    line: int
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def parse_mooncake(path: str | Path) -> list[MooncakeRecord]:
    """The records of a Mooncake JSONL file; malformed lines raise ``ValueError`` naming the line."""
    records = []
    for where, raw in json_lines(path, error=TraceFormatError):
        try:
            hash_ids = tuple(int(h) for h in raw["hash_ids"])
            record = MooncakeRecord(
                int(where.split(":")[-1]),
                float(raw.get("timestamp", 0)),
                int(raw["input_length"]),
                int(raw["output_length"]),
                hash_ids,
            )
        except KeyError as exc:
            raise TraceFormatError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise TraceFormatError(f"{where}: bad Mooncake record: {exc}") from None
        if record.input_length < 0 or record.output_length < 0:
            raise TraceFormatError(f"{where}: negative length")
        records.append(record)
    return records


def mooncake_lengths(record: MooncakeRecord, block_tokens: int = 512) -> list[int]:
    """Trace tokens in each of ``record``'s blocks: full blocks, the last one possibly partial."""
    n = len(record.hash_ids)
    last = record.input_length - block_tokens * (n - 1)
    if n == 0 and record.input_length == 0:
        return []
    if n == 0 or not 0 < last <= block_tokens:
        raise TraceFormatError(
            f"line {record.line}: input_length {record.input_length} does not fit {n} blocks of {block_tokens} tokens"
        )
    return [block_tokens] * (n - 1) + [last]


def read_mooncake(
    source: str | Path | Sequence[MooncakeRecord],
    builder: PromptBuilder,
    *,
    block_tokens: int = 512,
    scale: float = 1.0,
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
    """Replay a Mooncake trace (a path or parsed records).

    ``block_tokens`` is the trace's block size. ``scale`` shrinks (or grows) prompts while keeping
    the sharing structure: every full block becomes ``max(1, round(block_tokens * scale))`` tokens
    and a partial last block is scaled likewise (kept shorter than a full one). So the prompt has
    ``input_length`` tokens exactly at ``scale=1``. ``truncate_input_tokens`` then cuts prompts to
    at most that many tokens (dropping trailing blocks, which keeps every request and the sharing of
    what remains). Output lengths are not scaled. Length filters apply to the prompt as sent.
    """
    if block_tokens <= 0 or scale <= 0:
        raise ValueError("block_tokens and scale must be positive")
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
    records = parse_mooncake(source) if isinstance(source, (str, Path)) else list(source)
    scaled = max(1, round(block_tokens * scale))

    def drafts() -> Iterator[Draft]:
        for record in records[sel.offset :]:
            parts = []
            for hash_id, length in zip(record.hash_ids, mooncake_lengths(record, block_tokens), strict=False):
                if length == block_tokens:
                    parts.append((hash_id, scaled))
                else:
                    parts.append((hash_id, max(1, min(scaled - 1, round(length * scale)))))
            if truncate_input_tokens is not None:
                parts = _truncate(parts, truncate_input_tokens)
            text = "".join(builder.block_text(h, scaled, take=n) for h, n in parts)
            yield user_draft(
                builder, sel, text, sum(n for _, n in parts), record.output_length, record.timestamp_ms / 1000.0
            )

    return finish(drafts(), sel)


def _truncate(parts: list[tuple[int, int]], cap: int) -> list[tuple[int, int]]:
    out, total = [], 0
    for hash_id, n in parts:
        if total + n > cap:
            if cap > total:
                out.append((hash_id, cap - total))
            break
        out.append((hash_id, n))
        total += n
    return out
