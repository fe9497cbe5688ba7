"""The gateway against real vLLM (the PyPI CPU build): one prefill + one decode engine with
NixlConnector, and one colocated engine as the single-engine reference.

Needs ``pdgate engine vllm-setup`` (``.vllm/`` or ``$PDGATE_VLLM_HOME``). Without it these tests
skip with the reason; with ``CI=true`` a missing environment fails them instead. The engines are
real processes started with ``pdgate engine vllm``; the gateway runs in this process so that its
prefix index and load view can be inspected.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from support.otlp import OtlpReceiver
from support.ports import reserve_port, retry_on_port_clash
from support.vllm import require_vllm
from support.waiting import wait_until, wait_until_async

from pdgate.engines.launch.vllm_cpu.install import is_installed, tiny_model_dir, vllm_home
from pdgate.gateway.app import GatewayServer, build_gateway
from pdgate.gateway.config import GatewayConfig

MODEL = "tiny"
BLOCK = 128  # vLLM's CPU block size
START_TIMEOUT_S = 300.0
HOME = vllm_home()

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

WORDS = [
    "the",
    "cache",
    "block",
    "token",
    "prefill",
    "decode",
    "request",
    "router",
    "server",
    "engine",
    "model",
    "prompt",
    "stream",
    "latency",
    "memory",
    "queue",
    "worker",
    "batch",
    "tensor",
    "layer",
    "hidden",
    "vector",
    "score",
    "policy",
    "route",
    "load",
    "balance",
    "python",
    "rust",
    "kernel",
    "thread",
    "socket",
    "metric",
    "event",
    "hash",
    "prefix",
    "transfer",
    "remote",
    "local",
    "greedy",
    "alpha",
    "beta",
    "gamma",
    "delta",
    "river",
    "mountain",
]


def prompt_text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * i * 3 + i) % len(WORDS)] for i in range(words))


@dataclass
class Engine:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=10).read().decode()
        return {
            (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine")))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        want = tuple(sorted(labels.items()))
        return sum(v for (n, lab), v in self.metrics().items() if n == name and all(p in lab for p in want))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@dataclass
class Fleet:
    prefill: Engine
    decode: Engine
    colocated: Engine
    kv_ports: dict[str, tuple[int, int]]
    gateway: GatewayServer | None = None
    prompts_to_prefill: list[list[int]] = field(default_factory=list)  # as the prefill engine reported them

    @property
    def engines(self) -> list[Engine]:
        return [self.prefill, self.decode, self.colocated]


def start_engine(
    name: str, role: str, core: str, tmp: Path, *, kv_ports: tuple[int, int] | None = None, otlp: str | None = None
) -> Engine:
    port = reserve_port()  # vLLM takes no port 0: chosen outside the ephemeral range (support.ports)
    args = [
        sys.executable,
        "-m",
        "pdgate.cli",
        "engine",
        "vllm",
        "--role",
        role,
        "--model",
        str(tiny_model_dir(HOME)),
        "--served-model-name",
        MODEL,
        "--port",
        str(port),
        "--cpu-cores",
        core,
        "--max-model-len",
        "1024",
        "--python",
        str(HOME / "venv" / "bin" / "python"),
        "--extra-args=--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens, as fleets report
    ]
    if role != "both":
        args += ["--side-channel-port", str(reserve_port())]
    if kv_ports is not None:
        args += [
            "--kv-events-endpoint",
            f"tcp://127.0.0.1:{kv_ports[0]}",
            "--kv-events-replay-endpoint",
            f"tcp://127.0.0.1:{kv_ports[1]}",
        ]
    env = dict(os.environ)
    if otlp is not None:
        args += ["--otlp-traces-endpoint", otlp]
        env["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # export spans within 0.2 s (default 5 s)
    log = tmp / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return Engine(name, port, proc, log)


def wait_healthy(engines: list[Engine]) -> None:
    pending = list(engines)

    def all_healthy() -> bool:
        for engine in list(pending):
            if engine.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM {engine.name} exited ({engine.proc.returncode}):\n{engine.log.read_text()[-3000:]}"
                )
            try:
                if urllib.request.urlopen(f"{engine.url}/health", timeout=2).status == 200:
                    pending.remove(engine)
            except OSError:
                pass
        return not pending

    wait_until(all_healthy, START_TIMEOUT_S, interval=0.5, message=lambda: f"vLLM {[e.name for e in pending]} healthy")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def collector() -> OtlpReceiver:
    """An OTLP/HTTP receiver the PD engines export their request spans to."""
    async with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, collector: OtlpReceiver) -> Fleet:
    require_vllm(HOME, is_installed(HOME))
    tmp = tmp_path_factory.mktemp("vllm")

    def start() -> Fleet:
        # the gateway binds the KV-event ports (vLLM's PUB connects to a concrete host): chosen beforehand
        kv_ports = {"prefill": (reserve_port(), reserve_port()), "decode": (reserve_port(), reserve_port())}
        fleet = Fleet(
            start_engine("prefill", "prefill", "0", tmp, kv_ports=kv_ports["prefill"], otlp=collector.endpoint),
            start_engine("decode", "decode", "1", tmp, kv_ports=kv_ports["decode"], otlp=collector.endpoint),
            start_engine("colocated", "both", "0", tmp),
            kv_ports,
        )
        try:
            wait_healthy(fleet.engines)
        except BaseException:
            for engine in fleet.engines:
                engine.stop()
            raise
        return fleet

    fleet = retry_on_port_clash(start)  # a port taken after all (outside the tests): start again on new ones
    try:
        yield fleet
    finally:
        for engine in fleet.engines:
            engine.stop()


def gateway_config(instances: list[dict[str, Any]], **extra: Any) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "host": "127.0.0.1",
            "port": 0,
            "scrape_interval_s": 0.25,
            "health": {"interval_s": 0.25, "timeout_s": 2.0, "failure_threshold": 1, "cooldown_s": 60},
            "models": [{"name": MODEL, "tokenizer": str(tiny_model_dir(HOME)), "max_model_len": 1024}],
            "instances": instances,
            **extra,
        }
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(engines: Fleet) -> Fleet:
    """The PD pair behind an in-process gateway with the engines' real KV events."""
    instances = [
        {
            "id": role,
            "url": engine.url,
            "kind": "vllm",
            "role": role,
            "model": MODEL,
            "block_size": BLOCK,
            "kv_events": {
                "endpoint": f"tcp://127.0.0.1:{engines.kv_ports[role][0]}",
                "replay_endpoint": f"tcp://127.0.0.1:{engines.kv_ports[role][1]}",
            },
        }
        for role, engine in (("prefill", engines.prefill), ("decode", engines.decode))
    ]
    server = GatewayServer(build_gateway(gateway_config(instances)))
    await server.start()
    engines.gateway = server
    try:
        yield engines
    finally:
        await server.stop()
        engines.gateway = None


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


