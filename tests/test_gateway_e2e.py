"""The gateway end to end: real engine processes, real HTTP, the official openai client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import openai
import pytest
from support.fleet import (
    MODEL,
    engine_flags,
    get_json,
    instance_entry,
    metric,
    start_gateway,
    write_config,
)
from support.procs import PdgateProcess, start_sim
from support.waiting import wait_until

PROMPT = "Prefill-decode disaggregation splits the two phases of inference across machines. " * 5


@dataclass
class Fleet:
    gateway: PdgateProcess
    prefill: list[PdgateProcess]
    decode: list[PdgateProcess]
    reference: PdgateProcess  # a colocated engine, for token-for-token comparisons

    @property
    def engines(self) -> list[PdgateProcess]:
        return [*self.prefill, *self.decode]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key="unused", max_retries=0)


def _start_fleet(tmp_path, api: str, kind: str) -> Fleet:
    procs: list[PdgateProcess] = []
    entries = []
    try:
        prefill, decode = [], []
        for role, group in (("prefill", prefill), ("prefill", prefill), ("decode", decode), ("decode", decode)):
            # every port is bound by the engine itself (port 0) and read back from what it printed
            proc = start_sim(*engine_flags(role, api, kv_events=api == "vllm"))
            procs.append(proc)
            group.append(proc)
            entries.append(instance_entry(proc, role, kind))
        reference = start_sim(*engine_flags("both", api))
        procs.append(reference)
        gateway = start_gateway(write_config(tmp_path / f"{api}.yaml", entries))
        return Fleet(gateway, prefill, decode, reference)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise


def _fleet_fixture(api: str, kind: str):
    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory) -> Iterator[Fleet]:
        fleet = _start_fleet(tmp_path_factory.mktemp(api), api, kind)
        yield fleet
        for proc in (fleet.gateway, *fleet.engines, fleet.reference):
            proc.stop()

    return fixture


vllm_fleet = _fleet_fixture("vllm", "sim")
sglang_fleet = _fleet_fixture("sglang", "sim-sglang")


def greedy(client: openai.OpenAI, prompt: str, n: int = 16, **kw):
    return client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=n,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
        **kw,
    )


def reference_tokens(fleet: Fleet, prompt: str, n: int = 16) -> list[int]:
    ref = openai.OpenAI(base_url=f"{fleet.reference.url}/v1", api_key="unused", max_retries=0)
    return greedy(ref, prompt, n).choices[0].model_extra["token_ids"]


@pytest.mark.parametrize("fleet_name", ["vllm_fleet", "sglang_fleet"])
def test_pd_through_gateway_equals_single_engine(fleet_name, request):
    fleet: Fleet = request.getfixturevalue(fleet_name)
    client = fleet.client()
    for i in range(3):
        prompt = f"Case {i}. {PROMPT}"
        result = greedy(client, prompt)
        assert result.choices[0].model_extra["token_ids"] == reference_tokens(fleet, prompt)
        streamed = greedy(client, prompt, stream=True)
        ids = [t for chunk in streamed for t in (chunk.choices[0].model_extra.get("token_ids") or [])]
        assert ids == reference_tokens(fleet, prompt)
    # the prompt reached the decode engines by KV transfer, computed on the prefill engines
    if fleet_name == "vllm_fleet":
        pulled = sum(
            metric(d.url, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") for d in fleet.decode
        )
        decode_local = sum(
            metric(d.url, "vllm:prompt_tokens_by_source_total", source="local_compute") for d in fleet.decode
        )
        prefill_local = sum(
            metric(p.url, "vllm:prompt_tokens_by_source_total", source="local_compute") for p in fleet.prefill
        )
        assert pulled > 0 and prefill_local > 0
        assert decode_local == sum(metric(d.url, "vllm:request_success_total") for d in fleet.decode)  # 1 token each
    else:
        cached = sum(metric(d.url, "sglang:cached_tokens_total") for d in fleet.decode)
        prompts = sum(metric(d.url, "sglang:prompt_tokens_total") for d in fleet.decode)
        assert prompts > 0 and cached == prompts - sum(metric(d.url, "sglang:num_requests_total") for d in fleet.decode)


def test_openai_client_chat_and_completions_sync_and_async(vllm_fleet):
    client = vllm_fleet.client()
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi!"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.usage.completion_tokens == 8 and chat.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi!"}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens

    async def run_async() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{vllm_fleet.gateway.url}/v1", api_key="unused", max_retries=0)
        try:
            results = await asyncio.gather(
                *(
                    aclient.completions.create(
                        model=MODEL, prompt=f"Async {i}", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
                    )
                    for i in range(10)
                )
            )
            return [r.choices[0].text for r in results]
        finally:
            await aclient.close()

    texts = asyncio.run(run_async())
    assert len(texts) == 10 and all(texts)


def test_request_id_is_accepted_and_returned(vllm_fleet):
    client = vllm_fleet.client()
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="id please", max_tokens=2, extra_headers={"X-Request-Id": "my-id-123"}
    )
    assert raw.headers["x-request-id"] == "my-id-123"
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="id please", max_tokens=2)
    assert raw.headers["x-request-id"].startswith("pdgate-")


def test_shared_prefix_goes_to_the_prefill_instance_that_holds_it(vllm_fleet):
    client = vllm_fleet.client()
    gateway = vllm_fleet.gateway.url
    system = "You are the support assistant of a large bank; follow every policy below precisely. " * 12

    def queried() -> dict[str, float]:
        return {p.url: metric(p.url, "vllm:prefix_cache_queries_total") for p in vllm_fleet.prefill}

    queried_before = queried()
    greedy(client, system + "First question?", 2)
    queried_after = queried()
    first = next(p for p in vllm_fleet.prefill if queried_after[p.url] > queried_before[p.url])
    first_id = f"prefill-{first.port}"

    # Wait until the first prefill's KV events reached the gateway: a prompt sharing the system
    # prompt's first blocks is then placed on that instance *because* the gateway's index says it
    # holds them (pdgate_prefix_cache_hit_tokens_total counts what the index expected there).
    probes = iter(range(1000))
    expected_before = metric(gateway, "pdgate_prefix_cache_hit_tokens_total", instance=first_id)

    def index_knows_the_first_prefill() -> bool:
        greedy(client, system[: len(system) // 3] + f"Probe {next(probes)}?", 1)
        return metric(gateway, "pdgate_prefix_cache_hit_tokens_total", instance=first_id) > expected_before

    wait_until(index_knows_the_first_prefill, timeout=10, message="the gateway to learn the first prefill's blocks")
    before = {p.url: metric(p.url, "vllm:prefix_cache_hits_total") for p in vllm_fleet.prefill}
    for i in range(6):
        greedy(client, system + f"Question number {i}?", 2)
    gained = {url: metric(url, "vllm:prefix_cache_hits_total") - before[url] for url in before}
    holder = max(gained, key=gained.get)
    assert holder == first.url  # the instance that computed the prefix first
    prefix_tokens = len(system) // 8  # lower bound on the shared tokens per request
    assert gained[holder] >= 6 * prefix_tokens
    assert all(v == 0 for url, v in gained.items() if url != holder)


def test_bad_inputs_get_openai_errors(vllm_fleet):
    url = vllm_fleet.gateway.url

    async def post(body: bytes, path: str = "/v1/completions") -> tuple[int, dict, dict]:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + path, data=body, headers={"Content-Type": "application/json"}) as r:
                return r.status, await r.json(), dict(r.headers)

    cases = [
        (b"{nope", 400, "not valid JSON"),
        (b'{"model": "sim-model", "prompt": 42}', 400, "prompt"),
        (b'{"model": "sim-model", "prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
        (b'{"model": "other", "prompt": "x"}', 404, "does not exist"),
        (b'{"model": "sim-model", "prompt": "x", "max_tokens": 5000}', 400, "maximum context length"),
        (b'{"model": "sim-model", "prompt": "x", "n": 2}', 400, "n=1"),
        (b'{"model": "sim-model", "prompt": "x", "priority": "high"}', 400, "priority"),
        (b'{"model": "sim-model", "prompt": "x", "stream": "yes"}', 400, "stream"),  # a boolean, not "yes"
        (b'{"model": "sim-model", "prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400, "nested too deeply"),
    ]
    for body, status, fragment in cases:
        got, payload, _ = asyncio.run(post(body))
        assert got == status, (body, payload)
        assert fragment in payload["error"]["message"] and set(payload["error"]) >= {"message", "type", "param", "code"}
    got, payload, _ = asyncio.run(post(b'{"model": "sim-model", "messages": []}', "/v1/chat/completions"))
    assert got == 400 and "messages" in payload["error"]["message"]


def test_client_disconnect_aborts_both_legs_and_inflight_returns_to_zero(vllm_fleet):
    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
            async with s.post(vllm_fleet.gateway.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                await r.content.readline()
                await r.content.readline()
                running = sum(get_json(d.url + "/sim/state")["num_running"] for d in vllm_fleet.decode)
                assert running == 1
                # headers and first tokens are out, the decode lease is still held until the stream ends
                assert metric(vllm_fleet.gateway.url, "pdgate_instance_inflight_requests") == 1

    asyncio.run(main())

    def nothing_left() -> bool:
        inflight = metric(vllm_fleet.gateway.url, "pdgate_instance_inflight_requests")
        running = sum(get_json(e.url + "/sim/state")["num_running"] for e in vllm_fleet.engines)
        return inflight == 0 and running == 0

    wait_until(nothing_left, timeout=5, message="no request in flight on the gateway or running on an engine")
    assert sum(metric(d.url, "vllm:request_success_total", finished_reason="abort") for d in vllm_fleet.decode) >= 1
