"""The gateway against real vLLM (the PyPI CPU build): two engines, one prefill and one decode, with
NixlConnector.

Needs ``pdgate engine vllm-setup`` (``.vllm/`` or ``$PDGATE_VLLM_HOME``). Without it these tests
skip with the reason; with ``CI=true`` a missing environment fails them instead. The engines are
real processes started with ``pdgate engine vllm`` (tests/support/vllm_engines.py); the gateway
runs in this process so that its prefix index and load view can be inspected.

Both engines are started with ``--role flex`` (NixlConnector ``kv_both``). A request without
``kv_transfer_params`` is served by either one as by a colocated engine, so the single-engine reference
is a plain request sent straight to the decode engine (greedy output is deterministic; the decode
engine, so that the prefill engine stores only the blocks the gateway sent it). They also serve as
flex instances (issue 17, item 5): behind a gateway of their own as ``role: flex`` entries, A (the
prefill engine) serving prefill and B (the decode engine) decode.

* A greedy completion through the gateway equals, token for token, the same completion on one
  engine alone; each engine's own prompt-token counters show that A computed the prompt and B
  pulled it over NIXL.
* The roles swapped through the admin API (via a colocated step, since a change that leaves no
  prefill or decode path is 409): the same answer, and now B computes and A pulls.
* Both serving ``both``: the gateway colocates the request on one engine, no KV moves.
* A stream decoding on an engine that is moved to ``prefill`` continues on the other one with
  the same tokens (migration reason ``role``): the engine that left prefills the continuation
  from its cache and the other pulls it over NIXL (mechanism ``pd``).

Tests run in file order on the shared engines: the exact-index test counts every block the prefill
engine has stored, so it runs before anything else sends it long requests; the last one kills the
decode engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.otlp import OtlpReceiver
from support.ports import reserve_port, retry_on_port_clash
from support.vllm import require_vllm
from support.vllm_engines import (
    BLOCK,
    HOME,
    MODEL,
    Engine,
    admin,
    client,
    complete,
    counter_total,
    gateway_config,
    gateway_metrics,
    migration_count,
    prompt_text,
    start_engine,
    stream_with,
    wait_healthy,
)
from support.waiting import wait_until_async

from pdgate.engines.launch.vllm_cpu.install import is_installed
from pdgate.gateway.app import build_gateway
from pdgate.gateway.server import GatewayServer

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]


@dataclass
class Fleet:
    prefill: Engine
    decode: Engine
    kv_ports: dict[str, tuple[int, int]]
    gateway: GatewayServer | None = None
    prompts_to_prefill: list[list[int]] = field(default_factory=list)  # as the prefill engine reported them

    @property
    def engines(self) -> list[Engine]:
        return [self.prefill, self.decode]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def collector() -> OtlpReceiver:
    """An OTLP/HTTP receiver the PD engines export their request spans to."""
    async with OtlpReceiver() as receiver:
        yield receiver


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(tmp_path_factory: pytest.TempPathFactory, collector: OtlpReceiver) -> AsyncIterator[Fleet]:
    """The two engines, started and stopped in threads: the loop keeps serving the OTLP receiver
    meanwhile (a stopping engine flushes its spans to it, and waits for it up to 10 s)."""
    require_vllm(HOME, is_installed(HOME))
    tmp = tmp_path_factory.mktemp("vllm")

    def start() -> Fleet:
        # the gateway binds the KV-event ports (vLLM's PUB connects to a concrete host): chosen beforehand
        kv_ports = {"prefill": (reserve_port(), reserve_port()), "decode": (reserve_port(), reserve_port())}
        fleet = Fleet(
            # kv_both: the gateways below use them as prefill and decode, and as flex instances
            start_engine("prefill", "flex", "0", tmp, kv_ports=kv_ports["prefill"], otlp=collector.endpoint),
            start_engine("decode", "flex", "1", tmp, kv_ports=kv_ports["decode"], otlp=collector.endpoint),
            kv_ports,
        )
        try:
            wait_healthy(fleet.engines)
        except BaseException:
            for engine in fleet.engines:
                engine.stop()
            raise
        return fleet

    fleet = await asyncio.to_thread(retry_on_port_clash, start)  # a port taken after all: again on new ones
    try:
        yield fleet
    finally:
        await asyncio.gather(*(asyncio.to_thread(engine.stop) for engine in fleet.engines))


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
    direct = await complete(fleet.decode.url, prompt, 32)  # one engine alone: no kv_transfer_params
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
    chat_direct = await client(fleet.decode.url).chat.completions.create(
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
    direct = await client(fleet.decode.url).responses.create(**request)
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


SOURCES = ("local_compute", "external_kv_transfer")
FLEX_PROMPT = prompt_text(31, 60)  # under one 128-token block: never a prefix-cache hit, every token counted
FLEX_TOKENS = 24


@pytest.fixture
def flex_engines(engines: Fleet) -> dict[str, Engine]:
    """The PD pair as flex engines ``a`` (the prefill engine) and ``b`` (the decode engine)."""
    return {"a": engines.prefill, "b": engines.decode}


@pytest_asyncio.fixture(loop_scope="module")
async def flex_gateway(flex_engines: dict[str, Engine]) -> AsyncIterator[GatewayServer]:
    """A gateway of its own for each flex test: ``a`` and ``b`` as ``role: flex``, serving prefill and decode.

    The roles it changes are its own view; the engines (kv_both) serve any leg either way, so the
    other gateways over the same engines are unaffected."""
    instances = [
        {
            "id": name,
            "url": engine.url,
            "kind": "vllm",
            "role": "flex",
            "serving": serving,
            "model": MODEL,
            "block_size": BLOCK,
        }
        for (name, engine), serving in zip(flex_engines.items(), ("prefill", "decode"))
    ]
    migration = {"policy": "no-migration", "interval_s": 0.1}  # moves only for drains and role changes
    server = GatewayServer(build_gateway(gateway_config(instances, migration=migration)))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def prompt_tokens_by_source(engines: dict[str, Engine]) -> dict[tuple[str, str], float]:
    return {
        (name, source): engine.metric("vllm:prompt_tokens_by_source_total", source=source)
        for name, engine in engines.items()
        for source in SOURCES
    }


async def set_role(url: str, instance: str, role: str) -> None:
    status, body = await admin(url, f"/admin/instances/{instance}/role", {"role": role})
    assert status == 200 and body["serving"] == role, body


async def answer_and_sources(url: str, engines: dict[str, Engine]) -> tuple[list[int], dict[tuple[str, str], float]]:
    """The completion's token ids and what each engine's prompt-token counters gained from it."""
    before = prompt_tokens_by_source(engines)
    reply = await complete(url, FLEX_PROMPT, FLEX_TOKENS)
    after = prompt_tokens_by_source(engines)
    assert reply.usage.completion_tokens == FLEX_TOKENS
    return list(reply.choices[0].token_ids), {k: v - before[k] for k, v in after.items() if v != before[k]}


async def test_flex_engines_split_swap_and_colocate(
    flex_engines: dict[str, Engine], flex_gateway: GatewayServer
) -> None:
    engines, url = flex_engines, flex_gateway.url
    reference = await complete(engines["a"].url, FLEX_PROMPT, FLEX_TOKENS)  # colocated, no kv_transfer_params
    expected, n = list(reference.choices[0].token_ids), reference.usage.prompt_tokens

    # A prefills, B pulls the prompt's KV over NIXL and decodes
    ids, gained = await answer_and_sources(url, engines)
    assert ids == expected
    assert gained == {("a", "local_compute"): n, ("b", "external_kv_transfer"): n}

    # B alone cannot serve as prefill (no decode path left): refused, nothing changes
    status, body = await admin(url, "/admin/instances/b/role", {"role": "prefill"})
    assert status == 409 and "without a decode path" in body["error"]["message"], body

    # swap through a colocated step: B both, A decode, B prefill
    for instance, role in (("b", "both"), ("a", "decode"), ("b", "prefill")):
        await set_role(url, instance, role)
    ids, gained = await answer_and_sources(url, engines)
    assert ids == expected
    assert gained == {("b", "local_compute"): n, ("a", "external_kv_transfer"): n}

    # both colocated: the whole request on one engine, no KV transfer
    for instance in ("a", "b"):
        await set_role(url, instance, "both")
    ids, gained = await answer_and_sources(url, engines)
    assert ids == expected
    assert gained in ({("a", "local_compute"): n}, {("b", "local_compute"): n})


async def test_engine_leaving_the_decode_role_hands_its_stream_on(
    flex_engines: dict[str, Engine], flex_gateway: GatewayServer
) -> None:
    """Both serve ``both``; the engine the stream decodes on is moved to ``prefill``."""
    engines, url = flex_engines, flex_gateway.url
    for instance in ("a", "b"):
        await set_role(url, instance, "both")
    prompt, tokens = prompt_text(32, 50), 400
    reference = await complete(engines["b"].url, prompt, tokens)
    migrations = flex_gateway.gateway.migrations
    assert migrations is not None
    moved: dict[str, str] = {}

    async def to_prefill() -> None:
        live = await wait_until_async(lambda: migrations.find("flex-moved"), message="the stream in the gateway")
        moved["from"] = live.instance_id
        await set_role(url, live.instance_id, "prefill")

    before = prompt_tokens_by_source(engines)
    ids, usage, chunk_ids = await stream_with(url, prompt, tokens, "flex-moved", 12, to_prefill)
    after = prompt_tokens_by_source(engines)
    assert ids == list(reference.choices[0].token_ids)  # no token lost or repeated
    assert usage.completion_tokens == tokens and usage.prompt_tokens == reference.usage.prompt_tokens
    assert len(chunk_ids) == 1
    # the engine that left the decode role prefilled the continuation (its cache holds the prompt and
    # the tokens so far) and the other pulled it over NIXL: prompt + at least the 12 tokens generated
    # by the move, less the last one, which vLLM computes itself
    assert migration_count(await gateway_metrics(url), reason="role", outcome="migrated", mechanism="pd") == 1
    (other,) = set(engines) - {moved["from"]}
    pulled = after[(other, "external_kv_transfer")] - before[(other, "external_kv_transfer")]
    assert pulled >= reference.usage.prompt_tokens + 12 - 1, (moved, before, after)


LONG_PROMPT = prompt_text(21, 50)
LONG_TOKENS = 400


def plain_instance(instance_id: str, engine: Engine, role: str) -> dict[str, Any]:
    """``engine`` as a vLLM instance of a gateway of a test's own (no KV events)."""
    return {"id": instance_id, "url": engine.url, "kind": "vllm", "role": role, "model": MODEL, "block_size": BLOCK}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def long_answer(engines: Fleet) -> Any:
    """The uninterrupted greedy answer the moved and the failed-over streams must equal. Computed on the
    prefill engine: the decode engine's cache must not hold it (a move pulls the whole context there)."""
    return await complete(engines.prefill.url, LONG_PROMPT, LONG_TOKENS)


