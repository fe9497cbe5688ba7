"""Replaying public traces and prompt datasets as lists of :class:`~loadgen.types.BenchRequest`.

Readers (each returns requests indexed ``0..n-1``):

* :func:`read_mooncake`: Mooncake JSONL (``timestamp`` ms, ``input_length``, ``output_length``,
  ``hash_ids``: one id per ``block_tokens``-token block, the last one possibly partial). The prompt
  is the concatenation of :meth:`PromptBuilder.block_text` of its ids, so requests share exactly
  the leading token blocks whose ids they share and differ right after, and the prompt has exactly
  ``input_length`` tokens (times ``scale``, see below).
* :func:`read_azure`: the Azure LLM inference CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``);
  random prompts of ``ContextTokens`` tokens, no sharing.
* :func:`read_dataset`: prompt datasets (alpaca JSON, ShareGPT JSON, generic JSONL), format detected
  from the records; real prompt text, ``max_tokens`` from the tokenized reference output.
* :func:`read_trace`: any of them, the format detected from the file (:func:`detect_format`).

Common options: ``offset`` skips that many records of the file, the length filters
(``min/max_input_tokens``, ``min/max_output_tokens``, on the lengths actually sent) drop requests,
then ``limit`` keeps the first ``limit`` remaining. Traces with timestamps set ``arrival_s``: seconds
after the earliest kept request, divided by ``speedup`` (requests are put in timestamp order; the
runner's ``trace`` arrivals apply their own speedup on top). ``max_tokens`` is the trace's output
length (at least 1) and ``extra`` is ``{"ignore_eos": True}`` unless ``ignore_eos=False``.
``prompt_tokens`` follows :mod:`loadgen.workloads`: the prompt text's tokens for completions, the
rendered chat template's for chat. Errors in a file name its line (or record, in a JSON array).
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from pdgate.common.tokenizer import Tokenizer
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.types import Api, BenchRequest

TraceFormat = Literal["mooncake", "azure", "alpaca", "sharegpt", "jsonl"]


class TraceFormatError(ValueError):
    """A trace or dataset file that does not have the expected shape (the message names where)."""


@dataclass(frozen=True)
class Selection:
    """The common options: which records become requests, and how they are sent."""

    limit: int | None = None
    offset: int = 0
    speedup: float = 1.0
    api: Api = "completions"
    min_input_tokens: int | None = None
    max_input_tokens: int | None = None
    min_output_tokens: int | None = None
    max_output_tokens: int | None = None
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        if self.speedup <= 0:
            raise ValueError("speedup must be positive")
        if self.offset < 0 or (self.limit is not None and self.limit < 0):
            raise ValueError("offset and limit must not be negative")
        if self.api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', not {self.api!r}")

    def keeps(self, input_tokens: int, output_tokens: int) -> bool:
        return (
            (self.min_input_tokens is None or input_tokens >= self.min_input_tokens)
            and (self.max_input_tokens is None or input_tokens <= self.max_input_tokens)
            and (self.min_output_tokens is None or output_tokens >= self.min_output_tokens)
            and (self.max_output_tokens is None or output_tokens <= self.max_output_tokens)
        )


@dataclass(frozen=True)
class _Draft:
    """A request before indexing: its text or messages, lengths and trace time (seconds)."""

    text: str | None
    messages: tuple[dict[str, Any], ...] | None
    prompt_tokens: int
    max_tokens: int
    time_s: float | None = None


def _finish(drafts: Iterable[_Draft], sel: Selection) -> list[BenchRequest]:
    """Filter, limit, order by time and index the drafts."""
    kept: list[_Draft] = []
    for draft in drafts:
        if sel.limit is not None and len(kept) >= sel.limit:
            break
        if sel.keeps(draft.prompt_tokens, draft.max_tokens):
            kept.append(draft)
    timed = [d.time_s for d in kept if d.time_s is not None]
    start = min(timed) if timed else 0.0
    if timed:
        kept.sort(key=lambda d: d.time_s if d.time_s is not None else start)
    extra = {"ignore_eos": True} if sel.ignore_eos else {}
    return [
        BenchRequest(
            index=i,
            api="chat" if d.messages is not None else "completions",
            max_tokens=max(1, d.max_tokens),
            prompt=d.text,
            messages=d.messages,
            prompt_tokens=d.prompt_tokens,
            arrival_s=None if d.time_s is None else (d.time_s - start) / sel.speedup,
            extra=dict(extra),
        )
        for i, d in enumerate(kept)
    ]


def _draft(
    builder: PromptBuilder, sel: Selection, text: str, tokens: int, max_tokens: int, time_s: float | None = None
) -> _Draft:
    """A single user prompt (``text`` of ``tokens`` tokens) in the selection's API."""
    if sel.api == "chat":
        messages = ({"role": "user", "content": text},)
        return _Draft(None, messages, builder.chat_tokens(messages), max_tokens, time_s)
    return _Draft(text, None, tokens, max_tokens, time_s)


