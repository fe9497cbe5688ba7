"""Prometheus metrics of the simulated engine, under the real engines' own names.

``vllm`` flavour: the v1 engine's names, labels (``model_name``, ``engine``) and buckets;
``sglang`` flavour: SGLang's ``sglang:*`` names with ``model_name`` and ``engine_type`` labels.
Times are simulated seconds (equal to wall seconds at ``time_scale`` 1). Each engine owns its
own :class:`~prometheus_client.CollectorRegistry`; nothing is process-global.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pdgate.engines.sim.core import EngineCore, RequestOutput, ScheduledStep
from pdgate.engines.sim.request import RequestStatus, SimRequest

VLLM_TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
]
VLLM_ITL_BUCKETS = [
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
VLLM_LATENCY_BUCKETS = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
]
VLLM_ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
SGLANG_TTFT_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400]
SGLANG_ITL_BUCKETS = [
    0.002,
    0.004,
    0.006,
    0.008,
    0.010,
    0.015,
    0.020,
    0.025,
    0.030,
    0.035,
    0.040,
    0.060,
    0.080,
    0.100,
    0.200,
    0.400,
    0.600,
    0.800,
    1.000,
    2.000,
    4.000,
    6.000,
    8.000,
]
SGLANG_E2E_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400]
FINISH_REASONS = ("stop", "length", "abort", "error")


def _one_two_five(limit: int) -> list[float]:
    buckets: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > limit:
                return buckets
            buckets.append(float(value))
        exponent += 1


class SimMetrics:
    """Common bookkeeping; subclasses map it onto one engine's metric names."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.registry = CollectorRegistry(auto_describe=True)
        self._last_token_time: dict[str, float] = {}

    def render(self, names: Collection[str] | None = None) -> bytes:
        """The exposition text; with ``names``, only those series (prometheus_client's ``name[]``)."""
        self.refresh()
        return generate_latest(self.registry.restricted_registry(names) if names else self.registry)

    def refresh(self) -> None:
        """Update gauges from the engine's live state (called at scrape time)."""

    # -- observer protocol --------------------------------------------------
    def on_step(self, step: ScheduledStep, outputs: list[RequestOutput], now: float) -> None:
        self.on_iteration(step)
        for output in outputs:
            req = output.request
            if not output.new_token_ids:
                continue
            last = self._last_token_time.get(req.request_id)
            if last is None:
                self.on_first_token(req, now)
            else:
                self.on_inter_token(now - last)
            self._last_token_time[req.request_id] = now

    def on_finished(self, request: SimRequest, now: float) -> None:
        self._last_token_time.pop(request.request_id, None)
        self.on_request_done(request, now)

    # -- hooks --------------------------------------------------------------
    def on_iteration(self, step: ScheduledStep) -> None: ...

    def on_first_token(self, request: SimRequest, now: float) -> None: ...

    def on_inter_token(self, seconds: float) -> None: ...

    def on_request_done(self, request: SimRequest, now: float) -> None: ...


