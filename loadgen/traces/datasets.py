"""Prompt datasets: alpaca (JSON or JSONL), ShareGPT (JSON), generic JSONL of prompts or messages.

Real prompt text; ``max_tokens`` from the tokenized reference output. No arrival times.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pdgate.common.jsonl import json_objects
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.traces.base import Draft, Selection, TraceFormat, TraceFormatError, finish, user_draft
from pdgate.loadgen.traces.formats import detect_records
from pdgate.loadgen.types import Api, BenchRequest

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
    records = list(json_objects(path, error=TraceFormatError))
    fmt = fmt or detect_records(Path(path), records)
    if fmt not in ("alpaca", "sharegpt", "jsonl"):
        raise TraceFormatError(f"{path}: {fmt} is a trace, not a prompt dataset")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    convert = {"alpaca": _alpaca, "sharegpt": _sharegpt, "jsonl": _generic}[fmt]

    def drafts() -> Iterator[Draft]:
        for where, raw in records[sel.offset :]:
            try:
                draft = convert(raw, builder, sel, default_output_tokens)
            except (KeyError, TypeError, ValueError) as exc:
                detail = f"missing field {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
                raise TraceFormatError(f"{where}: bad {fmt} record: {detail}") from None
            if draft is not None:
                yield draft

    return finish(drafts(), sel)


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


def _textuser_draft(text: Any, output: int, builder: PromptBuilder, sel: Selection) -> Draft:
    if not isinstance(text, str):
        raise TraceFormatError("the prompt must be a string")
    return user_draft(builder, sel, text, builder.count(text), output)


def _alpaca(raw: dict[str, Any], builder: PromptBuilder, sel: Selection, default: int | None) -> Draft:
    text = raw["instruction"]
    if raw.get("input"):
        text = f"{text}\n\n{raw['input']}"
    return _textuser_draft(text, _output_tokens(raw, builder, default), builder, sel)


def _sharegpt(raw: dict[str, Any], builder: PromptBuilder, sel: Selection, default: int | None) -> Draft | None:
    turns = raw["conversations"]
    if not isinstance(turns, list):
        raise TraceFormatError("conversations must be a list")
    for turn, reply in itertools.pairwise(turns):
        if _speaker(turn) in _HUMAN and _speaker(reply) in _ASSISTANT:
            return _textuser_draft(_said(turn), builder.count(_said(reply)), builder, sel)
    return None


def _speaker(turn: Any) -> str:
    return str(turn.get("from", turn.get("role", ""))).lower()


def _said(turn: dict[str, Any]) -> str:
    text = turn.get("value", turn.get("content"))
    if not isinstance(text, str):
        raise TraceFormatError("a turn's value must be a string")
    return text


def _generic(raw: dict[str, Any], builder: PromptBuilder, sel: Selection, default: int | None) -> Draft:
    output = _output_tokens(raw, builder, default)
    if "prompt" in raw:
        return _textuser_draft(raw["prompt"], output, builder, sel)
    messages = raw["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of {role, content}")
    if sel.api == "chat":
        return Draft(None, tuple(messages), builder.chat_tokens(messages), output)
    text = builder.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return Draft(text, None, builder.count(text), output)
