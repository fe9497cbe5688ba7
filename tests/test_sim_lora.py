"""LoRA adapters, cache_salt and the prefix-caching hash algorithms on the simulated engine, as vLLM 0.32 has them.

Real engine processes on loopback (``--enable-lora``, ``--lora-modules``, runtime load/unload with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``, ``--prefix-caching-hash-algo``); their KV events are read
with plain zmq + msgpack and their hashes compared with :mod:`pdgate.common.block_hash`, whose
vectors are vLLM's own (tests/test_block_hash_algos.py). A few in-process tests cover the step
loop's ``--max-loras`` rule and the flag parsing.
"""

from __future__ import annotations

import itertools
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from support.fleet import call, metric
from support.procs import PdgateProcess
from support.waiting import wait_until

from pdgate.common.block_hash import LoraAdapter, PrefixHasher, block_hashes, request_keys, to_event_hash
from pdgate.common.kv_events import VLLM_032_SCHEMA, BlockStored, decode_batch, encode_batch
from pdgate.engines.sim.config import LoraModule, SimEngineConfig, parse_lora_module

BLOCK = 16
FLAGS = ("--num-gpu-blocks", "200", "--max-model-len", "2048", "--served-model-name", "base")
RUNTIME = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}


def complete(engine: PdgateProcess, prompt: list[int], model: str = "base", **extra: Any) -> dict:
    status, body = call(
        f"{engine.url}/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, **extra},
    )
    assert status == 200, body
    return body


def cached_tokens(reply: dict) -> int:
    details = reply["usage"]["prompt_tokens_details"]
    return details["cached_tokens"] if details else 0


def prompt(seed: int, blocks: int = 3) -> list[int]:
    """Token ids of ``blocks`` full blocks and a partial one, unique per seed."""
    return [100 + (seed * 131 + i * 7) % 5000 for i in range(blocks * BLOCK + 5)]


class Events:
    """A SUB socket on a sim's KV events; :meth:`stored` returns the BlockStored events since the last call."""

    def __init__(self, engine: PdgateProcess) -> None:
        self.engine = engine
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        publisher, _ = engine.kv_events  # tcp://0.0.0.0:PORT, bound by the engine
        self.sub.connect(publisher.replace("0.0.0.0", "127.0.0.1"))
        warm = itertools.count()

        def live() -> bool:  # a subscription reaches the PUB asynchronously: until a batch arrives
            complete(engine, [9000 + next(warm) * 20 + i for i in range(BLOCK)])
            return bool(self._receive(0.3))

        wait_until(live, timeout=10, interval=0, message="a first KV event batch")
        self._receive(0.3)

    def _receive(self, quiet_s: float) -> list[dict]:
        events: list[dict] = []
        while self.sub.poll(int(quiet_s * 1000)):
            _, _, payload = self.sub.recv_multipart()
            events += msgpack.unpackb(payload, raw=False)[1]
        return events

    def stored(self, expect: int) -> list[dict]:
        """Wait for ``expect`` BlockStored events (and any more that follow at once)."""
        got: list[dict] = []

        def enough() -> bool:
            got.extend(e for e in self._receive(0.1) if e["type"] == "BlockStored")
            return len(got) >= expect

        wait_until(enough, timeout=10, interval=0, message=f"{expect} BlockStored events")
        return got

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def adapter_dirs(tmp_path: Path) -> dict[str, str]:
    """Two local adapter directories (a simulated adapter has no weights: the path must only exist)."""
    out = {}
    for name in ("sql", "chat"):
        (tmp_path / name).mkdir()
        out[name] = str(tmp_path / name)
    return out


