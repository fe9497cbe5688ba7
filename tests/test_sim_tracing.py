"""W3C trace context in the simulated engine: ``/sim/traces`` and vLLM-style ``llm_request`` spans."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import aiohttp
from support.otlp import OtlpReceiver, ReceivedSpan

from pdgate.common.runtime import otlp_traces_url as traces_url

MODEL = "sim-model"
SPAN_KIND_SERVER = 2
STATUS_CODE_UNSET, STATUS_CODE_ERROR = 0, 2
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # ms between batch exports (default 5000)


def traceparent() -> tuple[str, str, str]:
    """A sampled W3C traceparent and its trace id and parent span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def sim_flags(*extra: str) -> list[str]:
    return ["--served-model-name", MODEL, "--max-model-len", "2048", *extra]


async def complete(url: str, headers: dict[str, str], *, stream: bool, max_tokens: int = 8) -> dict[str, Any]:
    """One completion; returns its usage (streamed: from the include_usage chunk)."""
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": "Tell me about tracing.",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status == 200, await resp.text()
        if not stream:
            return (await resp.json())["usage"]
        usage = None
        async for line in resp.content:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
        assert usage is not None
        return usage


def llm_spans(spans: list[ReceivedSpan]) -> dict[Any, ReceivedSpan]:
    return {s.attributes.get("gen_ai.request.id"): s for s in spans if s.name == "llm_request"}


def test_traces_url_appends_the_otlp_path_only_to_a_bare_endpoint():
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/custom/traces") == "http://collector:4318/custom/traces"


async def test_sim_traces_records_trace_headers_and_request_ids(sim_factory):
    sim = sim_factory(*sim_flags())
    parent, _, _ = traceparent()
    await complete(sim.url, {"traceparent": parent, "tracestate": "vendor=1", "X-Request-Id": "traced-1"}, stream=False)
    await complete(sim.url, {}, stream=True)
    async with aiohttp.ClientSession() as session, session.get(f"{sim.url}/sim/traces") as resp:
        records = (await resp.json())["requests"]
    assert [r["path"] for r in records] == ["/v1/completions", "/v1/completions"]
    traced, plain = records
    assert traced["request_id"] == "traced-1"
    assert traced["traceparent"] == parent and traced["tracestate"] == "vendor=1"
    assert plain["traceparent"] is None and plain["tracestate"] is None
    assert plain["request_id"].startswith("cmpl-")  # the engine's own id when no X-Request-Id is given
    assert 0 < traced["received_at"] <= plain["received_at"]


async def test_llm_request_spans_continue_the_callers_trace(sim_factory):
    async with OtlpReceiver() as rx:
        sim = sim_factory(*sim_flags("--otlp-traces-endpoint", rx.endpoint), env=FAST_EXPORT)
        try:
            full_parent, full_trace, full_span = traceparent()
            sse_parent, sse_trace, sse_span = traceparent()
            usage_full = await complete(
                sim.url, {"traceparent": full_parent, "X-Request-Id": "full"}, stream=False, max_tokens=7
            )
            usage_sse = await complete(
                sim.url, {"traceparent": sse_parent, "X-Request-Id": "sse"}, stream=True, max_tokens=9
            )
            await complete(sim.url, {"X-Request-Id": "root"}, stream=False)
            spans = llm_spans(await rx.wait_for(lambda s: len(llm_spans(s)) >= 3))
        finally:
            await asyncio.to_thread(sim.stop)
    for rid, trace_id, parent_id, usage in (
        ("full", full_trace, full_span, usage_full),
        ("sse", sse_trace, sse_span, usage_sse),
    ):
        span = spans[rid]
        assert (span.trace_id, span.parent_span_id) == (trace_id, parent_id)
        assert span.kind == SPAN_KIND_SERVER and span.status_code == STATUS_CODE_UNSET
        assert span.service_name == "pdgate-sim"
        attrs = span.attributes
        assert attrs["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
        assert attrs["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]
        assert attrs["gen_ai.request.max_tokens"] == usage["completion_tokens"]
        assert attrs["gen_ai.request.n"] == 1 and attrs["gen_ai.request.top_p"] == 1.0
        assert "gen_ai.request.temperature" not in attrs  # vLLM leaves a zero temperature out
        e2e, ttft = attrs["gen_ai.latency.e2e"], attrs["gen_ai.latency.time_to_first_token"]
        assert 0 <= attrs["gen_ai.latency.time_in_queue"] <= ttft <= e2e
        assert attrs["gen_ai.latency.time_in_model_prefill"] > 0 and attrs["gen_ai.latency.time_in_model_decode"] > 0
        assert span.start_ns < span.end_ns
    assert spans["root"].parent_span_id is None
    assert spans["root"].trace_id not in (full_trace, sse_trace)


async def test_engine_shutdown_flushes_queued_spans(sim_factory):
    async with OtlpReceiver() as rx:
        # the default 5 s batch delay: only the flush at shutdown can deliver the span in time
        sim = sim_factory(
            *sim_flags("--otlp-traces-endpoint", rx.traces_url), env={"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip"}
        )
        await complete(sim.url, {"X-Request-Id": "flushed"}, stream=False)
        assert await asyncio.to_thread(sim.stop) == 0
        assert "flushed" in llm_spans(rx.spans), rx.summary()


async def test_aborted_request_ends_its_span_with_error_status(sim_factory):
    async with OtlpReceiver() as rx:
        sim = sim_factory(*sim_flags("--otlp-traces-endpoint", rx.endpoint), time_scale=1.0, env=FAST_EXPORT)
        try:
            parent, trace_id, parent_id = traceparent()
            body = {"model": MODEL, "prompt": "Go on forever.", "max_tokens": 1500, "ignore_eos": True, "stream": True}
            headers = {"traceparent": parent, "X-Request-Id": "gone"}
            async with aiohttp.ClientSession() as session:
                resp = await session.post(f"{sim.url}/v1/completions", json=body, headers=headers)
                chunks = 0
                async for line in resp.content:
                    chunks += line.startswith(b"data: {")
                    if chunks == 3:
                        break
                resp.close()  # the client goes away mid-stream
            spans = llm_spans(await rx.wait_for(lambda s: "gone" in llm_spans(s)))
        finally:
            await asyncio.to_thread(sim.stop)
    span = spans["gone"]
    assert span.status_code == STATUS_CODE_ERROR
    assert (span.trace_id, span.parent_span_id) == (trace_id, parent_id)
    assert 2 <= span.attributes["gen_ai.usage.completion_tokens"] < 1500
