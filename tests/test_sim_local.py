"""The simulated engine called in-process (``call_local``): no sockets, no HTTP, engines on one loop.

Engines run on a :class:`LoopClock` and reach each other through a :class:`LocalPeerLink`; most
tests run on the virtual-time loop of ``pdgate simulate`` (:func:`run_virtual`), where the
modelled step and transfer times take no wall time and a seeded run is deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pdgate.common.virtual_time import run_virtual
from pdgate.engines.sim.build import build_state
from pdgate.engines.sim.config import SimEngineConfig
from pdgate.engines.sim.engine import LoopClock
from pdgate.engines.sim.local import call_local, close_local
from pdgate.engines.sim.peers import LocalPeerLink
from pdgate.engines.sim.reply import MemoryReply
from pdgate.engines.sim.request import SamplingParams, SimRequest
from pdgate.engines.sim.routes_info import METRICS_CONTENT_TYPE
from pdgate.engines.sim.state import SimState

HOST = "127.0.0.1"
MODEL = "sim-model"
PROMPT = "In the beginning the universe was created. This has made a lot of people very angry. " * 6
GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}


class Fleet:
    """In-process engines on the running loop, each known by ``(host, port)`` to the others."""

    def __init__(self) -> None:
        self.by_address: dict[tuple[str, int], SimState] = {}
        self.states: list[SimState] = []
        self.link = LocalPeerLink(self.find)

    def find(self, host: str, port: int) -> SimState | None:
        return self.by_address.get((host, port))

    async def add(self, port: int, **settings: Any) -> SimState:
        settings.setdefault("engine_id", f"engine-{port}")
        config = SimEngineConfig(host=HOST, port=port, served_model_name=MODEL, max_model_len=4096, **settings)
        state = build_state(config, clock=LoopClock())
        assert state.bound_port == port  # what its peers and kv_transfer_params name it by
        state.peers = self.link
        self.by_address[(HOST, port)] = state
        boot = config.resolved_bootstrap_port()
        if boot is not None:  # an SGLang prefill: its decode peers come to the bootstrap port
            self.by_address[(HOST, boot)] = state
        self.states.append(state)
        await state.engine.start()
        return state

    async def close(self) -> None:
        for state in self.states:
            await close_local(state)


@contextlib.asynccontextmanager
async def fleet() -> AsyncIterator[Fleet]:
    engines = Fleet()
    try:
        yield engines
    finally:
        await engines.close()


async def call(
    state: SimState, method: str, path: str, body: Any = b"", headers: dict[str, str] | None = None
) -> MemoryReply:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = MemoryReply()
    await call_local(state, method, path, headers or {}, data, reply)
    return reply


def events(reply: MemoryReply) -> list[Any]:
    """The SSE events written so far: parsed JSON objects, and the string ``"[DONE]"``."""
    out: list[Any] = []
    for piece in reply.chunks:
        assert piece.startswith(b"data: ") and piece.endswith(b"\n\n"), piece
        data = piece[6:-2]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def streamed_tokens(reply: MemoryReply) -> list[int]:
    return [t for e in events(reply) if isinstance(e, dict) for c in e.get("choices", []) for t in c["token_ids"] or []]


async def poll(condition: Callable[[], Any], what: str, limit: int = 200_000) -> None:
    """Poll ``condition`` on the loop (1 ms turns: loop time, virtual or not)."""
    for _ in range(limit):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- one engine
@pytest.mark.unit
async def test_streamed_completion_on_an_ordinary_loop() -> None:
    async with fleet() as engines:
        engine = await engines.add(31001)
        body = {"prompt": PROMPT, "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True}}
        reply = await call(engine, "POST", "/v1/completions", {**body, **GREEDY}, {"x-request-id": "local-1"})
        assert reply.status == 200 and reply.streamed and reply.ended and reply.done.is_set()
        assert reply.headers["Content-Type"] == "text/event-stream" and reply.headers["X-Request-Id"] == "local-1"
        got = events(reply)
        assert got[-1] == "[DONE]" and reply.chunks[-1] == b"data: [DONE]\n\n"
        usage = got[-2]
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
        chunks = got[:-2]
        assert all(c["id"] == "local-1" and c["object"] == "text_completion" for c in chunks)
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
        full = await call(engine, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, **GREEDY})
        assert full.status == 200 and streamed_tokens(reply) == full.json_body()["choices"][0]["token_ids"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == full.json_body()["choices"][0]["text"]


@pytest.mark.unit
def test_chat_metrics_health_and_errors() -> None:
    async def main() -> None:
        async with fleet() as engines:
            engine = await engines.add(31011)
            chat = {"messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 9, **GREEDY}
            reply = await call(engine, "POST", "/v1/chat/completions", chat, {"X-REQUEST-ID": "chat-1"})
            answer = reply.json_body()
            assert reply.status == 200 and not reply.streamed and reply.headers == {"X-Request-Id": "chat-1"}
            assert answer["object"] == "chat.completion" and answer["id"] == "chat-1"
            assert answer["choices"][0]["message"]["role"] == "assistant" and answer["choices"][0]["message"]["content"]
            assert answer["usage"]["completion_tokens"] == 9 and len(answer["choices"][0]["token_ids"]) == 9

            metrics = await call(engine, "GET", "/metrics")
            assert metrics.status == 200 and metrics.content_type == METRICS_CONTENT_TYPE
            text = metrics.body.decode()
            assert "vllm:num_requests_running" in text and "vllm:generation_tokens_total" in text
            assert (await call(engine, "GET", "/health")).status == 200
            assert (await call(engine, "GET", "/metrics?name=x")).status == 200  # a query string is ignored

            missing = await call(engine, "GET", "/v1/nothing")
            assert missing.status == 404 and missing.json_body()["error"]["code"] == 404
            wrong = await call(engine, "GET", "/v1/completions")
            assert wrong.status == 405 and wrong.json_body()["error"]["code"] == 405
            bad = await call(engine, "POST", "/v1/completions", b"{not json")
            assert bad.status == 400 and "not valid JSON" in bad.json_body()["error"]["message"]
            bad_model = await call(engine, "POST", "/v1/completions", {"prompt": "x", "model": "other"})
            assert bad_model.status == 404 and bad_model.json_body()["error"]["param"] == "model"

    run_virtual(main())


@pytest.mark.unit
def test_api_key_is_checked_before_the_body() -> None:
    async def main() -> None:
        async with fleet() as engines:
            engine = await engines.add(31021, api="sglang", api_key="secret")
            refused = await call(engine, "POST", "/v1/completions", b"{not json")
            assert refused.status == 401 and refused.json_body()["object"] == "error"  # SGLang's error shape
            bad = await call(engine, "POST", "/v1/completions", b"{not json", {"authorization": "Bearer secret"})
            assert bad.status == 400
            ok = await call(
                engine, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3}, {"authorization": "Bearer secret"}
            )
            assert ok.status == 200 and ok.json_body()["usage"]["completion_tokens"] <= 3

    run_virtual(main())


@pytest.mark.unit
def test_cancelling_the_call_mid_stream_aborts_the_request() -> None:
    async def main() -> None:
        async with fleet() as engines:
            engine = await engines.add(31031)
            reply = MemoryReply()
            body = {"prompt": PROMPT, "max_tokens": 400, "stream": True, **GREEDY}
            task = asyncio.create_task(
                call_local(engine, "POST", "/v1/completions", {}, json.dumps(body).encode(), reply)
            )
            await poll(lambda: len(reply.chunks) >= 4, "a few streamed tokens")
            assert engine.core.has_unfinished()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not reply.ended and not reply.done.is_set()
            assert not engine.core.has_unfinished() and engine.core.kv.usage == 0.0
            assert not engine.migration.live
            assert "vllm:num_requests_running" in (await call(engine, "GET", "/metrics")).body.decode()

    run_virtual(main())


# ---------------------------------------------------------------- PD hand-off
@pytest.mark.unit
def test_vllm_pd_handoff_pulls_the_kv_in_the_modelled_transfer_time() -> None:
    request = {"prompt": PROMPT, "max_tokens": 16, **GREEDY}
    prefill_leg = {**request, "max_tokens": 1, "min_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    slow_link = {"kv_link_bandwidth_gbps": 0.5, "kv_link_latency_ms": 200.0}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with fleet() as engines:
            prefill = await engines.add(32001, role="prefill")
            fast = await engines.add(32002, role="decode")
            slow = await engines.add(32003, role="decode", **slow_link)
            single = await engines.add(32004)
            reference = (await call(single, "POST", "/v1/completions", request)).json_body()
            elapsed: dict[str, float] = {}
            for name, decode in (("fast", fast), ("slow", slow)):
                p = await call(prefill, "POST", "/v1/completions", prefill_leg)
                params = p.json_body()["kv_transfer_params"]
                assert p.status == 200 and params["do_remote_prefill"] and params["remote_block_ids"]
                assert (params["remote_host"], params["remote_port"]) == (HOST, 32001)
                assert params["remote_engine_id"] == "engine-32001"
                start = loop.time()
                d = await call(decode, "POST", "/v1/completions", {**request, "kv_transfer_params": params})
                elapsed[name] = loop.time() - start
                answer = d.json_body()
                assert d.status == 200 and answer["choices"][0]["token_ids"] == reference["choices"][0]["token_ids"]
                n_prompt = answer["usage"]["prompt_tokens"]
                assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1  # pulled, not computed
            assert not prefill.core.held and prefill.core.kv.usage == 0.0  # the pulls released the held blocks

            def transfer(state: SimState) -> float:
                cfg = state.config
                nbytes = (n_prompt - 1) * state.profile.kv_bytes_per_token
                return cfg.kv_link_latency_ms / 1000 + nbytes / (cfg.kv_link_bandwidth_gbps * 1e9)

            assert elapsed["slow"] >= transfer(slow) > 0.2
            # the same steps on both decode engines: they differ by the transfer times alone
            assert elapsed["slow"] - elapsed["fast"] == pytest.approx(transfer(slow) - transfer(fast), abs=1e-6)

    run_virtual(main())


@pytest.mark.unit
def test_vllm_pd_pull_from_a_missing_peer_fails_the_decode_leg() -> None:
    async def main() -> None:
        async with fleet() as engines:
            decode = await engines.add(32101, role="decode")
            params = {
                "do_remote_prefill": True,
                "remote_block_ids": [1, 2],
                "remote_engine_id": "gone",
                "remote_request_id": "r",
                "remote_host": HOST,
                "remote_port": 32199,  # nothing there
            }
            body = {"prompt": PROMPT, "max_tokens": 4, "kv_transfer_params": params, **GREEDY}
            d = await call(decode, "POST", "/v1/completions", body)
            assert d.status == 500 and "KV" in d.json_body()["error"]["message"]
            assert not decode.core.has_unfinished()

    run_virtual(main())


@pytest.mark.unit
def test_sglang_pd_pair_sent_concurrently() -> None:
    request = {"prompt": PROMPT, "max_tokens": 12, **GREEDY}
    pd = {**request, "bootstrap_host": HOST, "bootstrap_port": 32290, "bootstrap_room": 4242}

    async def main() -> None:
        async with fleet() as engines:
            prefill = await engines.add(32201, api="sglang", role="prefill", bootstrap_port=32290)
            decode = await engines.add(32202, api="sglang", role="decode")
            single = await engines.add(32203, api="sglang")
            p, d = await asyncio.gather(
                call(prefill, "POST", "/v1/completions", pd),
                call(decode, "POST", "/v1/completions", {**pd, "stream": True}),
            )
            assert p.status == 200 and p.json_body()["usage"]["completion_tokens"] == 1
            assert d.status == 200 and events(d)[-1] == "[DONE]"
            reference = (await call(single, "POST", "/v1/completions", request)).json_body()
            assert streamed_tokens(d) == reference["choices"][0]["token_ids"]
            assert not prefill.core.held and not prefill.handoffs
            refused = await call(decode, "POST", "/v1/completions", request)  # no room: SGLang refuses
            assert refused.status == 400 and refused.json_body()["object"] == "error"

    run_virtual(main())


# ---------------------------------------------------------------- live migration
@pytest.mark.unit
def test_live_migration_between_in_process_engines() -> None:
    request = {"prompt": PROMPT, "max_tokens": 60, **GREEDY}

    async def main() -> None:
        async with fleet() as engines:
            source = await engines.add(33001)
            target = await engines.add(33002)
            reference = (await call(target, "POST", "/v1/completions", request)).json_body()["choices"][0]["token_ids"]
            reply = MemoryReply()
            body = json.dumps({**request, "stream": True}).encode()
            stream = asyncio.create_task(
                call_local(source, "POST", "/v1/completions", {"X-Request-Id": "mig-1"}, body, reply)
            )
            await poll(lambda: len(streamed_tokens(reply)) >= 8, "8 streamed tokens")
            nowhere = {"request_id": "mig-1", "target": {"host": HOST, "port": 33099}}
            failed = await call(source, "POST", "/sim/migrate", nowhere)
            assert failed.status == 502 and "reserve" in failed.json_body()["error"]["message"]
            moved = await call(
                source, "POST", "/sim/migrate", {"request_id": "mig-1", "target": {"host": HOST, "port": 33002}}
            )
            result = moved.json_body()
            assert moved.status == 200 and result["migrated"] is True, result
            await stream
            assert reply.ended and "[DONE]" not in events(reply)  # a migrated stream ends without [DONE]
            head = streamed_tokens(reply)
            assert head == result["output_token_ids"]
            prompt_ids = events(reply)[0]["choices"][0]["prompt_token_ids"]
            rest = {
                **GREEDY,
                "prompt": prompt_ids + head,
                "max_tokens": 60 - len(head),
                "kv_transfer_params": result["kv_transfer_params"],
            }
            tail = await call(target, "POST", "/v1/completions", rest)
            assert tail.status == 200
            assert head + tail.json_body()["choices"][0]["token_ids"] == reference
            assert not source.core.held and not target.migration.reservations
            outcomes = [(r["direction"], r["outcome"]) for r in target.migration.records]
            assert outcomes == [("in", "migrated")]

    run_virtual(main())


# ---------------------------------------------------------------- determinism
async def sampled_run(seed: int) -> dict[str, Any]:
    """Sampled requests (no seed, no request id) on two engines and a PD pair, all at once."""
    async with fleet() as engines:
        a = await engines.add(34001, seed=seed)
        b = await engines.add(34002, seed=seed)
        prefill = await engines.add(34003, seed=seed, role="prefill")
        decode = await engines.add(34004, seed=seed, role="decode")

        async def sampled(state: SimState, i: int) -> list[Any]:
            body = {"prompt": f"Question {i}: {PROMPT[: 30 + 9 * i]}", "max_tokens": 10, "return_token_ids": True}
            answer = (await call(state, "POST", "/v1/completions", body)).json_body()
            return [answer["id"], answer["choices"][0]["token_ids"]]

        async def pd(i: int) -> list[Any]:
            body = {"prompt": f"PD {i}: {PROMPT}", "max_tokens": 10, "temperature": 0.8, "return_token_ids": True}
            leg = {**body, "max_tokens": 1, "min_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
            params = (await call(prefill, "POST", "/v1/completions", leg)).json_body()["kv_transfer_params"]
            answer = (await call(decode, "POST", "/v1/completions", {**body, "kv_transfer_params": params})).json_body()
            return [params["remote_request_id"], answer["id"], answer["choices"][0]["token_ids"]]

        async def unseeded() -> list[Any]:  # straight to the engine: the core seeds it from the request id
            req = SimRequest("direct-1", list(range(100, 140)), SamplingParams(max_tokens=8, ignore_eos=True), 0.0)
            return [t async for output in a.engine.submit(req) for t in output.new_token_ids]

        runs = await asyncio.gather(
            *(sampled(a, i) for i in range(4)),
            *(sampled(b, i) for i in range(4)),
            *(pd(i) for i in range(3)),
            unseeded(),
        )
        loop_time = asyncio.get_running_loop().time()
        return {"a": runs[:4], "b": runs[4:8], "pd": runs[8:11], "direct": runs[11], "end": loop_time}


@pytest.mark.unit
def test_a_seeded_virtual_run_is_deterministic() -> None:
    first, second = run_virtual(sampled_run(7)), run_virtual(sampled_run(7))
    assert first == second
    assert [t for _, t in first["a"]] != [t for _, t in first["b"]]  # two engines draw different seeds
    assert run_virtual(sampled_run(8))["a"] != first["a"]


def test_the_run_does_not_depend_on_the_process_hash_seed() -> None:
    """``hash()`` of a str is salted per process: nothing the engine decides may depend on it."""
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from pdgate.common.virtual_time import run_virtual; from test_sim_local import sampled_run;"
        "print(json.dumps(run_virtual(sampled_run(7))))"
    )
    tests = str(Path(__file__).parent)
    outputs = [
        subprocess.run(
            [sys.executable, "-c", script, tests],
            env={**os.environ, "PYTHONHASHSEED": salt},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        for salt in ("1", "2")
    ]
    assert outputs[0] == outputs[1] and json.loads(outputs[0]) == json.loads(json.dumps(run_virtual(sampled_run(7))))
