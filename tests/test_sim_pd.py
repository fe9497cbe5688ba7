"""Prefill-decode hand-off between two simulated engine processes, in both engines' protocols."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import pytest
from support.fleet import engine_flags, metric

PROMPT = "In the beginning the universe was created. This has made a lot of people very angry. " * 6


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def stream_tokens(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[int]:
    import json

    tokens: list[int] = []
    async with session.post(url, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    tokens.extend(chunk["choices"][0]["token_ids"])
    return tokens


def test_vllm_flavour_nixl_flow_gives_identical_greedy_output(sim_factory):
    prefill = sim_factory(*engine_flags("prefill"))
    decode = sim_factory(*engine_flags("decode"))
    single = sim_factory(*engine_flags("both"))
    request = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "return_token_ids": True}

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            status, p = await post(
                s,
                f"{prefill.url}/v1/completions",
                {**request, "max_tokens": 1, "min_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
            )
            assert status == 200
            params = p["kv_transfer_params"]
            assert params["do_remote_prefill"] is True and params["remote_block_ids"]
            assert {"remote_engine_id", "remote_request_id", "remote_host", "remote_port", "tp_size"} <= params.keys()
            status, d = await post(s, f"{decode.url}/v1/completions", {**request, "kv_transfer_params": params})
            assert status == 200
            _, ref = await post(s, f"{single.url}/v1/completions", request)
            assert d["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
            assert d["usage"]["prompt_tokens_details"]["cached_tokens"] == d["usage"]["prompt_tokens"] - 1
            # streamed decode leg, a prompt the decode has no prefix of (all but its last token pulled)
            other = {**request, "prompt": "Other: " + PROMPT}
            _, p2 = await post(
                s,
                f"{prefill.url}/v1/completions",
                {**other, "max_tokens": 1, "min_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
            )
            streamed = await stream_tokens(
                s, f"{decode.url}/v1/completions", {**other, "kv_transfer_params": p2["kv_transfer_params"]}
            )
            _, ref2 = await post(s, f"{single.url}/v1/completions", other)
            assert streamed == ref2["choices"][0]["token_ids"]
            # the same prompt again: the decode's own prefix cache covers most of it, only the rest is pulled
            _, p3 = await post(
                s,
                f"{prefill.url}/v1/completions",
                {**request, "max_tokens": 1, "min_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
            )
            _, d3 = await post(
                s, f"{decode.url}/v1/completions", {**request, "kv_transfer_params": p3["kv_transfer_params"]}
            )
            assert d3["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
            return d["usage"]["prompt_tokens"], ref2["usage"]["prompt_tokens"]

    n1, n2 = asyncio.run(main())
    local_hit = (n1 - 1) // 16 * 16
    by_source = lambda src: metric(decode.url, "vllm:prompt_tokens_by_source_total", source=src)
    assert by_source("external_kv_transfer") == (n1 - 1) + (n2 - 1) + (n1 - 1 - local_hit)
    assert by_source("local_cache_hit") == local_hit
    assert by_source("local_compute") == 3  # only the last prompt token of each request was recomputed
    assert metric(prefill.url, "vllm:kv_cache_usage_perc") == 0.0  # held blocks released after the pulls


def test_vllm_flavour_pull_failure_follows_the_policy(sim_factory):
    prefill = sim_factory(*engine_flags("prefill"))
    strict = sim_factory(*engine_flags("decode", extra=("--kv-load-failure-policy", "fail")))
    lenient = sim_factory(*engine_flags("decode", extra=("--kv-load-failure-policy", "recompute")))
    request = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            _, p = await post(
                s,
                f"{prefill.url}/v1/completions",
                {**request, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
            )
            params = p["kv_transfer_params"]
            prefill.kill()  # the prefill dies before the decode pulls
            status, body = await post(s, f"{strict.url}/v1/completions", {**request, "kv_transfer_params": params})
            assert status == 500 and "KV" in body["error"]["message"]
            status, body = await post(s, f"{lenient.url}/v1/completions", {**request, "kv_transfer_params": params})
            assert status == 200 and body["usage"]["completion_tokens"] == 8

    asyncio.run(main())
    assert metric(lenient.url, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == 0


def test_sglang_flavour_bootstrap_flow_dispatches_both_legs_at_once(sim_factory):
    prefill = sim_factory(*engine_flags("prefill", "sglang"))  # --bootstrap-port 0: it binds a free one
    decode = sim_factory(*engine_flags("decode", "sglang"))
    single = sim_factory(*engine_flags("both", "sglang"))
    boot = prefill.bootstrap_port
    room = random.getrandbits(63)
    request = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    pd = {**request, "bootstrap_host": "127.0.0.1", "bootstrap_port": boot, "bootstrap_room": room}

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            (ps, p), decoded = await asyncio.gather(
                post(s, f"{prefill.url}/v1/completions", pd),
                stream_tokens(s, f"{decode.url}/v1/completions", pd),
            )
            assert ps == 200 and p["usage"]["completion_tokens"] == 1 and p["choices"][0]["finish_reason"] == "length"
            _, ref = await post(s, f"{single.url}/v1/completions", request)
            assert decoded == ref["choices"][0]["token_ids"]
            status, err = await post(s, f"{decode.url}/v1/completions", request)  # no room: SGLang refuses
            assert status == 400 and err["object"] == "error"

    asyncio.run(main())
    assert metric(decode.url, "sglang:cached_tokens_total") == metric(decode.url, "sglang:prompt_tokens_total") - 1
    assert metric(prefill.url, "sglang:num_used_tokens") == 0


@pytest.mark.parametrize("api", ["vllm", "sglang"])
def test_concurrent_pd_requests_all_match_single_engine(sim_factory, api):
    prefill = sim_factory(*engine_flags("prefill", api))  # SGLang: --bootstrap-port 0, reported
    decode = sim_factory(*engine_flags("decode", api))
    single = sim_factory(*engine_flags("both", api))
    boot = prefill.bootstrap_port if api == "sglang" else None

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        request = {
            "prompt": f"Question {i}: " + PROMPT[: 40 + 7 * i],
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        if api == "vllm":
            _, p = await post(
                s,
                f"{prefill.url}/v1/completions",
                {**request, "max_tokens": 1, "min_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
            )
            _, d = await post(
                s, f"{decode.url}/v1/completions", {**request, "kv_transfer_params": p["kv_transfer_params"]}
            )
        else:
            pd = {
                **request,
                "bootstrap_host": "127.0.0.1",
                "bootstrap_port": boot,
                "bootstrap_room": random.getrandbits(63),
            }
            _, (_, d) = await asyncio.gather(
                post(s, f"{prefill.url}/v1/completions", pd), post(s, f"{decode.url}/v1/completions", pd)
            )
        _, ref = await post(s, f"{single.url}/v1/completions", request)
        assert d["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            await asyncio.gather(*(one(s, i) for i in range(12)))

    asyncio.run(main())
