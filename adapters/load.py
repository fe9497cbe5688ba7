"""Engine load read from the engines' own Prometheus ``/metrics``, under their own names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# gauge names per engine flavour: (running, waiting, kv usage in [0, 1])
METRIC_NAMES: Mapping[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "vllm": (
        ("vllm:num_requests_running",),
        ("vllm:num_requests_waiting",),
        ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    "sglang": (
        ("sglang:num_running_reqs",),
        ("sglang:num_queue_reqs",),
        ("sglang:token_usage",),
    ),
}
PREFIX_COUNTERS: Mapping[str, tuple[str, str]] = {
    "vllm": ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"),
    "sglang": ("", ""),
}


@dataclass(frozen=True)
class EngineLoad:
    """One scrape. ``scraped_at`` is the gateway's monotonic clock."""

    running: int
    waiting: int
    kv_usage: float
    scraped_at: float
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0


def parse_load(text: str, flavour: str, scraped_at: float) -> EngineLoad:
    """Sum each gauge over its label sets (one engine may report several, e.g. per DP rank)."""
    running_names, waiting_names, usage_names = METRIC_NAMES[flavour]
    queries_name, hits_name = PREFIX_COUNTERS[flavour]
    wanted = set(running_names) | set(waiting_names) | set(usage_names) | {queries_name, hits_name}
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                values.setdefault(sample.name, []).append(sample.value)

    def first(names: tuple[str, ...], combine=sum) -> float:
        for name in names:
            if name in values:
                return float(combine(values[name]))
        return 0.0

    return EngineLoad(
        running=int(first(running_names)),
        waiting=int(first(waiting_names)),
        kv_usage=first(usage_names, combine=max),
        scraped_at=scraped_at,
        prefix_queries=first((queries_name,)) if queries_name else 0.0,
        prefix_hits=first((hits_name,)) if hits_name else 0.0,
    )