def test_adapters_are_listed_and_served_by_name(sim_factory, adapter_dirs):
    engine = sim_factory("--enable-lora", "--lora-modules", f"sql={adapter_dirs['sql']}", "hub=org/adapter", *FLAGS)
    status, models = call(f"{engine.url}/v1/models")
    assert status == 200
    cards = {m["id"]: m for m in models["data"]}
    assert list(cards) == ["base", "sql", "hub"]
    assert (cards["sql"]["root"], cards["sql"]["parent"], cards["sql"]["max_model_len"]) == (
        adapter_dirs["sql"],
        "base",
        None,
    )
    assert cards["hub"]["root"] == "org/adapter" and cards["base"]["max_model_len"] == 2048
    reply = complete(engine, prompt(1), model="sql")
    assert reply["model"] == "sql"  # vLLM answers with the adapter's name
    status, error = call(f"{engine.url}/v1/completions", {"model": "nope", "prompt": "hi", "max_tokens": 1})
    assert status == 404
    assert error["error"] == {
        "message": "The model `nope` does not exist. Valid aliases: base.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    # without the environment switch vLLM has no runtime routes
    assert call(f"{engine.url}/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x"})[0] == 404


def test_runtime_load_and_unload_answer_as_vllm(sim_factory, adapter_dirs):
    engine = sim_factory("--enable-lora", *FLAGS, env=RUNTIME)
    load, unload = f"{engine.url}/v1/load_lora_adapter", f"{engine.url}/v1/unload_lora_adapter"
    assert call(load, {"lora_name": "chat", "lora_path": adapter_dirs["chat"]}) == (
        200,
        "Success: LoRA adapter 'chat' added successfully.",
    )
    status, again = call(load, {"lora_name": "chat", "lora_path": adapter_dirs["chat"]})
    assert status == 400 and again["error"]["type"] == "InvalidUserInput"
    assert "has already been loaded" in again["error"]["message"]
    assert call(load, {"lora_name": "base", "lora_path": adapter_dirs["sql"]})[1]["error"]["message"] == (
        "The lora adapter 'base' conflicts with a served base model."
    )
    assert call(load, {"lora_name": "", "lora_path": "/x"})[0] == 400
    status, missing = call(load, {"lora_name": "gone", "lora_path": "/nonexistent/adapter"})
    assert status == 404 and missing["error"]["message"].startswith("Loading lora gone failed: No adapter found")
    assert [m["id"] for m in call(f"{engine.url}/v1/models")[1]["data"]] == ["base", "chat"]
    assert complete(engine, prompt(2), model="chat")["model"] == "chat"

    assert call(unload, {"lora_name": "chat"}) == (200, "Success: LoRA adapter 'chat' removed successfully.")
    status, gone = call(unload, {"lora_name": "chat"})
    assert (status, gone["error"]["message"]) == (404, "The lora adapter 'chat' cannot be found.")
    assert call(f"{engine.url}/v1/completions", {"model": "chat", "prompt": [1, 2], "max_tokens": 1})[0] == 404
    assert [m["id"] for m in call(f"{engine.url}/v1/models")[1]["data"]] == ["base"]


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor", "xxhash_cbor"])
def test_kv_events_carry_the_adapter_and_our_hashes(sim_factory, adapter_dirs, algo):
    """Each request's BlockStored hashes equal block_hash's chain with its adapter and salt, for the
    engine's algorithm; the events carry lora_id, lora_name and the untagged extra keys as vLLM's do."""
    env = {}
    if algo.startswith("xxhash"):
        pytest.importorskip("xxhash", reason="the xxhash algorithms need pdgate[xxhash]")
        env["PYTHONHASHSEED"] = "7"  # else vLLM (and the sim) seed xxhash at random per process
    sql = LoraAdapter("sql", adapter_dirs["sql"])
    engine = sim_factory(
        "--enable-lora",
        "--lora-modules",
        f"sql={sql.path}",
        "--prefix-caching-hash-algo",
        algo,
        "--kv-events-endpoint",
        "tcp://*:*",
        *FLAGS,
        env=env or None,
    )
    events = Events(engine)
    try:
        tokens = prompt(3)
        cases = [("base", None, None), ("sql", sql, None), ("sql", sql, "tenant"), ("base", None, "tenant")]
        for model, lora, salt in cases:
            complete(engine, tokens, model=model, **({"cache_salt": salt} if salt else {}))
            (event,) = events.stored(1)
            expected = block_hashes(
                tokens, BLOCK, algo=algo, seed=env.get("PYTHONHASHSEED"), lora=lora, cache_salt=salt
            )
            assert event["block_hashes"] == [to_event_hash(h) for h in expected], (model, salt)
            assert event["parent_block_hash"] is None
            assert (event["lora_id"], event["lora_name"]) == ((1, "sql") if lora else (None, None))
            first = [x for x in ("sql" if lora else None, salt) if x] or None
            rest = ["sql"] if lora else None
            assert event["extra_keys"] == [first, rest, rest]
            decoded, _ = decode_batch(msgpack.packb([0.0, [event], 0]))
            assert decoded == [
                BlockStored(tuple(event["block_hashes"]), None, lora_id=event["lora_id"], lora_name=event["lora_name"])
            ]
    finally:
        events.close()
    assert f'prefix_caching_hash_algo="{algo}"' in urllib.request.urlopen(f"{engine.url}/metrics").read().decode()