class VllmMetrics(SimMetrics):
    """vLLM v1 ``PrometheusStatLogger`` names."""

    def __init__(
        self, core: EngineCore, model_name: str, cache_info: dict[str, str], *, max_loras: int | None = None
    ) -> None:
        super().__init__(core)
        self._max_loras = max_loras
        self._seen_queries = self._seen_hits = self._seen_preemptions = 0
        r, labels = self.registry, ["model_name", "engine"]
        values = (model_name, "0")
        self._running = Gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", labels, registry=r
        ).labels(*values)
        self._waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, registry=r
        ).labels(*values)
        self._usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, registry=r
        ).labels(*values)
        info = Gauge(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", [*cache_info, "engine"], registry=r
        )
        info.labels(*cache_info.values(), "0").set(1)
        self._queries = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            labels,
            registry=r,
        ).labels(*values)
        self._hits = Counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels, registry=r
        ).labels(*values)
        self._preemptions = Counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels, registry=r
        ).labels(*values)
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r
        ).labels(*values)
        self._generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r
        ).labels(*values)
        by_source = Counter(
            "vllm:prompt_tokens_by_source", "Number of prompt tokens by source.", [*labels, "source"], registry=r
        )
        self._by_source = {
            s: by_source.labels(*values, s) for s in ("local_compute", "local_cache_hit", "external_kv_transfer")
        }
        self._cached = Counter(
            "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).", labels, registry=r
        ).labels(*values)
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self._success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}
        hist = lambda name, doc, buckets: Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*values)
        self._ttft = hist(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", VLLM_TTFT_BUCKETS
        )
        self._itl = hist(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", VLLM_ITL_BUCKETS
        )
        self._e2e = hist(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", VLLM_LATENCY_BUCKETS
        )
        self._queue = hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            VLLM_LATENCY_BUCKETS,
        )
        self._inference = hist(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            VLLM_LATENCY_BUCKETS,
        )
        self._prefill = hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            VLLM_LATENCY_BUCKETS,
        )
        self._decode = hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            VLLM_LATENCY_BUCKETS,
        )
        token_buckets = _one_two_five(core.config.max_model_len)
        self._req_prompt = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets)
        self._req_generation = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self._iteration = hist(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            VLLM_ITERATION_TOKEN_BUCKETS,
        )
        # vLLM with --enable-lora: a series per (max, waiting, running) adapter set, set to the time it
        # was last seen; routers read the newest
        self._lora_info = (
            None
            if max_loras is None
            else Gauge(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                registry=r,
            )
        )

    def refresh(self) -> None:
        core = self.core
        self._running.set(core.num_running)
        self._waiting.set(core.num_waiting)
        self._usage.set(core.kv.usage)
        # the engine keeps cumulative totals; the counters take what was added since the last scrape
        stats = core.kv.stats
        self._queries.inc(stats.queries - self._seen_queries)
        self._hits.inc(stats.hits - self._seen_hits)
        self._preemptions.inc(core.num_preemptions - self._seen_preemptions)
        self._seen_queries, self._seen_hits, self._seen_preemptions = stats.queries, stats.hits, core.num_preemptions
        if self._lora_info is not None:
            running = ",".join(dict.fromkeys(n for r in core.running if (n := r.lora_name) is not None))
            waiting = ",".join(dict.fromkeys(n for r in core.waiting if (n := r.lora_name) is not None))
            self._lora_info.labels(str(self._max_loras), waiting, running).set_to_current_time()

    def on_iteration(self, step: ScheduledStep) -> None:
        self._iteration.observe(sum(n for _, n in step.entries))

    def on_first_token(self, request: SimRequest, now: float) -> None:
        self._ttft.observe(now - request.arrival_time)
        self._prompt_tokens.inc(request.num_prompt_tokens)
        cached = max(0, request.num_cached_tokens)
        external = request.num_external_tokens
        self._by_source["external_kv_transfer"].inc(external)
        self._by_source["local_cache_hit"].inc(max(0, cached - external))
        self._by_source["local_compute"].inc(request.num_prompt_tokens - cached)
        self._cached.inc(cached)

    def on_inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def on_request_done(self, request: SimRequest, now: float) -> None:
        self._generation_tokens.inc(request.num_output_tokens)
        if request.status is RequestStatus.FINISHED_MIGRATED:
            return  # it goes on elsewhere: neither a finished request nor its latency
        reason = request.status.value if request.status.finished else RequestStatus.FINISHED_ABORTED.value
        self._success[reason].inc()
        self._e2e.observe(now - request.arrival_time)
        if request.first_scheduled_time is not None:
            self._queue.observe(request.first_scheduled_time - request.arrival_time)
            self._inference.observe(now - request.first_scheduled_time)
            if request.first_token_time is not None:
                self._prefill.observe(request.first_token_time - request.first_scheduled_time)
                self._decode.observe(now - request.first_token_time)
        self._req_prompt.observe(request.num_prompt_tokens)
        self._req_generation.observe(request.num_output_tokens)


