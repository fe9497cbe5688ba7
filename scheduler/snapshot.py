"""Immutable inputs of one scheduling decision: the request and a snapshot of the cluster."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pdgate.scheduler.costmodel.model import CostModel
    from pdgate.scheduler.costmodel.output_length import LengthPrediction

Role = Literal["prefill", "decode", "both"]


@dataclass(frozen=True)
class InstanceView:
    """One engine instance as the scheduler sees it at decision time.

    ``running``/``waiting``/``kv_usage`` come from the engine's own metrics (``None`` when the
    last scrape is missing or stale); ``inflight_*`` are the gateway's own accounting, updated
    when a request is sent and when its stream ends.
    """

    id: str
    url: str
    role: Role  # the role it serves in now
    model: str
    flexible: bool = False  # its role may change at run time (the role balancer may move it)
    kind: str = "sim"
    healthy: bool = True
    draining: bool = False
    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None
    scrape_age_s: float | None = None
    inflight_requests: int = 0
    inflight_prefill_tokens: int = 0
    inflight_decode_tokens: int = 0
    block_size: int = 16
    capabilities: frozenset[str] = frozenset()
    cost_group: str = ""
    prefill_wait_s: float = 0.0  # predicted wait of a new prefill behind what the gateway already sent
    prefill_inflight: int = 0  # prefill legs in flight on the instance
    decode_inflight: int = 0  # decode legs in flight on the instance
    decode_context_tokens: int = 0  # context tokens those decode legs attend (prompt + half the predicted output)
    tightest_tpot_s: float | None = None  # the strictest TPOT SLO among those decode legs
    decode_free_in_s: float = 0.0  # predicted seconds until one of those decode legs ends (0: none runs)
    prefill_share: float = 0.0  # an instance that decodes: the share of its time spent prefilling lately
    loras: frozenset[str] = (
        frozenset()
    )  # LoRA adapters its engine serves (its /v1/models, and those the gateway loaded)
    lora_room: int | None = (
        None  # adapters the gateway may still load there (0: its memory is full); None: none at run time
    )
    lora_failed: frozenset[str] = frozenset()  # adapters whose load failed there lately (not tried there for a while)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> InstanceView:
        """The view whose fields have ``values`` (one entry per field, none left out), built
        without ``__init__``: a frozen dataclass's ``__init__`` sets each of its 28 fields through
        ``object.__setattr__``, which cost more than the rest of taking a snapshot. Equal to
        ``InstanceView(**values)``."""
        view = object.__new__(cls)
        view.__dict__.update(values)
        return view

    def serves(self, phase: Literal["prefill", "decode"]) -> bool:
        return self.role == phase or self.role == "both"

    @property
    def available(self) -> bool:
        """It takes new requests: healthy (circuit closed) and not draining."""
        return self.healthy and not self.draining

    @property
    def queue_depth(self) -> int:
        """Requests on the instance: the larger of what it reports and what we sent it."""
        reported = (self.running or 0) + (self.waiting or 0)
        return max(reported, self.inflight_requests)


@dataclass(frozen=True)
class SloTarget:
    """A request's latency objectives (seconds; ``None``: no limit) and its priority (higher first)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    priority: int = 0
    slo_class: str = "default"

    @property
    def best_effort(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None

    def met(self, ttft_s: float, tpot_s: float | None) -> bool:
        """Whether a request with these latencies met both objectives (no TPOT: one token)."""
        return (self.ttft_s is None or ttft_s <= self.ttft_s) and (
            self.tpot_s is None or tpot_s is None or tpot_s <= self.tpot_s
        )


@dataclass(frozen=True)
class LoraTarget:
    """The LoRA adapter a request is for (its ``model`` names the adapter, not the base model).

    ``loadable``: the gateway may load it on an instance that lacks it (the model's
    ``lora.load_on_demand`` is on and the adapter's path is known); otherwise only instances that
    serve it (``InstanceView.loras``) can take the request.
    """

    name: str
    loadable: bool = False


@dataclass(frozen=True)
class RequestInfo:
    """What the scheduler may know of a request (no prompt text)."""

    request_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    block_hashes: tuple[int, ...] = ()
    priority: int = 0
    tags: Mapping[str, str] = field(default_factory=dict)
    slo: SloTarget = field(default_factory=SloTarget)
    output: LengthPrediction | None = None  # predicted output length (cost model)
    arrival: float = 0.0  # gateway monotonic clock at arrival (deadlines count from here)
    lora: LoraTarget | None = None  # the LoRA adapter it is for (None: the base model)


PREFILL_SHARE_WINDOW_S = 5.0
"""The time constant of an instance's ``prefill_share`` (its recent prefill seconds per second)."""

OVERRUN_FACTOR = 0.5
"""A request past its predicted length is assumed to run on for this fraction of what it has generated."""


@dataclass(frozen=True)
class RunningRequest:
    """A request decoding on an instance, as a migration policy sees it."""

    request_id: str
    instance_id: str
    model: str
    prompt_tokens: int
    generated_tokens: int  # tokens the client has received so far
    max_tokens: int
    predicted_output_tokens: float | None = None  # cost model's median prediction of the total output length
    priority: int = 0
    tpot_slo_s: float | None = None
    decoding_s: float = 0.0  # seconds since its first token
    migrations: int = 0  # times it was moved already
    migratable: bool = True  # False: the gateway cannot move it (policies must skip it)

    @property
    def kv_tokens(self) -> int:
        """Prompt + generated tokens: the KV a move copies (live) or recomputes (recompute)."""
        return self.prompt_tokens + self.generated_tokens

    @property
    def remaining_tokens(self) -> float:
        """Predicted output tokens still to come, never more than ``cap = max_tokens - generated``.

        * no prediction: ``cap`` (all it may still produce);
        * before its prediction ``p`` (``generated < p``): ``min(p - generated, cap)``;
        * past it (``generated >= p``): the median was wrong, the request is in the long tail of
          the length distribution, where the expected remaining length grows with the length
          reached (a Pareto-like tail): ``min(OVERRUN_FACTOR * generated, cap)``, i.e. it runs on
          for half as many tokens as it has generated so far.
        """
        cap = float(max(0, self.max_tokens - self.generated_tokens))
        predicted = self.predicted_output_tokens
        if predicted is None or math.isnan(predicted):
            return cap
        if self.generated_tokens < predicted:
            return min(predicted - self.generated_tokens, cap)
        return min(OVERRUN_FACTOR * self.generated_tokens, cap)


@dataclass(frozen=True)
class ClusterSnapshot:
    """All instances, plus for this request how many prompt tokens each one already holds."""

    instances: tuple[InstanceView, ...]
    taken_at: float = 0.0
    prefix_hit_tokens: Mapping[str, int] = field(default_factory=dict)
    costs: CostModel | None = None  # the cost model in force (None: predictions are not available)

    def by_id(self, instance_id: str) -> InstanceView | None:
        for instance in self.instances:
            if instance.id == instance_id:
                return instance
        return None