def test_prefix_cache_hits_count_only_blocks_of_the_same_adapter_and_salt(sim_factory, adapter_dirs):
    engine = sim_factory(
        "--enable-lora",
        "--max-loras",
        "2",
        "--lora-modules",
        f"sql={adapter_dirs['sql']}",
        "--time-scale",
        "50",
        *FLAGS,
    )
    tokens = prompt(4)
    full = 3 * BLOCK
    hits_before = metric(engine.url, "vllm:prefix_cache_hits_total")
    sent = [
        ("base", None, 0),
        ("base", None, full),  # the same prompt again: every full block
        ("sql", None, 0),  # the adapter's blocks are not the base model's
        ("sql", None, full),
        ("sql", "t1", 0),  # nor are a salted request's
        ("sql", "t1", full),
        ("sql", "t2", 0),
        ("base", "t1", 0),  # the salt keys only the first block, but every later block chains on it
    ]
    for model, salt, expect in sent:
        reply = complete(engine, tokens, model=model, **({"cache_salt": salt} if salt else {}))
        assert cached_tokens(reply) == expect, (model, salt)
    assert metric(engine.url, "vllm:prefix_cache_hits_total") - hits_before == 3 * full
    status, error = call(f"{engine.url}/v1/completions", {"prompt": tokens, "max_tokens": 1, "cache_salt": "a/b"})
    assert status == 400 and error["error"]["param"] == "cache_salt"
    assert "must not contain '@', '/'" in error["error"]["message"]


def test_lora_flags_are_checked_at_start(tmp_path):
    from support.procs import start_sim

    with pytest.raises(RuntimeError, match="--lora-modules needs --enable-lora"):
        start_sim("--lora-modules", f"a={tmp_path}", timeout=20)
    with pytest.raises(RuntimeError, match="No adapter found"):
        start_sim("--enable-lora", "--lora-modules", "a=/nonexistent/adapter", timeout=20)


# ------------------------------------------------------------------ in-process


@pytest.mark.unit
def test_lora_module_entries_parse_as_vllm_parses_them():
    assert parse_lora_module("a=/x=y") == LoraModule("a", "/x=y")
    assert parse_lora_module('{"name": "a", "path": "/p", "base_model_name": "m"}') == LoraModule("a", "/p", "m")
    for bad in ("{not json", '{"name": "a"}', '{"name": "a", "path": "/p", "rank": 8}'):
        with pytest.raises(ValueError, match="--lora-modules"):
            parse_lora_module(bad)
    config = SimEngineConfig(enable_lora=True, lora_modules=["a=/p", "b=/q"], prefix_caching_hash_algo="sha256_cbor")
    assert [m.name for m in config.static_lora_modules()] == ["a", "b"]
    with pytest.raises(ValueError, match="vLLM API only"):
        SimEngineConfig(enable_lora=True, api="sglang")


