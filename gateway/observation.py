"""What the gateway predicted for one request and what then happened (the outcome's raw record)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Observation:
    """Predicted vs actual for one request (seconds, the cluster's monotonic clock).

    Reset for every placement attempt (a retried request is observed where it finally ran);
    filled in by placement (where, predictions), the legs (prefill time, hand-off) and the relay
    (first and last token, usage), and read by the outcome recorder when the request ends.
    """

    queued_s: float = 0.0
    prefill_id: str | None = None
    prefill_group: str | None = None
    prefill_cached: int = 0  # the gateway's prefix-index estimate of the prefill leg's cache hit
    prefill_cached_reported: int | None = None  # the prefill leg's own usage.prompt_tokens_details.cached_tokens
    prefill_idle: bool = False
    decode_id: str | None = None
    decode_group: str | None = None
    split: bool = False
    pd_decision: str = ""  # the profile handler's reason for the plan's shape
    batch_at_send: int = 0
    context_at_send: int = 0
    decode_prefill_share: float = 0.0  # the decode instance's recent prefill share at placement (its stalls)
    predicted: dict[str, float] = field(default_factory=dict)
    cost_model_version: str | None = None  # the cost model that made ``predicted``
    prefill_s: float | None = None
    decode_sent: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    events: int = 0
    usage_chunk: bytes = b""  # the piece of the answer that carried the usage (output tokens), if any
    batch_at_end: int = 0
    context_at_end: int = 0
    saw_done: bool = False  # the stream's [DONE] went out (a client may hang up right after it)
    moves: int = 0  # times the stream moved to another instance (migration, failover)
    answered_by: str | None = None  # the instance that finished the answer (after moves: the last one)
    output_tokens: int | None = None  # counted from the token ids the client got (streams that can move)
    status: int = 0  # the HTTP status the client got
    error: str | None = None  # why the answer failed after it started (mid-stream)
    attempts: int = 1

    @property
    def cached_tokens(self) -> int:
        """The prompt tokens the request found in the prefill leg's prefix cache: the engine's own
        figure when it reported one, else the gateway's estimate."""
        reported = self.prefill_cached_reported
        return reported if reported is not None else self.prefill_cached
