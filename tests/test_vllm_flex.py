"""Flex instances on real vLLM (issue 17, item 5): two CPU engines launched with ``--role flex``
(NixlConnector ``kv_both``), behind an in-process gateway as ``role: flex`` entries, A serving
prefill and B decode.

* A greedy completion through the gateway equals, token for token, the same completion on one
  engine alone; each engine's own prompt-token counters show that A computed the prompt and B
  pulled it over NIXL.
* The roles swapped through the admin API (via a colocated step, since a change that leaves no
  prefill or decode path is 409): the same answer, and now B computes and A pulls.
* Both serving ``both``: the gateway colocates the request on one engine, no KV moves.
* A stream decoding on an engine that is moved to ``prefill`` continues on the other one with
  the same tokens (migration reason ``role``): the engine that left prefills the continuation
  from its cache and the other pulls it over NIXL (mechanism ``pd``).

Needs ``pdgate engine vllm-setup``, as tests/test_vllm_e2e.py (skips without it, fails in CI).
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from support.ports import retry_on_port_clash
from support.vllm import require_vllm
from support.waiting import wait_until_async
from test_vllm_e2e import (
    BLOCK,
    HOME,
    MODEL,
    Engine,
    _admin,
    _stream_with,
    complete,
    gateway_config,
    prompt_text,
    start_engine,
    wait_healthy,
)

from pdgate.engines.launch.vllm_cpu.install import is_installed
from pdgate.gateway.app import GatewayServer, build_gateway

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

SOURCES = ("local_compute", "external_kv_transfer")
PROMPT = prompt_text(31, 60)  # under one 128-token block: never a prefix-cache hit, every token counted
TOKENS = 24


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Engine]]:
    """Engines ``a`` and ``b``: vLLM with NixlConnector kv_both, each on its own core and side channel."""
    require_vllm(HOME, is_installed(HOME))
    tmp = tmp_path_factory.mktemp("vllm-flex")

    def start() -> dict[str, Engine]:
        pair = {"a": start_engine("a", "flex", "0", tmp), "b": start_engine("b", "flex", "1", tmp)}
        try:
            wait_healthy(list(pair.values()))
        except BaseException:
            for engine in pair.values():
                engine.stop()
            raise
        return pair

    pair = retry_on_port_clash(start)
    try:
        yield pair
    finally:
        for engine in pair.values():
            engine.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(engines: dict[str, Engine]) -> AsyncIterator[GatewayServer]:
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
        for (name, engine), serving in zip(engines.items(), ("prefill", "decode"))
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
    status, body = await _admin(url, f"/admin/instances/{instance}/role", {"role": role})
    assert status == 200 and body["serving"] == role, body


async def answer_and_sources(url: str, engines: dict[str, Engine]) -> tuple[list[int], dict[tuple[str, str], float]]:
    """The completion's token ids and what each engine's prompt-token counters gained from it."""
    before = prompt_tokens_by_source(engines)
    reply = await complete(url, PROMPT, TOKENS)
    after = prompt_tokens_by_source(engines)
    assert reply.usage.completion_tokens == TOKENS
    return list(reply.choices[0].token_ids), {k: v - before[k] for k, v in after.items() if v != before[k]}


async def test_flex_engines_split_swap_and_colocate(engines: dict[str, Engine], gateway: GatewayServer) -> None:
    url = gateway.url
    reference = await complete(engines["a"].url, PROMPT, TOKENS)  # colocated, no kv_transfer_params
    expected, n = list(reference.choices[0].token_ids), reference.usage.prompt_tokens

    # A prefills, B pulls the prompt's KV over NIXL and decodes
    ids, gained = await answer_and_sources(url, engines)
    assert ids == expected
    assert gained == {("a", "local_compute"): n, ("b", "external_kv_transfer"): n}

    # B alone cannot serve as prefill (no decode path left): refused, nothing changes
    status, body = await _admin(url, "/admin/instances/b/role", {"role": "prefill"})
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
    engines: dict[str, Engine], gateway: GatewayServer
) -> None:
    """Both serve ``both``; the engine the stream decodes on is moved to ``prefill``."""
    url = gateway.url
    for instance in ("a", "b"):
        await set_role(url, instance, "both")
    prompt, tokens = prompt_text(32, 50), 400
    reference = await complete(engines["b"].url, prompt, tokens)
    migrations = gateway.gateway.migrations
    assert migrations is not None
    moved: dict[str, str] = {}

    async def to_prefill() -> None:
        live = await wait_until_async(lambda: migrations.find("flex-moved"), message="the stream in the gateway")
        moved["from"] = live.instance_id
        await set_role(url, live.instance_id, "prefill")

    before = prompt_tokens_by_source(engines)
    ids, usage, chunk_ids = await _stream_with(url, prompt, tokens, "flex-moved", 12, to_prefill)
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


async def gateway_metrics(url: str) -> str:
    return await asyncio.to_thread(lambda: urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode())


def migration_count(text: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "pdgate_migrations_total" and all(s.labels.get(k) == v for k, v in labels.items())
    )
