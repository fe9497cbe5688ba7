"""Live migration of a decoding request between two simulated engine processes (Llumnix-style).

The engines run in real time (``time_scale`` 1: a decode step of the default profile is ~8 ms),
so a request is still decoding when the test asks for its migration after a few tokens.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from support.fleet import metric
from support.procs import free_port
from support.waiting import wait_until_async

PROMPT = "In the beginning the universe was created. This has made a lot of people very angry. " * 12
SLOW = {"time_scale": 1.0}


async def post(s: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    kwargs = {"data": body} if isinstance(body, str) else {"json": body}
    async with s.post(url, headers=headers, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def get(s: aiohttp.ClientSession, url: str) -> Any:
    async with s.get(url) as resp:
        assert resp.status == 200
        return await resp.json()


class StreamReader:
    """Reads one SSE generation stream in the background, counting token events."""

    def __init__(self, s: aiohttp.ClientSession, url: str, body: dict[str, Any], request_id: str | None = None) -> None:
        self.tokens: list[int] = []
        self.prompt_ids: list[int] | None = None
        self.finish_reasons: list[str] = []
        self.done = False
        self.usage = False
        self.status: int | None = None
        self._want = 0
        self._reached = asyncio.Event()
        headers = {"X-Request-Id": request_id} if request_id else None
        self.task = asyncio.create_task(self._read(s, url, {**body, "stream": True}, headers))

    async def _read(
        self, s: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None
    ) -> None:
        async with s.post(url, json=body, headers=headers) as resp:
            self.status = resp.status
            async for line in resp.content:
                if line.strip() == b"data: [DONE]":
                    self.done = True
                elif line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("prompt_token_ids"):  # chat: the head chunk
                        self.prompt_ids = chunk["prompt_token_ids"]
                    if chunk.get("usage") and not chunk.get("choices"):
                        self.usage = True
                    for choice in chunk.get("choices", []):
                        if choice.get("prompt_token_ids"):
                            self.prompt_ids = choice["prompt_token_ids"]
                        self.tokens.extend(choice.get("token_ids") or [])
                        if choice.get("finish_reason"):
                            self.finish_reasons.append(choice["finish_reason"])
                    if self._want and len(self.tokens) >= self._want:
                        self._reached.set()
        self._reached.set()

    async def wait_tokens(self, k: int) -> None:
        self._want = k
        if len(self.tokens) >= k:
            return
        await asyncio.wait_for(self._reached.wait(), 10)
        assert len(self.tokens) >= k, f"the stream ended after {len(self.tokens)} tokens"

    async def finish(self) -> None:
        await asyncio.wait_for(self.task, 20)


async def wait_state(s: aiohttp.ClientSession, url: str, ready: Any, timeout: float = 10.0) -> Any:
    """Poll ``/sim/state`` until ``ready(state)``; that state."""

    async def reached() -> Any:
        state = await get(s, f"{url}/sim/state")
        return state if ready(state) else None

    return await wait_until_async(reached, timeout, interval=0.005, message=f"{url}/sim/state to reach {ready}")


async def wait_decoded(url: str, tokens: int) -> None:
    """Wait until the engine's requests have decoded ``tokens`` tokens after their first (a non-streamed one too)."""

    async def decoded() -> bool:
        return await asyncio.to_thread(metric, url, "vllm:inter_token_latency_seconds_count") >= tokens

    await wait_until_async(decoded, interval=0.005, message=f"{tokens} tokens decoded on {url}")