async def complete(url: str, prompt: str, max_tokens: int, **extra: Any) -> Any:
    return await client(url).completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True, **extra},
    )


async def via_gateway(fleet: Fleet, prompt: str, max_tokens: int) -> Any:
    """A completion through the gateway; records the prompt's token ids as the engine saw them."""
    assert fleet.gateway is not None
    reply = await complete(fleet.gateway.url, prompt, max_tokens)
    fleet.prompts_to_prefill.append(list(reply.choices[0].prompt_token_ids))
    return reply


def vllm_block_hashes(token_ids: list[int]) -> list[int]:
    """vLLM's published hashes of the full blocks, recomputed from vLLM's definition (sha256 of the
    pickled (parent, block tokens, extra keys) chain from the 'vllm-none-hash' root, low 64 bits)."""

    def sha(obj: object) -> bytes:
        return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()

    parent, out = sha(os.environ.get("PYTHONHASHSEED", "vllm-none-hash")), []
    for start in range(0, len(token_ids) - BLOCK + 1, BLOCK):
        parent = sha((parent, tuple(token_ids[start : start + BLOCK]), None))
        out.append(int.from_bytes(parent, "big") & ((1 << 64) - 1))
    return out


async def test_pd_greedy_output_equals_a_single_engine(fleet: Fleet) -> None:
    prompt = prompt_text(1, 60)
    direct = await complete(fleet.colocated.url, prompt, 32)
    through = await via_gateway(fleet, prompt, 32)
    assert through.choices[0].token_ids == direct.choices[0].token_ids
    assert through.choices[0].text == direct.choices[0].text
    assert through.usage.prompt_tokens == direct.usage.prompt_tokens and through.usage.completion_tokens == 32

    stream = await client(fleet.gateway.url).completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        pieces += [c.text for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) == direct.choices[0].text and usage.completion_tokens == 32

    messages = [{"role": "user", "content": prompt_text(2, 30)}]
    chat_direct = await client(fleet.colocated.url).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    chat_stream = await client(fleet.gateway.url).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    text = "".join([c.delta.content or "" async for chunk in chat_stream for c in chunk.choices])
    assert text == chat_direct.choices[0].message.content