# --- Mooncake ---------------------------------------------------------------------------------


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
    for where, raw in _json_lines(Path(path)):
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

    def drafts() -> Iterator[_Draft]:
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
            yield _draft(
                builder, sel, text, sum(n for _, n in parts), record.output_length, record.timestamp_ms / 1000.0
            )

    return _finish(drafts(), sel)


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


# --- Azure ------------------------------------------------------------------------------------

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

    def drafts() -> Iterator[_Draft]:
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
                yield _draft(builder, sel, builder.text(n_in, rng), n_in, n_out, time_s)

    return _finish(drafts(), sel)


# --- prompt datasets --------------------------------------------------------------------------

_HUMAN = {"human", "user"}
_ASSISTANT = {"gpt", "assistant", "chatgpt", "bard", "model"}


def read_dataset(
    path: str | Path,
    builder: PromptBuilder,
    *,
    fmt: TraceFormat | None = None,
    default_output_tokens: int | None = None,
    shuffle_seed: int | None = None,
    limit: int | None = None,
    offset: int = 0,
    api: Api = "completions",
    min_input_tokens: int | None = None,
    max_input_tokens: int | None = None,
    min_output_tokens: int | None = None,
    max_output_tokens: int | None = None,
    ignore_eos: bool = True,
) -> list[BenchRequest]:
    """Requests from a prompt dataset (``fmt`` detected when ``None``):

    * ``alpaca``: a JSON list (or JSONL) of ``{"instruction", "output"}`` with an optional
      ``"input"`` appended after a blank line;
    * ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt", "value"}, ...]}``: the first human
      turn followed by a gpt turn is the prompt and its output (records without one are skipped);
    * ``jsonl``: ``{"prompt"|"messages", "output"|"output_tokens"}`` (``messages`` is sent as is
      with ``api="chat"``, and as its rendered chat template with ``api="completions"``).

    ``max_tokens`` is the output text's token count (with ``builder.tokenizer``), or
    ``output_tokens``, or ``default_output_tokens`` when a record has neither. ``shuffle_seed``
    shuffles the records (before ``offset``/``limit``). No arrival times.
    """
    sel = Selection(
        limit, offset, 1.0, api, min_input_tokens, max_input_tokens, min_output_tokens, max_output_tokens, ignore_eos
    )
    records = _records(Path(path))
    fmt = fmt or _detect_records(Path(path), records)
    if fmt not in ("alpaca", "sharegpt", "jsonl"):
        raise TraceFormatError(f"{path}: {fmt} is a trace, not a prompt dataset")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    convert = {"alpaca": _alpaca, "sharegpt": _sharegpt, "jsonl": _generic}[fmt]

    def drafts() -> Iterator[_Draft]:
        for where, raw in records[sel.offset :]:
            try:
                draft = convert(raw, builder, sel, default_output_tokens)
            except (KeyError, TypeError, ValueError) as exc:
                detail = f"missing field {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
                raise TraceFormatError(f"{where}: bad {fmt} record: {detail}") from None
            if draft is not None:
                yield draft

    return _finish(drafts(), sel)