def continuation(prompt_ids: list[int], result: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """What the gateway sends the target: prompt + output so far, the remaining budget, the KV params."""
    n = result["num_output_tokens"]
    body = {k: v for k, v in original.items() if k not in ("prompt", "messages", "max_tokens", "min_tokens", "stream")}
    body.update(
        prompt=prompt_ids + result["output_token_ids"],
        max_tokens=original["max_tokens"] - n,
        min_tokens=max(0, original.get("min_tokens", 0) - n),
        kv_transfer_params=result["kv_transfer_params"],
    )
    return body


def migrate_body(target_url: str, request_id: str, **extra: Any) -> dict[str, Any]:
    host, port = target_url.removeprefix("http://").rsplit(":", 1)
    return {"request_id": request_id, "target": {"host": host, "port": int(port)}, **extra}


def test_streamed_completion_migrates_mid_stream_and_continues_identically(sim_factory):
    a = sim_factory(**SLOW)
    b = sim_factory(**SLOW)
    request = {
        "prompt": PROMPT,
        "max_tokens": 80,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            src = StreamReader(s, f"{a.url}/v1/completions", request, "mig-1")
            await src.wait_tokens(10)
            status, result = await post(s, f"{a.url}/sim/migrate", migrate_body(b.url, "mig-1"))
            assert status == 200, result
            await src.finish()
            n = result["num_output_tokens"]
            assert result["migrated"] is True and result["request_id"] == "mig-1"
            assert n >= 10 and src.tokens == result["output_token_ids"] and len(src.tokens) == n
            assert not src.done and not src.finish_reasons and not src.usage  # no [DONE], finish or usage chunk
            assert src.prompt_ids is not None and result["num_prompt_tokens"] == len(src.prompt_ids)
            assert len(result["stages"]) >= 1 and result["stages"][0]["blocks"] >= len(src.prompt_ids) // 16
            assert 0 < result["downtime_s"] < sum(st["seconds"] for st in result["stages"])
            assert result["downtime_wall_s"] > 0
            params = result["kv_transfer_params"]
            assert params["migration"] is True and params["do_remote_prefill"] is True and params["reservation_id"]
            assert params["remote_port"] == int(a.url.rsplit(":", 1)[1]) and params["remote_block_ids"]
            state_b = await get(s, f"{b.url}/sim/state")
            assert state_b["migration_reservations"] == 1

            dst = StreamReader(s, f"{b.url}/v1/completions", continuation(src.prompt_ids, result, request), "mig-1")
            await dst.finish()
            assert dst.done and dst.finish_reasons == ["length"] and len(dst.tokens) == 80 - n
            status, ref = await post(
                s, f"{a.url}/v1/completions", {k: v for k, v in request.items() if k != "stream_options"}
            )
            assert status == 200
            assert src.tokens + dst.tokens == ref["choices"][0]["token_ids"]

            out = [m for m in (await get(s, f"{a.url}/sim/migrations"))["migrations"] if m["request_id"] == "mig-1"]
            inn = [m for m in (await get(s, f"{b.url}/sim/migrations"))["migrations"] if m["request_id"] == "mig-1"]
            assert [(m["direction"], m["outcome"]) for m in out] == [("out", "migrated")]
            assert [(m["direction"], m["outcome"]) for m in inn] == [("in", "migrated")]
            assert out[0]["num_output_tokens"] == inn[0]["num_output_tokens"] == n
            assert out[0]["downtime_s"] == inn[0]["downtime_s"] == result["downtime_s"]
            assert out[0]["target"] == b.url.removeprefix("http://") and inn[0]["source"] == a.url.removeprefix(
                "http://"
            )
            state_a, state_b = await get(s, f"{a.url}/sim/state"), await get(s, f"{b.url}/sim/state")
            assert state_a["held_kv"] == [] and state_a["kv_cache_usage"] == 0.0  # the target pulled the held KV
            assert state_b["migration_reservations"] == 0 and state_b["kv_cache_usage"] == 0.0

    asyncio.run(main())
    assert metric(a.url, "sim_migrations_total", direction="out", outcome="migrated") == 1
    assert metric(b.url, "sim_migrations_total", direction="in", outcome="migrated") == 1
    assert metric(a.url, "sim_migration_downtime_seconds_count") == 1
    # the target computed only the last sampled token itself; the rest came with the migrated KV
    assert metric(b.url, "vllm:prompt_tokens_by_source_total", source="local_compute") == 1


def test_chat_request_migrates_with_eos_and_min_tokens_intact(sim_factory):
    a = sim_factory("--output-len-median", "60", **SLOW)
    b = sim_factory("--output-len-median", "60", "--role", "decode", **SLOW)
    chat = {
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPT[:300]}],
        "max_tokens": 200,
        "min_tokens": 30,
        "temperature": 0,
        "return_token_ids": True,
    }

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            src = StreamReader(s, f"{a.url}/v1/chat/completions", chat, "chat-1")
            await src.wait_tokens(10)
            status, result = await post(s, f"{a.url}/sim/migrate", migrate_body(b.url, "chat-1"))
            assert status == 200, result
            await src.finish()
            n = result["num_output_tokens"]
            assert src.tokens == result["output_token_ids"] and not src.done and not src.finish_reasons
            assert n < 30  # min_tokens still binds on the target
            dst = StreamReader(s, f"{b.url}/v1/completions", continuation(src.prompt_ids, result, chat), "chat-1")
            await dst.finish()
            _, ref = await post(s, f"{a.url}/v1/chat/completions", chat)
            assert src.tokens + dst.tokens == ref["choices"][0]["token_ids"]
            assert dst.finish_reasons == [ref["choices"][0]["finish_reason"]] == ["stop"]  # an EOS after min_tokens

    asyncio.run(main())


