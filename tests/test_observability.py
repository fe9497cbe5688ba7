"""Tracing, metrics and logs as an operator sees them: real engine processes, the real openai client.

The span-tree tests run the gateway in the test's process (its spans go to an in-memory exporter);
the collector test runs it as its own process exporting OTLP/HTTP to a receiver in the test.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families
from support.fleet import (
    MODEL,
    engine_flags,
    get_json,
    instance_entry,
    pd_engine_pair,
    start_gateway,
    write_config,
)
from support.otlp import OtlpReceiver
from support.procs import PdgateProcess, start_pdgate, start_sim
from support.waiting import wait_until_async

from pdgate.gateway.app import build_gateway
from pdgate.gateway.config import GatewayConfig, TracingConfig
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.server import GatewayServer
from pdgate.gateway.tracing_setup import TracingSetupError, resolve_settings

PROMPT = "Observability of a disaggregated fleet starts with one trace per request. " * 4
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


@pytest.fixture(scope="module")
def pd_engines() -> Iterator[tuple[PdgateProcess, PdgateProcess]]:
    """One prefill and one decode sim engine (vLLM flavour: sequential KV hand-off)."""
    with pd_engine_pair() as engines:
        yield engines


def _config(tmp_path: Path, engines: tuple[PdgateProcess, PdgateProcess], **gateway: Any) -> Path:
    prefill, decode = engines
    entries = [instance_entry(prefill, "prefill", "sim"), instance_entry(decode, "decode", "sim")]
    return write_config(tmp_path / "gateway.yaml", entries, **gateway)


@pytest.fixture
async def traced(tmp_path: Path, pd_engines) -> AsyncIterator[tuple[GatewayServer, InMemorySpanExporter]]:
    """A gateway in this process whose spans land in an in-memory exporter."""
    exporter = InMemorySpanExporter()
    config = GatewayConfig.load(_config(tmp_path, pd_engines))
    server = GatewayServer(build_gateway(config), span_exporter=exporter)
    await server.start()
    try:
        yield server, exporter
    finally:
        await server.stop()


def _client(url: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, default_headers=headers or None)


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = _by_name(spans, name)
    assert len(found) == 1, f"expected one {name!r}, got {[s.name for s in spans]}"
    return found[0]


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_pd_request_is_one_trace_with_a_span_per_stage(traced, pd_engines) -> None:
    server, exporter = traced
    prefill_engine, decode_engine = pd_engines
    client = _client(server.url, traceparent=CLIENT_TRACEPARENT)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    await client.close()
    assert usage is not None and usage.completion_tokens == 12

    spans = exporter.get_finished_spans()
    root = _one(spans, "pdgate.request")
    # the client's trace goes on: same trace id, the client's span is the parent
    assert _hex(root.context.trace_id, 32) == CLIENT_TRACE
    assert _hex(root.parent.span_id, 16) == CLIENT_SPAN
    assert root.kind == SpanKind.SERVER
    assert {_hex(s.context.trace_id, 32) for s in spans} == {CLIENT_TRACE}

    stages = {
        name: _one(spans, name) for name in ("pdgate.admission", "pdgate.schedule", "pdgate.prefill", "pdgate.decode")
    }
    for span in stages.values():
        assert _parent(span) == root.context.span_id, span.name
    kv = _one(spans, "pdgate.kv_transfer")
    assert _parent(kv) == stages["pdgate.decode"].context.span_id
    assert stages["pdgate.prefill"].kind == stages["pdgate.decode"].kind == SpanKind.CLIENT

    # scheduling: one span per profile, one per plugin call of that profile, named by plugin
    profiles = server.gateway.profiles
    for profile in ("prefill", "decode"):
        run = _one(spans, f"pdgate.schedule.{profile}")
        assert _parent(run) == stages["pdgate.schedule"].context.span_id
        calls = [s for s in spans if _parent(s) == run.context.span_id]
        assert [s.name for s in sorted(calls, key=lambda s: s.start_time)] == [
            f"pdgate.plugin.{p.name}" for p in profiles[profile].plugins
        ]
        assert all(s.attributes["pdgate.plugin.kind"] in ("Filter", "Scorer", "Picker") for s in calls)
        assert all(run.start_time <= s.start_time <= s.end_time <= run.end_time for s in calls)
    prefill_id = f"prefill-{prefill_engine.url.rsplit(':', 1)[1]}"
    decode_id = f"decode-{decode_engine.url.rsplit(':', 1)[1]}"
    assert _one(spans, "pdgate.schedule.prefill").attributes["pdgate.instance"] == prefill_id
    assert _one(spans, "pdgate.schedule.decode").attributes["pdgate.instance"] == decode_id

    # the stages follow each other in time
    assert (
        stages["pdgate.admission"].end_time <= stages["pdgate.schedule"].end_time <= stages["pdgate.prefill"].start_time
    )
    assert (
        stages["pdgate.prefill"].end_time
        <= stages["pdgate.decode"].start_time
        <= kv.end_time
        <= stages["pdgate.decode"].end_time
    )

    # attributes that answer an operator's questions
    attrs = root.attributes
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == 12
    assert attrs["pdgate.prefill.instance"] == prefill_id and attrs["pdgate.decode.instance"] == decode_id
    assert attrs["pdgate.ttft_s"] > 0 and attrs["pdgate.tpot_s"] > 0 and attrs["pdgate.e2e_s"] >= attrs["pdgate.ttft_s"]
    assert attrs["pdgate.ttft_predicted_s"] > 0 and attrs["pdgate.tpot_predicted_s"] > 0
    assert attrs["pdgate.output_tokens_predicted"] >= 1
    assert attrs["pdgate.slo.met"] is True  # the default SLOs (2 s / 100 ms) on an idle fast sim
    assert attrs["http.response.status_code"] == 200
    assert stages["pdgate.admission"].attributes["pdgate.admission.outcome"] == "dispatch"
    assert stages["pdgate.prefill"].attributes["pdgate.instance"] == prefill_id
    assert stages["pdgate.prefill"].attributes["pdgate.prefill_s"] > 0
    assert kv.attributes["pdgate.kv.protocol"] == "sequential" and kv.attributes["pdgate.kv.to"] == decode_id
    assert all(s.status.status_code != StatusCode.ERROR for s in spans)
    # no text unless asked for
    texts = [v for s in spans for v in s.attributes.values() if isinstance(v, str)]
    assert not any("Observability" in v for v in texts)

    # each engine got the traceparent of its own leg
    for engine, leg in ((prefill_engine, stages["pdgate.prefill"]), (decode_engine, stages["pdgate.decode"])):
        seen = get_json(f"{engine.url}/sim/traces")["requests"]
        mine = [r for r in seen if r["request_id"] == attrs["pdgate.request_id"]]
        assert [r["traceparent"] for r in mine] == [f"00-{CLIENT_TRACE}-{_hex(leg.context.span_id, 16)}-01"]


async def test_a_rejected_request_carries_its_reason(traced) -> None:
    server, exporter = traced
    client = _client(server.url)
    with pytest.raises(openai.RateLimitError):
        await client.completions.create(
            model=MODEL, prompt=PROMPT * 8, max_tokens=4, extra_headers={"x-slo-ttft-ms": "0.01"}
        )
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=MODEL, prompt="", max_tokens=4)
    await client.close()
    spans = exporter.get_finished_spans()
    roots = _by_name(spans, "pdgate.request")
    assert len(roots) == 2
    rejected = next(r for r in roots if r.attributes["http.response.status_code"] == 429)
    assert rejected.attributes["pdgate.reject_reason"] == rejected.attributes["error.type"]
    admission = next(s for s in _by_name(spans, "pdgate.admission") if _parent(s) == rejected.context.span_id)
    assert admission.attributes["pdgate.admission.outcome"] == "reject"
    assert admission.status.status_code == StatusCode.ERROR
    assert {s.name for s in spans if s.context.trace_id == rejected.context.trace_id} == {
        "pdgate.request",
        "pdgate.admission",
    }
    invalid = next(r for r in roots if r.attributes["http.response.status_code"] == 400)
    assert invalid.status.status_code != StatusCode.ERROR  # the client's fault is not the server's error
    assert "error.type" in invalid.attributes


async def test_sampling_ratio_zero_records_nothing_but_still_propagates(tmp_path, pd_engines) -> None:
    exporter = InMemorySpanExporter()
    config = GatewayConfig.load(_config(tmp_path, pd_engines, tracing={"sample_ratio": 0.0}))
    server = GatewayServer(build_gateway(config), span_exporter=exporter)
    await server.start()
    try:
        client = _client(server.url)
        reply = await client.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        await client.close()
    finally:
        await server.stop()
    assert exporter.get_finished_spans() == ()
    request_id = reply.headers["x-request-id"]
    seen = [r for r in get_json(f"{pd_engines[1].url}/sim/traces")["requests"] if r["request_id"] == request_id]
    assert len(seen) == 1
    assert int(seen[0]["traceparent"].rsplit("-", 1)[1], 16) & 1 == 0  # not sampled, and says so downstream


async def test_plugin_calls_as_events_when_plugin_spans_are_off(tmp_path, pd_engines) -> None:
    exporter = InMemorySpanExporter()
    config = GatewayConfig.load(_config(tmp_path, pd_engines, tracing={"plugin_spans": False}))
    server = GatewayServer(build_gateway(config), span_exporter=exporter)
    await server.start()
    try:
        client = _client(server.url)
        await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        await client.close()
    finally:
        await server.stop()
    spans = exporter.get_finished_spans()
    assert not [s for s in spans if s.name.startswith("pdgate.plugin.")]
    run = _one(spans, "pdgate.schedule.decode")
    plugins = server.gateway.profiles["decode"].plugins
    assert [e.name for e in run.events] == [f"pdgate.plugin.{p.name}" for p in plugins]
    assert all(e.attributes["pdgate.duration_s"] >= 0 for e in run.events)


async def test_a_retry_shows_the_failed_leg_and_counts(tmp_path, sim_factory) -> None:
    """An engine dies: the leg that hit it ends in ERROR, the request retries elsewhere and says so."""
    engines = [sim_factory(*engine_flags("both")) for _ in range(2)]
    entries = [instance_entry(e, "both", "sim") for e in engines]
    # no active health checks: the failure is found on the request path
    config = GatewayConfig.load(
        write_config(tmp_path / "two.yaml", entries, health={"interval_s": 60, "failure_threshold": 1})
    )
    exporter = InMemorySpanExporter()
    server = GatewayServer(build_gateway(config), span_exporter=exporter)
    await server.start()
    try:
        engines[0].kill()
        dead = entries[0]["id"]
        client = _client(server.url)
        for n in range(8):
            reply = await client.completions.create(
                model=MODEL, prompt=f"{n} {PROMPT}", max_tokens=2, extra_body={"ignore_eos": True}
            )
            assert reply.usage.completion_tokens == 2  # the retry lost no token
            if any(e.name == "pdgate.retry" for s in exporter.get_finished_spans() for e in s.events):
                break
        await client.close()
        metrics = await _samples(server.url)
    finally:
        await server.stop()
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "pdgate.request" and any(e.name == "pdgate.retry" for e in s.events))
    event = next(e for e in root.events if e.name == "pdgate.retry")
    assert event.attributes["pdgate.instance"] == dead and event.attributes["pdgate.attempt"] == 2
    mine = [s for s in spans if s.context.trace_id == root.context.trace_id]
    legs = sorted((s for s in mine if s.name == "pdgate.generate"), key=lambda s: s.start_time)
    assert [leg.attributes["pdgate.instance"] for leg in legs] == [dead, entries[1]["id"]]
    assert legs[0].status.status_code == StatusCode.ERROR and "connection" in legs[0].status.description
    assert legs[1].status.status_code != StatusCode.ERROR
    schedules = sorted((s for s in mine if s.name == "pdgate.schedule"), key=lambda s: s.start_time)
    assert [s.attributes["pdgate.attempt"] for s in schedules] == [1, 2]
    assert list(schedules[1].attributes["pdgate.excluded"]) == [dead]
    assert root.attributes["pdgate.attempts"] == 2 and root.attributes["http.response.status_code"] == 200
    assert _total(metrics, "pdgate_retries_total", model=MODEL) == 1
    assert _total(metrics, "pdgate_upstream_failures_total", instance=dead) == 1
    assert _total(metrics, "pdgate_instance_circuit_state", instance=dead, state="open") == 1


async def test_a_failover_is_a_migration_span_between_two_legs(tmp_path, sim_factory) -> None:
    """The engine of a stream dies mid-answer: its leg ends in ERROR, a pdgate.migration span
    says where the stream went, and the continuation's leg follows."""
    engines = [sim_factory(*engine_flags("both"), time_scale=1.0) for _ in range(2)]
    entries = [instance_entry(e, "both", "sim") for e in engines]
    config = GatewayConfig.load(write_config(tmp_path / "two.yaml", entries, migration={"policy": "no-migration"}))
    exporter = InMemorySpanExporter()
    server = GatewayServer(build_gateway(config), span_exporter=exporter)
    await server.start()
    try:
        client = _client(server.url)
        stream = await client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=80, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        pieces = 0
        async for chunk in stream:
            pieces += sum(1 for c in chunk.choices if c.text)
            if pieces == 10:
                live = next(iter(server.gateway.migrations.streams.values()))
                victim = next(e for e, entry in zip(engines, entries) if entry["id"] == live.instance_id)
                victim.kill()
        await client.close()
    finally:
        await server.stop()
    assert pieces == 80
    spans = exporter.get_finished_spans()
    migration = next(s for s in spans if s.name == "pdgate.migration")
    dead = migration.attributes["pdgate.migration.from"]
    assert migration.attributes["pdgate.migration.reason"] == "failover"
    assert migration.attributes["pdgate.migration.to"] != dead
    assert migration.attributes["pdgate.migration.mechanism"] == "recompute"
    assert migration.attributes["pdgate.migration.tokens"] >= 10 and migration.attributes["pdgate.migration.gap_s"] > 0
    mine = [s for s in spans if s.context.trace_id == migration.context.trace_id]
    legs = sorted((s for s in mine if s.name == "pdgate.generate"), key=lambda s: s.start_time)
    assert [leg.attributes["pdgate.instance"] for leg in legs] == [dead, migration.attributes["pdgate.migration.to"]]
    assert legs[0].status.status_code == StatusCode.ERROR
    assert legs[1].status.status_code != StatusCode.ERROR
    root = next(s for s in mine if s.name == "pdgate.request")
    assert root.attributes["http.response.status_code"] == 200 and root.attributes["gen_ai.usage.output_tokens"] == 80


