"""In-tree scorers. Scores are in [0, 1], higher is better; weights live in the profile."""

from __future__ import annotations

from collections.abc import Mapping

from pdgate.scheduler.framework import PluginParams, Scorer
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo


class LeastLoadedScorer(Scorer):
    """Fewer queued + running requests is better.

    ``load_i = max(running_i + waiting_i, inflight_i)`` (engine metrics vs the gateway's own
    count, whichever is larger: metrics lag, in-flight counts miss other gateways' traffic);
    ``score_i = 1 - (load_i - min load) / (max load - min load)``, 1 for all when loads are equal.
    """

    type_name = "least-loaded"

    def score(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> Mapping[str, float]:
        loads = {i.id: i.queue_depth for i in candidates}
        return _inverse_minmax(loads)


class KvUsageScorerParams(PluginParams):
    unknown_score: float = 0.5


class KvUsageScorer(Scorer):
    """More free KV cache is better: ``score_i = 1 - kv_usage_i`` (``unknown_score`` if not scraped)."""

    type_name = "kv-usage"
    Params = KvUsageScorerParams

    def score(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> Mapping[str, float]:
        unknown = self.params.unknown_score  # type: ignore[attr-defined]
        return {i.id: unknown if i.kv_usage is None else 1.0 - i.kv_usage for i in candidates}


class PrefixAffinityScorer(Scorer):
    """More of the prompt already cached is better.

    ``score_i = hit_tokens_i / prompt_tokens``: the fraction of the prompt whose leading KV
    blocks instance ``i`` holds, from the prefix index (exact from KV events, or approximate).
    """

    type_name = "prefix-affinity"

    def score(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> Mapping[str, float]:
        if request.prompt_tokens <= 0:
            return {i.id: 0.0 for i in candidates}
        hits = snapshot.prefix_hit_tokens
        return {i.id: hits.get(i.id, 0) / request.prompt_tokens for i in candidates}


def _inverse_minmax(values: Mapping[str, float]) -> dict[str, float]:
    if not values:
        return {}
    low, high = min(values.values()), max(values.values())
    if high == low:
        return {k: 1.0 for k in values}
    return {k: 1.0 - (v - low) / (high - low) for k, v in values.items()}