async def test_admin_migration_goes_through_vllms_pd_path(engines: Fleet, long_answer: Any) -> None:
    """A stream decoding on the prefill engine moves to the decode engine through the admin API and
    vLLM's own PD path: prompt + generated tokens prefilled with do_remote_decode, pulled over NIXL and
    continued with the returned kv_transfer_params. It equals an uninterrupted greedy run.

    A move's prefill instance is never its source, so this gateway lists the prefill engine twice:
    as ``prefill`` and as ``home`` (``both``), where the stream starts, colocated while ``decode`` is
    drained (no split path; the stream is the gateway's only request)."""
    instances = [
        plain_instance("prefill", engines.prefill, "prefill"),
        plain_instance("decode", engines.decode, "decode"),
        plain_instance("home", engines.prefill, "both"),
    ]
    server = GatewayServer(build_gateway(gateway_config(instances, migration={"policy": "no-migration"})))
    await server.start()
    try:
        url = server.url
        assert (await admin(url, "/admin/instances/decode/drain"))[0] in (200, 202)
        external0 = engines.decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
        moved: dict[str, Any] = {}

        async def migrate() -> None:
            await admin(url, "/admin/instances/decode/undrain")
            moved["answer"] = await admin(url, "/admin/requests/vllm-moved/migrate", {"target": "decode"})

        ids, usage, chunk_ids = await stream_with(url, LONG_PROMPT, LONG_TOKENS, "vllm-moved", 12, migrate)
        status, answer = moved["answer"]
        assert status == 200 and answer["migrated"] is True and answer["from"] == "home", answer
        assert ids == list(long_answer.choices[0].token_ids)  # no token lost or repeated, the same continuation
        assert usage.completion_tokens == LONG_TOKENS and usage.prompt_tokens == long_answer.usage.prompt_tokens
        assert len(chunk_ids) == 1
        moved_at = answer["generated_tokens"]
        external = (
            engines.decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer") - external0
        )
        # prompt + the tokens generated at the hand-off came over NIXL: at least the 12 the move
        # was asked after, at most what the client had when the move was answered
        prompt_tokens = long_answer.usage.prompt_tokens
        assert prompt_tokens + 12 - 1 <= external <= prompt_tokens + moved_at
        assert migration_count(await gateway_metrics(url), reason="admin", mechanism="pd", outcome="migrated") == 1
    finally:
        await server.stop()


