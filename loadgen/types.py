"""The load generator's data: what to send (:class:`BenchRequest`) and what happened
(:class:`RequestResult`). Every other ``loadgen`` module works on these two.

Times in a result are seconds on the client's monotonic clock, relative to the run's start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Api = Literal["completions", "chat"]


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload, fully built before the run (so a seed reproduces it)."""

    index: int
    api: Api
    max_tokens: int
    prompt: str | None = None  # completions
    messages: tuple[dict[str, Any], ...] | None = None  # chat
    prompt_tokens: int = 0  # the length it was built to, with the workload's tokenizer
    arrival_s: float | None = None  # the trace's own send time (None: the arrival process decides)
    slo_class: str = "default"
    session: str | None = None  # a multi-turn conversation: its turns go in order, each after the last ends
    turn: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # more body fields (ignore_eos, priority, ...)
    headers: dict[str, str] = field(default_factory=dict)  # more request headers (a tenant, SLO headers, ...)

    def body(self, model: str, stream: bool = True) -> dict[str, Any]:
        """The OpenAI request body."""
        body: dict[str, Any] = {"model": model, "max_tokens": self.max_tokens, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.api == "chat":
            body["messages"] = list(self.messages or ())
        else:
            body["prompt"] = self.prompt or ""
        body.update(self.extra)
        return body


@dataclass
class RequestResult:
    """One request as the client saw it. ``chunk_times`` are the arrival times of the response
    chunks that carried output (the first one is the TTFT)."""

    index: int
    target: str
    slo_class: str
    scheduled_s: float  # when the arrival process wanted it sent
    sent_s: float
    end_s: float
    first_token_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0  # from usage when the server reports it, else the chunks counted
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    status: int = 0  # HTTP status; 0 when no response arrived
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); ``None`` for fewer than two tokens."""
        if self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def inter_chunk_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestResult:
        return cls(**data)