class SglangMetrics(SimMetrics):
    """SGLang's scheduler and tokenizer-manager collector names."""

    def __init__(self, core: EngineCore, model_name: str, engine_type: str) -> None:
        super().__init__(core)
        r, labels = self.registry, ["model_name", "engine_type"]
        values = (model_name, engine_type)
        gauge = lambda name, doc: Gauge(name, doc, labels, registry=r).labels(*values)
        counter = lambda name, doc: Counter(name, doc, labels, registry=r).labels(*values)
        hist = lambda name, doc, buckets: Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*values)
        self._running = gauge("sglang:num_running_reqs", "The number of running requests.")
        self._queue = gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.")
        self._used_tokens = gauge("sglang:num_used_tokens", "The number of used tokens.")
        self._token_usage = gauge("sglang:token_usage", "The token usage.")
        self._hit_rate = gauge("sglang:cache_hit_rate", "The prefix cache hit rate.")
        self._throughput = gauge("sglang:gen_throughput", "The generation throughput (token/s).")
        self._max_tokens = gauge("sglang:max_total_num_tokens", "Maximum total number of tokens in the KV cache.")
        self._max_tokens.set(core.kv.num_blocks * core.kv.block_size)
        self._prompt_tokens = counter("sglang:prompt_tokens", "Number of prefill tokens processed.")
        self._generation_tokens = counter("sglang:generation_tokens", "Number of generation tokens processed.")
        self._cached_tokens = counter("sglang:cached_tokens", "Number of cached prompt tokens.")
        self._requests = counter("sglang:num_requests", "Number of requests processed.")
        self._aborted = counter("sglang:num_aborted_requests", "Number of requests aborted.")
        self._ttft = hist(
            "sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", SGLANG_TTFT_BUCKETS
        )
        self._itl = hist(
            "sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", SGLANG_ITL_BUCKETS
        )
        self._e2e = hist(
            "sglang:e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
            SGLANG_E2E_BUCKETS,
        )
        self._window: deque[tuple[float, int]] = deque()

    def refresh(self) -> None:
        core = self.core
        self._running.set(core.num_running)
        self._queue.set(core.num_waiting)
        used = (core.kv.num_blocks - core.kv.num_free_blocks) * core.kv.block_size
        self._used_tokens.set(used)
        self._token_usage.set(core.kv.usage)
        stats = core.kv.stats
        self._hit_rate.set(stats.hits / stats.queries if stats.queries else 0.0)

    def on_step(self, step: ScheduledStep, outputs: list[RequestOutput], now: float) -> None:
        generated = sum(len(o.new_token_ids) for o in outputs)
        self._window.append((now, generated))
        while self._window and self._window[0][0] < now - 5.0:
            self._window.popleft()
        span = now - self._window[0][0] if len(self._window) > 1 else 0.0
        self._throughput.set(sum(n for _, n in self._window) / span if span > 0 else 0.0)
        super().on_step(step, outputs, now)

    def on_first_token(self, request: SimRequest, now: float) -> None:
        self._ttft.observe(now - request.arrival_time)
        self._prompt_tokens.inc(request.num_prompt_tokens)
        self._cached_tokens.inc(max(0, request.num_cached_tokens))

    def on_inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def on_request_done(self, request: SimRequest, now: float) -> None:
        self._generation_tokens.inc(request.num_output_tokens)
        if request.status is RequestStatus.FINISHED_MIGRATED:
            return  # it goes on elsewhere: neither a finished request nor its latency
        self._requests.inc()
        if request.status is RequestStatus.FINISHED_ABORTED:
            self._aborted.inc()
        self._e2e.observe(now - request.arrival_time)
