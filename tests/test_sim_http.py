"""The simulated engine through its HTTP API, with the official openai client."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from support.fleet import metric
from support.waiting import wait_until

MODEL = "sim-model"


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def state(url: str) -> dict:
    import urllib.request

    return json.load(urllib.request.urlopen(f"{url}/sim/state"))


def test_models_lists_the_served_model_with_context_length(sim_engine):
    models = client(sim_engine.url).models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == 2048


def test_completion_non_streamed_with_token_ids_and_usage(sim_engine):
    c = client(sim_engine.url)
    r = c.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=12,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and len(choice.model_extra["token_ids"]) == 12
    assert r.usage.prompt_tokens == len(choice.model_extra["prompt_token_ids"])
    assert choice.text  # real text from the built-in tokenizer
    again = c.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=12,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert again.choices[0].text == choice.text  # greedy is deterministic


def test_prompt_as_token_ids_equals_prompt_as_text(sim_engine):
    c = client(sim_engine.url)
    text = c.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=8,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    ids = text.choices[0].model_extra["prompt_token_ids"]
    by_ids = c.completions.create(
        model=MODEL, prompt=ids, max_tokens=8, temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True}
    )
    assert by_ids.choices[0].model_extra["token_ids"] == text.choices[0].model_extra["token_ids"]


def test_streamed_chat_matches_non_streamed_and_reports_usage(sim_engine):
    c = client(sim_engine.url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers."}]
    full = c.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_cached_tokens_reported_on_a_repeated_long_prompt(sim_engine):
    c = client(sim_engine.url)
    prompt = "A long shared system prompt about astronomy and stars. " * 12
    c.completions.create(model=MODEL, prompt=prompt + "First?", max_tokens=2, temperature=0)
    r = c.completions.create(model=MODEL, prompt=prompt + "Second?", max_tokens=2, temperature=0)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached >= r.usage.prompt_tokens - 32 and cached % 16 == 0


def test_stop_string_truncates_output_and_sets_stop_reason(sim_engine):
    c = client(sim_engine.url)
    base = c.completions.create(
        model=MODEL, prompt="Stop test", max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    text = base.choices[0].text
    stop = text[10:13]
    cut = c.completions.create(
        model=MODEL, prompt="Stop test", max_tokens=30, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].model_extra["stop_reason"] == stop
    streamed = c.completions.create(
        model=MODEL,
        prompt="Stop test",
        max_tokens=30,
        temperature=0,
        stop=[stop],
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(ch.choices[0].text for ch in streamed) == cut.choices[0].text


def test_async_client_concurrent_streams(sim_engine):
    async def main() -> list[str]:
        c = openai.AsyncOpenAI(base_url=f"{sim_engine.url}/v1", api_key="unused", max_retries=0)

        async def one(i: int) -> str:
            stream = await c.completions.create(
                model=MODEL,
                prompt=f"Request {i}",
                max_tokens=10,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            return "".join([ch.choices[0].text async for ch in stream])

        try:
            return await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await c.close()

    texts = asyncio.run(main())
    assert len(set(texts)) == 8 and all(texts)


@pytest.mark.parametrize(
    "kwargs, status, fragment",
    [
        ({"n": 2}, 400, "n=1"),
        ({"logprobs": 2}, 400, "logprobs"),
        ({"model": "no-such-model"}, 404, "does not exist"),
        ({"max_tokens": 5000}, 400, "maximum context length"),
        ({"extra_body": {"priority": 3}}, 400, "priority"),
        ({"temperature": -1}, 400, "temperature"),
    ],
)
def test_unsupported_or_invalid_parameters_get_clear_errors(sim_engine, kwargs, status, fragment):
    c = client(sim_engine.url)
    args = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        c.completions.create(**args)
    assert info.value.status_code == status
    assert fragment in info.value.body["message"]  # openai unwraps {"error": {...}}


def test_malformed_json_is_a_400_in_openai_shape(sim_engine):
    async def main() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"{sim_engine.url}/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"}
            ) as r:
                return r.status, await r.json()

    status, body = asyncio.run(main())
    assert status == 400 and body["error"]["code"] == 400 and "JSON" in body["error"]["message"]


def test_client_disconnect_aborts_and_frees_kv(sim_engine):
    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            body = {
                "model": MODEL,
                "prompt": "disconnect me " * 30,
                "max_tokens": 1500,
                "ignore_eos": True,
                "stream": True,
            }
            async with s.post(f"{sim_engine.url}/v1/completions", json=body) as r:
                await r.content.readline()
                await r.content.readline()
            # leaving the block closes the connection mid-stream

    before = metric(sim_engine.url, "vllm:request_success_total", finished_reason="abort")
    asyncio.run(main())

    def idle() -> dict | None:
        st = state(sim_engine.url)
        return st if st["num_running"] == 0 and st["num_waiting"] == 0 else None

    st = wait_until(idle, 5, message="the aborted request to leave the engine")
    assert st["kv_cache_usage"] == 0.0
    assert metric(sim_engine.url, "vllm:request_success_total", finished_reason="abort") == before + 1


def test_tokenize_detokenize_round_trip(sim_engine):
    import urllib.request

    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{sim_engine.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        return json.load(urllib.request.urlopen(req))

    tok = post("/tokenize", {"prompt": "Tokenize me, please!"})
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 2048
    assert post("/detokenize", {"tokens": tok["tokens"]})["prompt"] == "Tokenize me, please!"


def test_metrics_use_vllm_names_and_move(sim_engine):
    c = client(sim_engine.url)
    before = metric(sim_engine.url, "vllm:generation_tokens_total")
    c.completions.create(model=MODEL, prompt="count me", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert metric(sim_engine.url, "vllm:generation_tokens_total") == before + 7
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
    ):
        metric(sim_engine.url, name)  # parses
    assert metric(sim_engine.url, "vllm:time_to_first_token_seconds_count") >= 1
    assert metric(sim_engine.url, "vllm:prompt_tokens_by_source_total", source="local_compute") > 0