async def test_responses_through_pd_equal_vllms_own_responses(fleet: Fleet) -> None:
    """The gateway serves /v1/responses as a chat completion through PD; real vLLM serves it itself."""
    request: dict[str, Any] = {
        "model": MODEL,
        "instructions": "Answer in one line.",
        "input": prompt_text(3, 40),
        "max_output_tokens": 24,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    direct = await client(fleet.colocated.url).responses.create(**request)
    through = await client(fleet.gateway.url).responses.create(**request)
    assert through.output_text == direct.output_text and through.output_text
    assert through.usage.input_tokens == direct.usage.input_tokens
    assert through.usage.output_tokens == direct.usage.output_tokens == 24
    stream = await client(fleet.gateway.url).responses.create(**request, stream=True)
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == direct.output_text
    assert events[-1].response.usage.output_tokens == 24


async def test_decode_engine_gets_the_prompt_by_kv_transfer(fleet: Fleet) -> None:
    def counts() -> tuple[float, float]:
        return (
            fleet.decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer"),
            fleet.decode.metric("vllm:prompt_tokens_by_source_total", source="local_compute"),
        )

    external0, local0 = counts()
    prefill_local0 = fleet.prefill.metric("vllm:prompt_tokens_by_source_total", source="local_compute")
    reply = await via_gateway(fleet, prompt_text(3, 90), 8)
    external1, local1 = counts()
    assert external1 - external0 == reply.usage.prompt_tokens  # the whole prompt came over NIXL
    assert local1 == local0  # and none of it was computed on the decode engine
    assert (
        fleet.prefill.metric("vllm:prompt_tokens_by_source_total", source="local_compute") - prefill_local0
        == reply.usage.prompt_tokens
    )


async def test_client_cached_tokens_are_the_prefill_engines_hits(fleet: Fleet) -> None:
    """vLLM's decode engine counts the prompt it received over NIXL as cached; the client is told the
    prefill engine's own prefix-cache hits instead, streamed and not."""
    assert fleet.gateway is not None

    def cached(usage: Any) -> int:
        details = usage.prompt_tokens_details
        return (details.cached_tokens or 0) if details is not None else 0

    async def streamed(prompt: str) -> Any:
        stream = await client(fleet.gateway.url).completions.create(  # type: ignore[union-attr]
            model=MODEL, prompt=prompt, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        usage = [chunk.usage async for chunk in stream if chunk.usage is not None][-1]
        body = json.dumps({"model": MODEL, "prompt": prompt}).encode()
        ids = fleet.gateway.gateway.proxy.intake.parse(body, "completion", None).prompt_ids  # type: ignore[union-attr]
        fleet.prompts_to_prefill.append(ids)  # the engine holds its blocks now (the exact-index test counts them)
        return usage

    for seed, ask in ((21, None), (22, streamed)):
        prompt = prompt_text(seed, 350)  # several full 128-token blocks, never sent before
        hits0 = fleet.prefill.metric("vllm:prefix_cache_hits_total")
        first = (await via_gateway(fleet, prompt, 4)).usage if ask is None else await ask(prompt)
        assert first.prompt_tokens > 2 * BLOCK
        assert cached(first) == 0 == fleet.prefill.metric("vllm:prefix_cache_hits_total") - hits0
        again = (await via_gateway(fleet, prompt, 4)).usage if ask is None else await ask(prompt)
        hits = fleet.prefill.metric("vllm:prefix_cache_hits_total") - hits0
        assert hits >= 2 * BLOCK and cached(again) == hits


async def test_exact_prefix_index_holds_the_blocks_vllm_reported(fleet: Fleet) -> None:
    reply = await via_gateway(fleet, prompt_text(4, 400), 4)  # several full 128-token blocks
    assert reply.usage.prompt_tokens >= 3 * BLOCK
    index = fleet.gateway.gateway.cluster.exact_index  # type: ignore[union-attr]
    expected = {h for ids in fleet.prompts_to_prefill for h in vllm_block_hashes(ids)}
    # exactly the prompts' full blocks, from real events
    await wait_until_async(
        lambda: index.blocks("prefill") == expected,
        timeout=10,
        message=lambda: f"the prefill blocks to match: {len(index.blocks('prefill') ^ expected)} differ",
    )
    newest = set(vllm_block_hashes(fleet.prompts_to_prefill[-1]))
    await wait_until_async(
        lambda: newest <= index.blocks("decode"), timeout=10, message="the blocks stored on decode too"
    )
    # and the gateway scores the prefix on the instances that hold it
    snapshot = fleet.gateway.gateway.cluster.snapshot(
        MODEL,
        fleet.gateway.gateway.proxy.intake.parse(  # type: ignore[union-attr]
            json.dumps({"model": MODEL, "prompt": prompt_text(4, 400)}).encode(), "completion", None
        ).hashes,
    )
    assert snapshot.prefix_hit_tokens["prefill"] == len(newest) * BLOCK


async def test_load_is_read_from_vllm_metrics(fleet: Fleet) -> None:
    cluster = fleet.gateway.gateway.cluster  # type: ignore[union-attr]
    stream = await client(fleet.gateway.url).completions.create(
        model=MODEL,
        prompt=prompt_text(5, 40),
        max_tokens=900,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    seen_running = 0
    async for _chunk in stream:
        await cluster.refresh(check_health=False)
        load = cluster.instances["decode"].load
        assert load is not None and 0.0 <= load.kv_usage <= 1.0
        seen_running = max(seen_running, load.running)
        if seen_running:
            break
    await stream.close()
    assert seen_running == 1  # the request decoding on the decode engine, as vLLM reports it


async def test_client_disconnect_aborts_the_request_on_vllm(fleet: Fleet) -> None:
    stream = await client(fleet.gateway.url).completions.create(
        model=MODEL,
        prompt=prompt_text(6, 40),
        max_tokens=900,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    received = 0
    async for _chunk in stream:
        received += 1
        if received == 5:
            break
    assert fleet.decode.metric("vllm:num_requests_running") == 1
    await stream.close()  # the client goes away mid-stream
    await wait_until_async(
        lambda: fleet.decode.metric("vllm:num_requests_running") == 0,
        timeout=10,
        interval=0.1,
        message="the aborted request to leave the decode engine",
    )
    assert fleet.decode.metric("vllm:kv_cache_usage_perc") == 0.0
    states = fleet.gateway.gateway.cluster.instances  # type: ignore[union-attr]
    assert all(s.inflight_requests == 0 for s in states.values())


async def test_vllm_continues_the_gateway_trace(engines: Fleet, collector: OtlpReceiver) -> None:
    """Each vLLM engine gets its leg's traceparent: its llm_request span is that leg's child."""
    exporter = InMemorySpanExporter()
    instances = [
        {"id": role, "url": engine.url, "kind": "vllm", "role": role, "model": MODEL, "block_size": BLOCK}
        for role, engine in (("prefill", engines.prefill), ("decode", engines.decode))
    ]
    server = GatewayServer(build_gateway(gateway_config(instances)), span_exporter=exporter)
    await server.start()
    try:
        reply = await complete(server.url, prompt_text(8, 30), 6)
    finally:
        await server.stop()
    assert reply.usage.completion_tokens == 6
    spans = exporter.get_finished_spans()
    legs = {s.name: s for s in spans if s.name in ("pdgate.prefill", "pdgate.decode")}
    assert set(legs) == {"pdgate.prefill", "pdgate.decode"}
    trace_id = format(legs["pdgate.decode"].context.trace_id, "032x")
    received = await collector.wait_for(
        lambda got: sum(s.name == "llm_request" and s.trace_id == trace_id for s in got) >= 2, timeout=30
    )
    by_parent = {s.parent_span_id: s for s in received if s.name == "llm_request" and s.trace_id == trace_id}
    prefill_span = by_parent[format(legs["pdgate.prefill"].context.span_id, "016x")]
    decode_span = by_parent[format(legs["pdgate.decode"].context.span_id, "016x")]
    assert prefill_span.attributes["gen_ai.usage.prompt_tokens"] == reply.usage.prompt_tokens
    assert prefill_span.attributes["gen_ai.usage.completion_tokens"] == 1  # the prefill leg's one token
    assert decode_span.attributes["gen_ai.usage.completion_tokens"] == 6


async def _admin(url: str, path: str, body: dict | None = None) -> tuple[int, Any]:
    def call() -> tuple[int, Any]:
        req = urllib.request.Request(
            f"{url}{path}",
            data=json.dumps(body or {}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    return await asyncio.to_thread(call)


async def _stream_with(
    url: str, prompt: str, max_tokens: int, request_id: str, at: int, action: Any
) -> tuple[list[int], Any, set[str]]:
    """A greedy streamed completion whose token ids are collected; ``action`` runs after ``at`` tokens."""
    stream = await client(url).completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
        extra_headers={"X-Request-Id": request_id},
    )
    ids: list[int] = []
    usage, chunk_ids = None, set()
    async for chunk in stream:
        chunk_ids.add(chunk.id)
        usage = chunk.usage or usage
        for choice in chunk.choices:
            ids += list(getattr(choice, "token_ids", None) or [])
        if action is not None and len(ids) >= at:
            await action()
            action = None
    return ids, usage, chunk_ids


async def test_migration_and_failover_on_vllm(engines: Fleet) -> None:
    """Run second to last (it kills the decode engine). A stream decoding on one engine moves to
    the NIXL decode engine through vLLM's own PD path (prompt + generated tokens prefilled with
    do_remote_decode, continued with the returned kv_transfer_params); then the decode engine is
    SIGKILLed under another stream, which fails over. Both equal an uninterrupted greedy run."""
    instances = [
        {
            "id": "prefill",
            "url": engines.prefill.url,
            "kind": "vllm",
            "role": "prefill",
            "model": MODEL,
            "block_size": BLOCK,
        },
        {
            "id": "decode",
            "url": engines.decode.url,
            "kind": "vllm",
            "role": "decode",
            "model": MODEL,
            "block_size": BLOCK,
        },
        # no KV connector: as a decode instance it computes the prompt itself
        {
            "id": "colocated",
            "url": engines.colocated.url,
            "kind": "vllm",
            "role": "decode",
            "model": MODEL,
            "block_size": BLOCK,
        },
    ]
    server = GatewayServer(build_gateway(gateway_config(instances, migration={"policy": "no-migration"})))
    await server.start()
    tokens = 400
    try:
        url = server.url
        prompt = prompt_text(21, 50)
        reference = await complete(engines.colocated.url, prompt, tokens)
        expected = list(reference.choices[0].token_ids)

        # 1. migration: the stream starts on "colocated" (decode drained), then moves to "decode"
        assert (await _admin(url, "/admin/instances/decode/drain"))[0] in (200, 202)
        external0 = engines.decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
        moved: dict[str, Any] = {}

        async def migrate() -> None:
            await _admin(url, "/admin/instances/decode/undrain")
            moved["answer"] = await _admin(url, "/admin/requests/vllm-moved/migrate", {"target": "decode"})

        ids, usage, chunk_ids = await _stream_with(url, prompt, tokens, "vllm-moved", 12, migrate)
        status, answer = moved["answer"]
        assert status == 200 and answer["migrated"] is True and answer["from"] == "colocated", answer
        assert ids == expected  # no token lost or repeated, the same continuation
        assert usage.completion_tokens == tokens and usage.prompt_tokens == reference.usage.prompt_tokens
        assert len(chunk_ids) == 1
        moved_at = answer["generated_tokens"]
        external = (
            engines.decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer") - external0
        )
        # prompt + the tokens generated at the hand-off came over NIXL: at least the 12 the move
        # was asked after, at most what the client had when the move was answered
        assert reference.usage.prompt_tokens + 12 - 1 <= external <= reference.usage.prompt_tokens + moved_at

        # 2. failover: a stream on "decode" whose engine is SIGKILLed continues on "colocated"
        assert (await _admin(url, "/admin/instances/colocated/drain"))[0] in (200, 202)

        async def kill() -> None:
            await _admin(url, "/admin/instances/colocated/undrain")
            os.killpg(engines.decode.proc.pid, signal.SIGKILL)

        ids, usage, chunk_ids = await _stream_with(url, prompt, tokens, "vllm-killed", 12, kill)
        assert ids == expected and usage.completion_tokens == tokens and len(chunk_ids) == 1
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode())
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

        def count(**labels: str) -> float:
            return sum(
                v
                for (n, lab), v in samples.items()
                if n == "pdgate_migrations_total" and all(p in lab for p in labels.items())
            )

        assert count(reason="admin", mechanism="pd", outcome="migrated") == 1
        assert count(reason="failover", outcome="migrated") == 1
    finally:
        await server.stop()
        engines.decode.stop()


async def test_killed_engine_is_marked_unhealthy_and_avoided(engines: Fleet) -> None:
    """Run last: it kills the colocated engine. The prefill engine serves plain requests too."""
    instances = [
        {
            "id": "colocated",
            "url": engines.colocated.url,
            "kind": "vllm",
            "role": "both",
            "model": MODEL,
            "block_size": BLOCK,
        },
        {
            "id": "other",
            "url": engines.prefill.url,
            "kind": "vllm",
            "role": "both",
            "model": MODEL,
            "block_size": BLOCK,
        },
    ]
    server = GatewayServer(build_gateway(gateway_config(instances)))
    await server.start()
    try:
        cluster = server.gateway.cluster
        os.killpg(engines.colocated.proc.pid, signal.SIGKILL)
        engines.colocated.proc.wait(10)
        for i in range(6):
            reply = await complete(server.url, prompt_text(10 + i, 20), 4)
            assert reply.usage.completion_tokens == 4  # every request served, before and after detection
        await wait_until_async(
            lambda: cluster.instances["colocated"].breaker.state != "closed",
            timeout=5,
            message="the dead engine's circuit to open",
        )
        assert cluster.ready(MODEL)
    finally:
        await server.stop()