def test_non_streamed_request_over_a_slow_link_copies_in_stages(sim_factory):
    a = sim_factory("--kv-link-bandwidth-gbps", "0.2", **SLOW)  # ~10 ms per 16-token block
    b = sim_factory(**SLOW)
    request = {"prompt": PROMPT, "max_tokens": 120, "temperature": 0, "ignore_eos": True, "return_token_ids": True}

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            headers = {"X-Request-Id": "slow-1"}
            source = asyncio.create_task(post(s, f"{a.url}/v1/completions", request, headers))
            await wait_decoded(a.url, 12)  # past the prefill, a dozen tokens decoded
            body = migrate_body(b.url, "slow-1", stop_copy_blocks=0, max_stages=6)
            first = asyncio.create_task(post(s, f"{a.url}/sim/migrate", body))
            # the first is copying its stage 1 (~0.25 s) now: it reserved its blocks on the target
            await wait_state(s, b.url, lambda st: st["migration_reservations"] == 1)
            second = asyncio.create_task(post(s, f"{a.url}/sim/migrate", body))
            (status, result), (status2, err) = sorted(await asyncio.gather(first, second), key=lambda r: r[0])
            assert status == 200, result
            assert status2 == 409 and "already being migrated" in err["error"]["message"]
            status, src = await source
            assert status == 200
            n = result["num_output_tokens"]
            choice = src["choices"][0]
            assert choice["finish_reason"] == "migrated" and choice["token_ids"] == result["output_token_ids"]
            assert src["usage"]["completion_tokens"] == n
            stages = result["stages"]
            assert 2 <= len(stages) <= 6 and stages[0]["blocks"] >= 10
            assert all(st["blocks"] > 0 for st in stages[1:])
            assert result["downtime_s"] < stages[0]["seconds"]
            prompt_ids = src["choices"][0]["prompt_token_ids"]
            status, dst = await post(s, f"{b.url}/v1/completions", continuation(prompt_ids, result, request))
            assert status == 200 and dst["choices"][0]["finish_reason"] == "length"
            _, ref = await post(s, f"{a.url}/v1/completions", request)
            assert choice["token_ids"] + dst["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]

    asyncio.run(main())


def test_failed_reservation_leaves_the_request_untouched(sim_factory):
    a = sim_factory(**SLOW)
    prefill = sim_factory("--role", "prefill", **SLOW)
    request = {"prompt": PROMPT, "max_tokens": 60, "temperature": 0, "ignore_eos": True, "return_token_ids": True}

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            src = StreamReader(s, f"{a.url}/v1/completions", request, "stay-1")
            await src.wait_tokens(8)
            status, err = await post(
                s, f"{a.url}/sim/migrate", migrate_body(f"http://127.0.0.1:{free_port()}", "stay-1")
            )
            assert status == 502 and "reserve" in err["error"]["message"]
            status, err = await post(s, f"{a.url}/sim/migrate", migrate_body(prefill.url, "stay-1"))
            assert status == 502 and "503" in err["error"]["message"]
            await src.finish()
            assert src.done and src.finish_reasons == ["length"]
            _, ref = await post(s, f"{a.url}/v1/completions", request)
            assert src.tokens == ref["choices"][0]["token_ids"]
            records = (await get(s, f"{a.url}/sim/migrations"))["migrations"]
            assert [(m["request_id"], m["outcome"]) for m in records] == [("stay-1", "failed")] * 2
            # the target side of a reservation, directly
            status, err = await post(s, f"{a.url}/sim/migrate/reserve", {"num_blocks": 10**7})
            assert status == 409
            status, res = await post(s, f"{a.url}/sim/migrate/reserve", {"num_blocks": 3, "request_id": "x"})
            assert (
                status == 200
                and (await get(s, f"{a.url}/sim/state"))["num_free_blocks"]
                == (await get(s, f"{a.url}/sim/state"))["num_blocks"] - 3
            )
            status, rel = await post(s, f"{a.url}/sim/migrate/release", {"reservation_id": res["reservation_id"]})
            assert status == 200 and rel == {"released": True}
            assert (await get(s, f"{a.url}/sim/state"))["kv_cache_usage"] == 0.0

    asyncio.run(main())


def test_migrate_refuses_unknown_waiting_prefill_leg_and_bad_requests(sim_factory):
    a = sim_factory("--max-num-seqs", "1", "--api-key", "k", **SLOW)
    auth = {"Authorization": "Bearer k"}
    long = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "ignore_eos": True, "return_token_ids": True}

    async def main() -> None:
        async with aiohttp.ClientSession(headers=auth) as s:
            target = migrate_body("http://127.0.0.1:9", "x")["target"]
            leg = StreamReader(
                s, f"{a.url}/v1/completions", {**long, "kv_transfer_params": {"do_remote_decode": True}}, "leg"
            )
            await leg.wait_tokens(3)
            waiting = StreamReader(s, f"{a.url}/v1/completions", long, "queued")  # max_num_seqs 1: it waits
            await wait_state(s, a.url, lambda st: st["num_waiting"] == 1)
            for rid, words in (("leg", "prefill leg"), ("queued", "not decoding")):
                status, err = await post(s, f"{a.url}/sim/migrate", {"request_id": rid, "target": target})
                assert status == 409 and words in err["error"]["message"], err
            status, err = await post(s, f"{a.url}/sim/migrate", {"request_id": "nobody", "target": target})
            assert status == 404
            for body in (
                "not json",
                [],
                {"target": target},
                {"request_id": "leg"},
                {"request_id": "leg", "target": {"host": "h"}},
                {"request_id": "leg", "target": target, "max_stages": 0},
                {"request_id": "leg", "target": target, "stop_copy_blocks": -1},
            ):
                status, err = await post(s, f"{a.url}/sim/migrate", body)
                assert status == 400, (body, err)
            async with aiohttp.ClientSession() as anonymous:
                status, _ = await post(anonymous, f"{a.url}/sim/migrate", {"request_id": "leg", "target": target})
                assert status == 401
            for reader in (leg, waiting):
                reader.task.cancel()
            await asyncio.gather(leg.task, waiting.task, return_exceptions=True)
        assert (await get_state(a.url))["migrations_in_flight"] == 0

    async def get_state(url: str) -> Any:
        async with aiohttp.ClientSession() as s:
            return await get(s, f"{url}/sim/state")

    asyncio.run(main())


