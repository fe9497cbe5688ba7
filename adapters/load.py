"""Engine load read from the engines' own Prometheus ``/metrics``, under their own names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

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


def scrape_path(flavour: str) -> str:
    """``/metrics`` asking for only the series :func:`parse_load` reads (prometheus_client's
    ``name[]`` filter, which vLLM's and SGLang's endpoints honour; an engine that ignores it
    sends everything, which parses the same)."""
    running_names, waiting_names, usage_names = METRIC_NAMES[flavour]
    names = [*running_names, *waiting_names, *usage_names, *(n for n in PREFIX_COUNTERS[flavour] if n)]
    return "/metrics?" + urlencode([("name[]", name) for name in names])


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
    """Sum each gauge over its label sets (one engine may report several, e.g. per DP rank).

    Only the few lines whose metric name we need are parsed (an engine's exposition is tens of
    KB; a full parse would block the event loop for milliseconds on every scrape).
    """
    running_names, waiting_names, usage_names = METRIC_NAMES[flavour]
    queries_name, hits_name = PREFIX_COUNTERS[flavour]
    wanted = tuple(n for n in (*running_names, *waiting_names, *usage_names, queries_name, hits_name) if n)
    values: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line.startswith(wanted):
            continue
        brace = line.find("{")
        name = line[: brace if brace >= 0 else line.find(" ")]
        if name not in wanted:
            continue  # a longer name sharing the prefix (e.g. *_created)
        rest = line[line.rfind("}") + 1 :] if brace >= 0 else line[len(name) :]
        fields = rest.split()
        if fields:
            try:
                values.setdefault(name, []).append(float(fields[0]))
            except ValueError as exc:
                raise ValueError(f"malformed metric line: {line[:200]!r}") from exc

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