@pytest.mark.unit
def test_decoded_events_keep_the_adapter_in_both_event_forms():
    mapped = {
        "type": "BlockStored",
        "block_hashes": [5],
        "parent_block_hash": None,
        "token_ids": [1] * BLOCK,
        "block_size": BLOCK,
        "lora_id": 3,
        "medium": "GPU",
        "lora_name": "sql",
        "extra_keys": [["sql"]],
    }
    legacy = ["BlockStored", [6], 5, [1] * BLOCK, BLOCK, 3, "GPU", "sql"]
    events, skipped = decode_batch(msgpack.packb([0.0, [mapped, legacy, legacy[:6]], 0]))
    assert skipped == 0
    assert [(e.lora_id, e.lora_name) for e in events if isinstance(e, BlockStored)] == [
        (3, "sql"),
        (3, "sql"),
        (3, None),
    ]
    with pytest.raises(ValueError, match="lora_name"):
        decode_batch(msgpack.packb([0.0, [{**mapped, "lora_name": 7}], 0]))
    # vLLM 0.32's struct layout: session_id is a field of its BlockStored
    stored = BlockStored([1], None, [1], 1, lora_id=2, lora_name="sql", session_id="s")
    (raw,) = msgpack.unpackb(encode_batch(0.0, [stored], schema=VLLM_032_SCHEMA))[1]
    assert (raw["lora_id"], raw["lora_name"], raw["session_id"]) == (2, "sql", "s")


@pytest.mark.unit
def test_list_flags_take_several_values():
    import argparse

    from pdgate.engines.flags import add_model_flags, model_from_args

    parser = argparse.ArgumentParser()
    add_model_flags(parser, SimEngineConfig)
    args = parser.parse_args(["--enable-lora", "--lora-modules", "a=/p", "b=/q", "--max-loras", "3"])
    config = model_from_args(SimEngineConfig, args, None)
    assert (config.lora_modules, config.max_loras, config.prefix_caching_hash_algo) == (["a=/p", "b=/q"], 3, "sha256")
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefix-caching-hash-algo", "md5"])


@pytest.mark.unit
def test_max_loras_keeps_a_third_adapter_waiting_until_a_slot_frees():
    """vLLM's scheduler: a waiting request whose adapter is not in the batch waits while max_loras are."""
    from pdgate.common.perf_model import resolve_profile
    from pdgate.engines.sim.core import CoreConfig, EngineCore
    from pdgate.engines.sim.generation import LengthModel, TokenGenerator
    from pdgate.engines.sim.kv_cache import KVCacheManager
    from pdgate.engines.sim.request import SamplingParams, SimRequest

    core = EngineCore(
        CoreConfig(max_loras=2),
        KVCacheManager(64, BLOCK),
        resolve_profile("h100-llama-3-8b"),
        TokenGenerator(list(range(10, 1000)), 2, LengthModel()),
    )
    requests = []
    for i, lora_id in enumerate((1, 2, 3, None, 1)):
        keys = request_keys(lora=None if lora_id is None else LoraAdapter(f"a{lora_id}", f"/a{lora_id}"))
        req = SimRequest(f"r{i}", prompt(i, 1), SamplingParams(max_tokens=3, ignore_eos=True), 0.0, block_keys=keys)
        req.lora_id = lora_id
        core.add_request(req)
        requests.append(req)
    step = core.schedule(0.0)
    assert [r.request_id for r, _ in step.entries] == ["r0", "r1", "r3", "r4"]  # r2's adapter would be a third
    core.abort("r1", 0.0)  # adapter 2 leaves the batch: adapter 3 fits
    assert [r.request_id for r, _ in core.schedule(0.0).entries] == ["r0", "r3", "r4", "r2"]
    # an adapter request's chain is block_hash's with its key
    expected = PrefixHasher.create().block_hashes(requests[2].prompt_token_ids, BLOCK, requests[2].block_keys)
    assert requests[2].block_hashes == expected
    assert expected != PrefixHasher.create().block_hashes(requests[2].prompt_token_ids, BLOCK)