def test_sglang_flavour_migrates_to_a_decode_server(sim_factory):
    a = sim_factory("--api", "sglang", "--output-len-median", "40", **SLOW)
    b = sim_factory("--api", "sglang", "--role", "decode", "--output-len-median", "40", **SLOW)
    # a prompt shorter than the 16 tokens that fix a conversation's natural length: the target must
    # draw that length from the original prompt, not from prompt + output
    request = {"prompt": "Hi", "max_tokens": 150, "min_tokens": 25, "temperature": 0, "return_token_ids": True}

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            src = StreamReader(s, f"{a.url}/v1/completions", request, "sg-1")
            await src.wait_tokens(10)  # with this prompt, a length drawn from prompt + output differs for n >= 10
            status, result = await post(s, f"{a.url}/sim/migrate", migrate_body(b.url, "sg-1"))
            assert status == 200, result
            await src.finish()
            assert src.tokens == result["output_token_ids"] and not src.done
            assert len(src.prompt_ids) < 16
            cont = continuation(src.prompt_ids, result, request)
            dst = StreamReader(s, f"{b.url}/v1/completions", cont, "sg-1")
            await dst.finish()
            _, ref = await post(s, f"{a.url}/v1/completions", request)
            assert src.tokens + dst.tokens == ref["choices"][0]["token_ids"]
            assert dst.finish_reasons == [ref["choices"][0]["finish_reason"]] == ["stop"]  # an EOS after min_tokens
            # the same continuation again: the hold is gone, so the pull fails like a failed PD pull
            status, err = await post(s, f"{b.url}/v1/completions", cont)
            assert status == 500 and err["object"] == "error" and "KV" in err["message"]
            records = (await get(s, f"{b.url}/sim/migrations"))["migrations"]
            assert [m["outcome"] for m in records if m["direction"] == "in"] == ["migrated", "failed"]
            status, err = await post(s, f"{a.url}/sim/migrate", migrate_body(b.url, "sg-1"))
            assert status == 404 and err["object"] == "error"

    asyncio.run(main())