async def test_killed_engine_fails_over_and_is_avoided(engines: Fleet, long_answer: Any) -> None:
    """Run last: it SIGKILLs the decode engine under a stream and three requests, both engines serving
    ``both``.

    The stream continues on the prefill engine with the same tokens (failover). The requests the
    engine was serving had sent the client nothing: they are retried on the other engine. The
    dead engine's circuit opens, the requests sent after the kill are served by the other engine,
    and the model stays ready."""
    instances = [plain_instance("decode", engines.decode, "both"), plain_instance("other", engines.prefill, "both")]
    server = GatewayServer(build_gateway(gateway_config(instances, migration={"policy": "no-migration"})))
    await server.start()
    try:
        url, cluster, migrations = server.url, server.gateway.cluster, server.gateway.migrations
        assert migrations is not None
        assert (await admin(url, "/admin/instances/other/drain"))[0] in (200, 202)  # everything starts on decode
        on_the_engine: list[asyncio.Task[Any]] = []

        async def kill() -> None:
            live = migrations.find("vllm-killed")
            assert live is not None and live.instance_id == "decode"
            # long enough to be still decoding when the engine dies
            on_the_engine.extend(asyncio.create_task(complete(url, prompt_text(10 + i, 20), 200)) for i in range(3))
            await wait_until_async(
                lambda: cluster.instances["decode"].inflight_requests == 4,
                timeout=10,
                message="the three requests placed on the decode engine",
            )
            await admin(url, "/admin/instances/other/undrain")
            os.killpg(engines.decode.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(engines.decode.proc.wait, 10)

        ids, usage, chunk_ids = await stream_with(url, LONG_PROMPT, LONG_TOKENS, "vllm-killed", 12, kill)
        assert ids == list(long_answer.choices[0].token_ids) and usage.completion_tokens == LONG_TOKENS
        assert len(chunk_ids) == 1
        assert [(await task).usage.completion_tokens for task in on_the_engine] == [200] * 3  # every one served
        for i in range(3):  # and after the kill
            assert (await complete(url, prompt_text(13 + i, 20), 4)).usage.completion_tokens == 4
        text = await gateway_metrics(url)
        assert migration_count(text, reason="failover", outcome="migrated") == 1
        assert counter_total(text, "pdgate_retries_total", model=MODEL) == 3
        assert cluster.instances["decode"].breaker.state != "closed"  # the engine is avoided
        assert cluster.ready(MODEL)
    finally:
        for task in on_the_engine:
            task.cancel()
        await asyncio.gather(*on_the_engine, return_exceptions=True)
        await server.stop()
        engines.decode.stop()
