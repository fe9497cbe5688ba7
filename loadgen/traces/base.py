"""What every trace and dataset reader shares: the common options, and turning drafts into requests."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

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
class Draft:
    """A request before indexing: its text or messages, lengths and trace time (seconds)."""

    text: str | None
    messages: tuple[dict[str, Any], ...] | None
    prompt_tokens: int
    max_tokens: int
    time_s: float | None = None


def finish(drafts: Iterable[Draft], sel: Selection) -> list[BenchRequest]:
    """Filter, limit, order by time and index the drafts."""
    kept: list[Draft] = []
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


def user_draft(
    builder: PromptBuilder, sel: Selection, text: str, tokens: int, max_tokens: int, time_s: float | None = None
) -> Draft:
    """A single user prompt (``text`` of ``tokens`` tokens) in the selection's API."""
    if sel.api == "chat":
        messages = ({"role": "user", "content": text},)
        return Draft(None, messages, builder.chat_tokens(messages), max_tokens, time_s)
    return Draft(text, None, tokens, max_tokens, time_s)