async def test_a_role_change_is_a_span_of_its_own(tmp_path, sim_factory) -> None:
    """A flex instance moved by the admin API: one ``pdgate.role_change`` span says which, how and why."""
    engines = [sim_factory(*engine_flags("both")) for _ in range(2)]
    entries = [
        {**instance_entry(e, "flex", "sim"), "serving": serving}
        for e, serving in zip(engines, ("prefill", "decode"), strict=True)
    ]
    exporter = InMemorySpanExporter()
    server = GatewayServer(
        build_gateway(GatewayConfig.load(write_config(tmp_path / "flex.yaml", entries))), span_exporter=exporter
    )
    await server.start()
    try:
        moved = entries[0]["id"]
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.url}/admin/instances/{moved}/role", json={"role": "both"}) as resp:
                assert resp.status == 200, await resp.text()
    finally:
        await server.stop()
    span = _one(list(exporter.get_finished_spans()), "pdgate.role_change")
    assert dict(span.attributes) == {
        "pdgate.instance": moved,
        "pdgate.role.from": "prefill",
        "pdgate.role.to": "both",
        "pdgate.reason": "admin",
    }


def test_tracing_settings_follow_the_otel_environment() -> None:
    off = TracingConfig()
    assert resolve_settings(off, {}) is None  # nothing asked for: off, and no SDK work at all
    on = resolve_settings(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "edge"})
    assert on is not None and on.exporter == "otlp" and on.service_name == "edge"
    assert on.endpoint is None  # the exporter reads OTEL_EXPORTER_OTLP_* itself (headers, TLS, timeout too)
    assert resolve_settings(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}) is None
    assert (
        resolve_settings(off, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) is None
    )
    console = resolve_settings(off, {"OTEL_TRACES_EXPORTER": "console"})
    assert console is not None and console.exporter == "console"
    file_wins = resolve_settings(
        TracingConfig(endpoint="http://10.0.0.1:4318", service_name="gw", sample_ratio=0.25),
        {"OTEL_SERVICE_NAME": "edge", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
    )
    assert file_wins is not None
    assert (file_wins.endpoint, file_wins.service_name, file_wins.sample_ratio) == (
        "http://10.0.0.1:4318/v1/traces",
        "gw",
        0.25,
    )
    assert resolve_settings(TracingConfig(enabled=False), {"OTEL_TRACES_EXPORTER": "otlp"}) is None
    with pytest.raises(TracingSetupError, match="zipkin"):
        resolve_settings(off, {"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TracingSetupError, match="grpc"):
        resolve_settings(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})


async def test_gateway_and_engine_spans_reach_an_otlp_collector_as_one_trace(tmp_path) -> None:
    """What an operator does: point the gateway (and the engines) at a collector with OTEL_* variables."""
    async with OtlpReceiver() as rx:
        env = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
        engines = []
        try:
            for role in ("prefill", "decode"):
                engines.append(start_sim(*engine_flags(role, extra=("--otlp-traces-endpoint", rx.endpoint)), env=env))
            entries = [instance_entry(engines[0], "prefill", "sim"), instance_entry(engines[1], "decode", "sim")]
            gateway = start_gateway(
                write_config(tmp_path / "gw.yaml", entries),
                env={**env, "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_SERVICE_NAME": "pdgate-edge"},
            )
            engines.append(gateway)
            client = _client(gateway.url)
            reply = await client.completions.with_raw_response.create(  # ignore_eos: exactly 5 tokens
                model=MODEL, prompt=PROMPT, max_tokens=5, stream=False, extra_body={"ignore_eos": True}
            )
            await client.close()
            request_id = reply.headers["x-request-id"]

            def complete(spans) -> bool:
                names = {s.name for s in spans}
                return {"pdgate.request", "pdgate.prefill", "pdgate.decode"} <= names and sum(
                    s.name == "llm_request" for s in spans
                ) >= 2

            spans = await rx.wait_for(complete, timeout=15)
        finally:
            for proc in engines:
                proc.stop()
    root = next(s for s in spans if s.name == "pdgate.request" and s.attributes.get("pdgate.request_id") == request_id)
    assert root.service_name == "pdgate-edge" and root.parent_span_id is None
    trace = [s for s in spans if s.trace_id == root.trace_id]
    legs = {s.name: s for s in trace if s.name in ("pdgate.prefill", "pdgate.decode")}
    engine_spans = [s for s in trace if s.name == "llm_request"]
    assert {s.service_name for s in engine_spans} == {"pdgate-sim"}
    # each engine's span hangs under the gateway's leg that called it
    assert sorted(s.parent_span_id for s in engine_spans) == sorted(leg.span_id for leg in legs.values())
    decode_span = next(s for s in engine_spans if s.parent_span_id == legs["pdgate.decode"].span_id)
    assert decode_span.attributes["gen_ai.usage.completion_tokens"] == 5
    assert {"pdgate.admission", "pdgate.schedule", "pdgate.schedule.prefill", "pdgate.schedule.decode"} <= {
        s.name for s in trace
    }


async def _samples(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The gateway's /metrics, parsed (fetched without blocking: the gateway runs on this loop)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _total(samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


async def test_metrics_move_as_requests_are_served(traced, pd_engines) -> None:
    server, _ = traced
    before = await _samples(server.url)
    client = _client(server.url)
    prompt_tokens = output_tokens = 0
    for n in range(3):
        reply = await client.completions.create(model=MODEL, prompt=f"{n} {PROMPT}", max_tokens=6)
        prompt_tokens += reply.usage.prompt_tokens
        output_tokens += reply.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    await client.close()
    ids = [f"{role}-{engine.port}" for role, engine in zip(("prefill", "decode"), pd_engines)]

    async def settled() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        """The metrics once every request is counted and both engines' load was scraped."""
        samples = await _samples(server.url)
        done = _total(samples, "pdgate_e2e_request_latency_seconds_count", model=MODEL) - _total(
            before, "pdgate_e2e_request_latency_seconds_count", model=MODEL
        )
        scraped = {lab["instance"] for lab, _ in samples.get("pdgate_instance_running_requests", [])}
        return samples if done >= 3 and scraped >= set(ids) else None

    after = await wait_until_async(settled, timeout=10, message="3 requests counted and the engines' load scraped")

    def delta(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    route = "/v1/completions"
    assert delta("pdgate_requests_total", route=route, model=MODEL, status="200") == 3
    assert delta("pdgate_requests_total", route=route, model="", status="404") == 1
    assert delta("pdgate_e2e_request_latency_seconds_count", model=MODEL) == 3
    assert delta("pdgate_prompt_tokens_total", model=MODEL) == prompt_tokens
    assert delta("pdgate_generation_tokens_total", model=MODEL) == output_tokens
    prefill_id = ids[0]
    assert delta("pdgate_prefix_cache_queried_tokens_total", instance=prefill_id) == prompt_tokens
    assert delta("pdgate_plugin_duration_seconds_count", profile="prefill") >= 3 * 5
    assert delta("pdgate_admission_decisions_total", model=MODEL, outcome="dispatch") == 3
    for instance in ids:
        assert _total(after, "pdgate_instance_circuit_state", instance=instance, state="closed") == 1
        assert _total(after, "pdgate_instance_healthy", instance=instance) == 1
        assert _total(after, "pdgate_instance_info", instance=instance) == 1
        assert any(lab["instance"] == instance for lab, _ in after["pdgate_instance_running_requests"])
        assert _total(after, "pdgate_instance_inflight_requests", instance=instance) == 0
    assert _total(after, "pdgate_build_info") == 1


def test_every_metric_is_documented() -> None:
    """docs/observability.md has a row per metric family the gateway exports."""
    families = {m.name for m in GatewayMetrics().registry.collect()}
    doc = (Path(__file__).parents[1] / "docs" / "observability.md").read_text()
    missing = sorted(f for f in families if f"`{f}" not in doc)
    assert not missing, f"undocumented metrics: {missing}"


def test_json_logs_carry_request_and_trace_ids_and_no_text(tmp_path, pd_engines) -> None:
    config = _config(tmp_path, pd_engines, tracing={"exporter": "console"})  # spans printed too: they must hold no text
    proc = start_pdgate("serve", "--config", str(config), "--log-format", "json", "--access-log")
    try:
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
        # exactly 4 tokens: without ignore_eos the engine's EOS draw (seeded by the random request
        # id) may end the answer sooner
        reply = client.completions.with_raw_response.create(
            model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True}
        )
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
        client.close()
    finally:
        proc.stop()
    request_id = reply.headers["x-request-id"]
    records = [json.loads(line) for line in proc.output if line.startswith('{"ts"')]
    access = [r for r in records if r["logger"] == "pdgate.access"]
    assert len(access) == 2, proc.log
    served = next(r for r in access if r.get("request_id") == request_id)
    assert served["status"] == 200 and served["model"] == MODEL and served["output_tokens"] == 4
    assert served["route"] == "/v1/completions" and served["e2e_s"] > 0
    assert len(served["trace_id"]) == 32 and served["trace_id"] in proc.log.replace(
        served["trace_id"], "", 1
    )  # its spans
    refused = next(r for r in access if r is not served)
    assert refused["status"] == 400 and refused["level"] == "info"
    assert "Observability" not in proc.log  # neither logs nor spans carry the prompt
