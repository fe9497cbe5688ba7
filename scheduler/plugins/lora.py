"""LoRA affinity: a request for an adapter goes where the adapter is, or where it can be loaded."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pdgate.scheduler.estimates import tpot_estimate, tpot_limit, ttft_estimates
from pdgate.scheduler.framework import Filter, PluginParams
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo


class LoraAffinityParams(PluginParams):
    measure: Literal["ttft", "tpot"] = Field(
        "ttft", description="what overloads instances: their predicted TTFT (prefill, colocated) or TPOT (decode)"
    )
    load_s: float = Field(
        0.5, ge=0, description="seconds an on-demand load is taken to add to the TTFT where it is loaded"
    )
    spill_queue_depth: int = Field(
        8,
        ge=1,
        description="without a cost model or SLO: instances with this many requests (queue_depth) are overloaded",
    )


class LoraAffinityFilter(Filter):
    """Keeps the instances that serve the request's LoRA adapter, or that may load it.

    A request without an adapter keeps every candidate. For adapter ``a``:

    * ``holders``: candidates that serve ``a`` (``InstanceView.loras``);
    * ``loadable`` (only when the request's ``lora.loadable``): candidates that lack ``a`` and can
      load adapters at run time (``lora_room`` not None) where ``a`` did not fail lately; among
      them, those with room (``lora_room > 0``) come first.

    Keeps ``holders``, unless there are none (then ``loadable``: with room if any, else all of
    them, where the engine will evict its least recently used adapter), or they are overloaded and
    an instance with room would do better (then the ones with room). Overloaded, by ``measure``:

    * ``ttft`` with a cost model and a TTFT SLO: every holder's predicted TTFT misses the SLO,
      while one with room meets it with ``load_s`` added;
    * ``tpot`` with a cost model and a TPOT limit: every holder's predicted TPOT misses the
      strictest TPOT SLO of its batch, while one with room keeps its own;
    * otherwise: every holder has at least ``spill_queue_depth`` requests (``queue_depth``) while
      one with room has at most half as many.
    """

    type_name = "lora-affinity"
    Params = LoraAffinityParams

    def filter(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> list[InstanceView]:
        lora = request.lora
        if lora is None:
            return candidates
        name = lora.name
        holders = [c for c in candidates if name in c.loras]
        if not lora.loadable:
            return holders
        loadable = [
            c for c in candidates if c.lora_room is not None and name not in c.loras and name not in c.lora_failed
        ]
        with_room = [c for c in loadable if c.lora_room]
        if not holders:
            return with_room or loadable
        if with_room and self.overloaded(request, snapshot, holders, with_room):
            return with_room
        return holders

    def overloaded(
        self, request: RequestInfo, snapshot: ClusterSnapshot, holders: list[InstanceView], spare: list[InstanceView]
    ) -> bool:
        """Whether every holder is overloaded while one of ``spare`` would do (see the class doc)."""
        params: LoraAffinityParams = self.params  # type: ignore[assignment]
        costs = snapshot.costs
        if costs is not None and params.measure == "ttft" and request.slo.ttft_s is not None:
            slo = request.slo.ttft_s
            held = ttft_estimates(request, snapshot, holders, costs, handoff_s=0.0)
            free = ttft_estimates(request, snapshot, spare, costs, handoff_s=0.0)
            return min(e.total_s for e in held) > slo and min(e.total_s for e in free) + params.load_s <= slo
        if costs is not None and params.measure == "tpot":
            limits = [(tpot_estimate(request, i, costs), tpot_limit(request, i)) for i in holders]
            if all(limit is not None for _, limit in limits):
                return all(tpot > limit for tpot, limit in limits if limit is not None) and any(
                    (limit := tpot_limit(request, i)) is not None and tpot_estimate(request, i, costs) <= limit
                    for i in spare
                )
        depth = params.spill_queue_depth
        return min(h.queue_depth for h in holders) >= depth and min(s.queue_depth for s in spare) * 2 <= depth
