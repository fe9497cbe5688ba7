"""Predicted TTFT and TPOT of a request on candidate instances, from a snapshot's cost model.

* TTFT on prefill instance ``i`` = ``wait_i`` (the gateway's FIFO estimate of what it already
  sent there) + ``prefill(uncached_i, cached_i)`` (cached = the instance's prefix hit) +
  the KV hand-off to the decode side (0 when the request is served in one leg).
* TPOT on decode instance ``j`` = the decode step time of its batch with this request added,
  ``step(B_j + 1, K_j + prompt + expected_output / 2)``, over the share of its time left by the
  prompts it prefills (colocated ones stall its batch).

Used by the SLO plugins (scorers, filter, admitter) so they agree on one set of numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from pdgate.scheduler.costmodel.model import CostModel, expected_output_tokens
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo


class TtftEstimate(NamedTuple):
    """The predicted TTFT of a request on one prefill (or colocated) instance, by term.

    A named tuple (immutable, built several times per request, where a frozen dataclass's
    ``__init__`` cost three times as much)."""

    instance_id: str
    wait_s: float
    prefill_s: float
    handoff_s: float
    cached_tokens: int

    @property
    def total_s(self) -> float:
        return self.wait_s + self.prefill_s + self.handoff_s

    @property
    def unloaded_s(self) -> float:
        """TTFT if the instance had nothing queued: the best this request can hope for there."""
        return self.prefill_s + self.handoff_s


def decode_context_of(request: RequestInfo) -> int:
    """Context tokens the request attends on average while decoding: prompt + half its output."""
    return int(request.prompt_tokens + expected_output_tokens(request.output, request.max_tokens) / 2)


def decode_seconds(request: RequestInfo, predicted: Mapping[str, float]) -> float | None:
    """How long from its dispatch the request is predicted to hold a place in its decode batch:
    the wait and prefill before its first token, the hand-off, then its expected output at its
    predicted TPOT (``predicted`` is the placement's, :class:`Observation.predicted`); None
    without a TPOT prediction."""
    tpot = predicted.get("tpot_s")
    if tpot is None:
        return None
    first_token = predicted.get("wait_s", 0.0) + predicted.get("prefill_s", 0.0) + predicted.get("handoff_s", 0.0)
    return first_token + expected_output_tokens(request.output, request.max_tokens) * tpot


def handoff_estimate(request: RequestInfo, snapshot: ClusterSnapshot, costs: CostModel) -> float:
    """The cheapest hand-off to any decode instance of the snapshot (0 with none)."""
    decoders = [i for i in snapshot.instances if i.role == "decode" and i.available]
    if not decoders:
        return 0.0
    return min(costs.handoff_s(d, request.prompt_tokens) for d in decoders)


def ttft_estimates(
    request: RequestInfo,
    snapshot: ClusterSnapshot,
    candidates: Iterable[InstanceView],
    costs: CostModel,
    handoff_s: float | None = None,
) -> list[TtftEstimate]:
    """One :class:`TtftEstimate` per candidate prefill (or colocated) instance."""
    split_handoff = handoff_estimate(request, snapshot, costs) if handoff_s is None else handoff_s
    hits = snapshot.prefix_hit_tokens
    out = []
    for inst in candidates:
        cached = min(hits.get(inst.id, 0), max(0, request.prompt_tokens - 1))
        prefill = costs.prefill_s(inst, request.prompt_tokens - cached, cached)
        out.append(
            TtftEstimate(inst.id, inst.prefill_wait_s, prefill, 0.0 if inst.role == "both" else split_handoff, cached)
        )
    return out


MAX_PREFILL_SHARE = 0.8  # beyond this the estimate says "five times the step", not "forever"


def tpot_estimate(
    request: RequestInfo, instance: InstanceView, costs: CostModel, extra_prefill_share: float = 0.0
) -> float:
    """Predicted TPOT of ``instance``'s decode batch once ``request`` joins it: its step time,
    stretched by the share of the instance's time that prefills take (colocated prompts stall
    the batch: ``step / (1 - share)``), ``extra_prefill_share`` being what this request's own
    prefill would add."""
    step = costs.decode_step_s(
        instance, instance.decode_inflight + 1, instance.decode_context_tokens + decode_context_of(request)
    )
    share = min(MAX_PREFILL_SHARE, instance.prefill_share + extra_prefill_share)
    return step / (1.0 - share) if share > 0 else step


def tpot_limit(request: RequestInfo, instance: InstanceView) -> float | None:
    """The strictest TPOT SLO the batch would have to keep: the request's and those already on it."""
    own, batch = request.slo.tpot_s, instance.tightest_tpot_s
    if batch is None or own is None:
        return own if batch is None else batch
    return min(own, batch)