def _output_tokens(raw: dict[str, Any], builder: PromptBuilder, default: int | None) -> int:
    for key in ("output_tokens", "max_tokens"):
        if key in raw:
            value = raw[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be a non-negative integer")
            return value
    if "output" in raw:
        if not isinstance(raw["output"], str):
            raise ValueError("output must be a string")
        return builder.count(raw["output"])
    if default is None:
        raise ValueError("no output, output_tokens or max_tokens (pass default_output_tokens)")
    return default


def _text_draft(text: Any, output: int, builder: PromptBuilder, sel: Selection) -> _Draft:
    if not isinstance(text, str):
        raise TraceFormatError("the prompt must be a string")
    return _draft(builder, sel, text, builder.count(text), output)


def _alpaca(raw: dict[str, Any], builder: PromptBuilder, sel: Selection, default: int | None) -> _Draft:
    text = raw["instruction"]
    if raw.get("input"):
        text = f"{text}\n\n{raw['input']}"
    return _text_draft(text, _output_tokens(raw, builder, default), builder, sel)


def _sharegpt(raw: dict[str, Any], builder: PromptBuilder, sel: Selection, default: int | None) -> _Draft | None:
    turns = raw["conversations"]
    if not isinstance(turns, list):
        raise TraceFormatError("conversations must be a list")
    for turn, reply in itertools.pairwise(turns):
        if _speaker(turn) in _HUMAN and _speaker(reply) in _ASSISTANT:
            return _text_draft(_said(turn), builder.count(_said(reply)), builder, sel)
    return None


def _speaker(turn: Any) -> str:
    return str(turn.get("from", turn.get("role", ""))).lower()


def _said(turn: dict[str, Any]) -> str:
    text = turn.get("value", turn.get("content"))
    if not isinstance(text, str):
        raise TraceFormatError("a turn's value must be a string")
    return text


def _generic(raw: dict[str, Any], builder: PromptBuilder, sel: Selection, default: int | None) -> _Draft:
    output = _output_tokens(raw, builder, default)
    if "prompt" in raw:
        return _text_draft(raw["prompt"], output, builder, sel)
    messages = raw["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of {role, content}")
    if sel.api == "chat":
        return _Draft(None, tuple(messages), builder.chat_tokens(messages), output)
    text = builder.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return _Draft(text, None, builder.count(text), output)


# --- files and format detection ---------------------------------------------------------------


def _json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("PATH:LINE", object)`` for every non-blank line of a JSONL file."""
    with path.open(encoding="utf-8", errors="strict") as handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceFormatError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
                if not isinstance(value, dict):
                    raise TraceFormatError(f"{path}:{number}: expected a JSON object")
                yield f"{path}:{number}", value
        except UnicodeDecodeError as exc:
            raise TraceFormatError(f"{path}: not UTF-8 text ({exc.reason})") from None


def json_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for each object of a JSON array file (``PATH record N``) or of a JSONL
    file (``PATH:LINE``); a malformed file raises :class:`TraceFormatError` naming where."""
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _json_lines(path)
        return
    try:
        values = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        raise TraceFormatError(f"{path}{f':{line}' if line else ''}: invalid JSON: {exc}") from None
    if not isinstance(values, list):
        raise TraceFormatError(f"{path}: expected a JSON array of objects")
    for number, value in enumerate(values):
        if not isinstance(value, dict):
            raise TraceFormatError(f"{path} record {number}: expected a JSON object")
        yield f"{path} record {number}", value


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    return list(json_objects(path))


def _detect_records(path: Path, records: list[tuple[str, dict[str, Any]]]) -> TraceFormat:
    if not records:
        raise TraceFormatError(f"{path}: no records")
    keys = records[0][1].keys()
    if "hash_ids" in keys:
        return "mooncake"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    if "prompt" in keys or "messages" in keys:
        return "jsonl"
    raise TraceFormatError(
        f"{records[0][0]}: unknown record format (keys: {', '.join(sorted(keys))}); expected "
        "Mooncake hash_ids, ShareGPT conversations, alpaca instruction, or prompt/messages"
    )


def detect_format(path: str | Path) -> TraceFormat:
    """The format of a trace or dataset file, from its content."""
    path = Path(path)
    with path.open() as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(("[", "{")):
        if head.startswith("{"):  # JSONL: the first record is enough
            first = next(_json_lines(path), None)
            return _detect_records(path, [first] if first else [])
        return _detect_records(path, _records(path)[:1])
    header = [h.strip().lower() for h in head.splitlines()[0].split(",")] if head else []
    if {"timestamp", "contexttokens", "generatedtokens"} <= set(header):
        return "azure"
    raise TraceFormatError(f"{path}: unknown format (not JSON/JSONL records nor an Azure CSV)")


def read_trace(
    path: str | Path, builder: PromptBuilder, fmt: TraceFormat | Literal["auto"] = "auto", **options: Any
) -> list[BenchRequest]:
    """Any supported file: the format detected unless given; ``options`` go to the reader."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    reader: Callable[..., list[BenchRequest]]
    if fmt == "mooncake":
        reader = read_mooncake
    elif fmt == "azure":
        reader = read_azure
    else:
        return read_dataset(path, builder, fmt=fmt, **options)
    return reader(path, builder, **options)


# --- prefix-sharing structure -----------------------------------------------------------------


@dataclass(frozen=True)
class SharingStats:
    """Full blocks over a sequence of prompts and how many an unlimited prefix cache would hit
    (a block hits when the same block, after the same prefix, appeared in an earlier prompt)."""

    requests: int
    blocks: int
    unique_blocks: int
    hit_blocks: int

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.blocks if self.blocks else 0.0


def prompt_ids(request: BenchRequest, tokenizer: Tokenizer) -> list[int]:
    """The token ids of a request's prompt as counted in ``prompt_tokens`` (no special tokens
    added; chat: the rendered template)."""
    if request.api == "chat":
        text = tokenizer.apply_chat_template(list(request.messages or ()), add_generation_prompt=True)
    else:
        text = request.prompt or ""
    return tokenizer.encode(text, add_special_tokens=False)


def _sharing(chains: Iterable[Sequence[Any]]) -> SharingStats:
    nodes: dict[tuple[int, Any], int] = {}
    requests = blocks = hits = 0
    for chain in chains:
        requests += 1
        parent = -1
        for block in chain:
            blocks += 1
            key = (parent, block)
            node = nodes.get(key)
            if node is None:
                node = nodes[key] = len(nodes)
            else:
                hits += 1
            parent = node
    return SharingStats(requests, blocks, len(nodes), hits)


def block_sharing(requests: Sequence[BenchRequest], tokenizer: Tokenizer, block_tokens: int) -> SharingStats:
    """Prefix sharing measured on the prompts' token ids, in full blocks of ``block_tokens``
    (as a paged prefix cache sees them)."""

    def chains() -> Iterator[list[tuple[int, ...]]]:
        for request in requests:
            ids = prompt_ids(request, tokenizer)
            yield [tuple(ids[i : i + block_tokens]) for i in range(0, len(ids) - block_tokens + 1, block_tokens)]

    return _sharing(chains())


def trace_sharing(records: Sequence[MooncakeRecord], block_tokens: int = 512) -> SharingStats:
    """Prefix sharing a Mooncake trace declares through its hash ids (full blocks only): what
    :func:`block_sharing` measures on its replay with ``api="completions"`` and no filters."""

    def chains() -> Iterator[Sequence[int]]:
        for record in records:
            full = sum(1 for n in mooncake_lengths(record, block_tokens) if n == block_tokens)
            yield record.hash_ids[:full]

    return _sharing(chains())
