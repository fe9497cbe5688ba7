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
# info series whose labels are read (vLLM only): the engine's cache config (its prefix-caching hash
# algorithm) and, with --enable-lora, its LoRA stats (max_lora: vLLM's --max-loras)
CACHE_CONFIG_INFO = "vllm:cache_config_info"
LORA_REQUESTS_INFO = "vllm:lora_requests_info"
INFO_SERIES: Mapping[str, tuple[str, ...]] = {"vllm": (CACHE_CONFIG_INFO, LORA_REQUESTS_INFO), "sglang": ()}


def scrape_path(flavour: str) -> str:
    """``/metrics`` asking for only the series :func:`parse_load` reads (prometheus_client's
    ``name[]`` filter, which vLLM's and SGLang's endpoints honour; an engine that ignores it
    sends everything, which parses the same)."""
    running_names, waiting_names, usage_names = METRIC_NAMES[flavour]
    names = [
        *running_names,
        *waiting_names,
        *usage_names,
        *(n for n in PREFIX_COUNTERS[flavour] if n),
        *INFO_SERIES[flavour],
    ]
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
    hash_algo: str | None = None  # vllm:cache_config_info's prefix_caching_hash_algo (None: not reported)
    max_loras: int | None = None  # vllm:lora_requests_info's max_lora (None: not reported; LoRA off or idle)


def parse_load(text: str, flavour: str, scraped_at: float) -> EngineLoad:
    """Sum each gauge over its label sets (one engine may report several, e.g. per DP rank).

    Only the few lines whose metric name we need are parsed (an engine's exposition is tens of
    KB; a full parse would block the event loop for milliseconds on every scrape).
    """
    running_names, waiting_names, usage_names = METRIC_NAMES[flavour]
    queries_name, hits_name = PREFIX_COUNTERS[flavour]
    wanted = tuple(n for n in (*running_names, *waiting_names, *usage_names, queries_name, hits_name) if n)
    infos = INFO_SERIES[flavour]
    labels: dict[str, dict[str, str]] = {}
    values: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line.startswith(wanted):
            if infos and line.startswith(infos):
                name = line[: line.find("{")]
                if name in infos and name not in labels:
                    labels[name] = info_labels(line)
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
        hash_algo=labels.get(CACHE_CONFIG_INFO, {}).get("prefix_caching_hash_algo") or None,
        max_loras=_positive_int(labels.get(LORA_REQUESTS_INFO, {}).get("max_lora")),
    )


def info_labels(line: str) -> dict[str, str]:
    """The labels of one exposition sample line (``name{a="x",b="y"} 1``), with the text format's
    escapes (backslash, quote, newline) undone; ``{}`` for a line without labels."""
    start = line.find("{")
    out: dict[str, str] = {}
    if start < 0:
        return out
    i, n = start + 1, len(line)
    while i < n and line[i] != "}":
        eq = line.find("=", i)
        if eq < 0 or eq + 1 >= n or line[eq + 1] != '"':
            break
        key = line[i:eq].strip().lstrip(",").strip()
        i, chars = eq + 2, []
        while i < n and line[i] != '"':
            if line[i] == "\\" and i + 1 < n:
                i += 1
                chars.append("\n" if line[i] == "n" else line[i])
            else:
                chars.append(line[i])
            i += 1
        out[key] = "".join(chars)
        i += 1  # the closing quote
        while i < n and line[i] in ", ":
            i += 1
    return out


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number > 0 else None
