"""A subscriber written for real vLLM (plain zmq + msgpack, hashes recomputed by hand) reads the sim,
in both of vLLM's topologies; and two gateway processes both learn one engine's blocks from its events."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import re
import time
import urllib.request
from collections.abc import Callable

import msgpack
import pytest
import zmq
from support.fleet import MODEL, engine_flags, instance_entry, metric, start_gateway, write_config
from support.procs import PdgateProcess, free_port
from support.waiting import wait_until

BLOCK = 16
SIM_FLAGS = ("--num-gpu-blocks", "130", "--max-model-len", "2048")


def vllm_chain(tokens: list[int], block_size: int) -> list[int]:
    """vLLM's published block hashes, recomputed independently of the project's code."""
    parent = hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=pickle.HIGHEST_PROTOCOL)).digest()
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hashlib.sha256(
            pickle.dumps((parent, tuple(tokens[start : start + block_size]), None), protocol=pickle.HIGHEST_PROTOCOL)
        ).digest()
        out.append(int.from_bytes(parent, "big") & (2**64 - 1))
    return out


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))


def receive(sub: zmq.Socket, until: float) -> list[tuple[bytes, int, list]]:
    batches = []
    while time.monotonic() < until:
        if sub.poll(100):
            topic, seq, payload = sub.recv_multipart()
            batches.append((topic, int.from_bytes(seq, "big"), msgpack.unpackb(payload, raw=False)))
        elif batches:
            break
    return batches


def fresh_blocks(engine: PdgateProcess, counter: itertools.count) -> None:
    """A prompt of never-seen token ids, sent to the engine itself: it publishes a new BlockStored batch."""
    start = 50_000 + 100 * next(counter)
    post(f"{engine.url}/v1/completions", {"prompt": list(range(start, start + 2 * BLOCK)), "max_tokens": 1})


def start_subscribed(
    sub: zmq.Socket, sim_factory: Callable[..., PdgateProcess], engine_binds: bool
) -> tuple[PdgateProcess, str]:
    """A sim publishing KV events to the SUB socket ``sub``; returns (engine, replay address).

    ``engine_binds``: the sim gets ``tcp://*:*`` (vLLM binds a '*' endpoint, on a free port here) and
    the SUB connects to it, as every gateway replica does; else the SUB binds a concrete address
    that the sim connects to (vLLM's rule for an endpoint without '*'). Returns once a batch arrived.
    """
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    if engine_binds:
        engine = sim_factory(
            "--kv-events-endpoint", "tcp://*:*", "--kv-events-replay-endpoint", "tcp://*:*", *SIM_FLAGS
        )
        publisher, replay = engine.kv_events  # what it bound: tcp://0.0.0.0:PORT
        assert publisher.startswith("tcp://0.0.0.0:") and replay is not None
        engine.reported(re.compile(r"KV events -> .* \(bound: gateways connect\)"))
        sub.connect(publisher.replace("0.0.0.0", "127.0.0.1"))
        replay = replay.replace("0.0.0.0", "127.0.0.1")
    else:
        pub_port, replay_port = free_port(), free_port()
        sub.bind(f"tcp://127.0.0.1:{pub_port}")
        replay = f"tcp://127.0.0.1:{replay_port}"
        engine = sim_factory(
            "--kv-events-endpoint", f"tcp://127.0.0.1:{pub_port}", "--kv-events-replay-endpoint", replay, *SIM_FLAGS
        )
        engine.reported(re.compile(r"KV events -> .* \(connected: one gateway binds it\)"))
    counter = itertools.count()

    def live() -> bool:  # a subscription reaches the PUB asynchronously: wait for a first batch
        fresh_blocks(engine, counter)
        return bool(receive(sub, time.monotonic() + 0.3))

    wait_until(live, timeout=10, interval=0, message="a first KV event batch")
    receive(sub, time.monotonic() + 0.3)  # drain what is left of the warm-up
    return engine, replay


@pytest.mark.parametrize("engine_binds", [True, False], ids=["engine-binds", "gateway-binds"])
def test_kv_events_match_vllm_format_and_prompt_hashes(sim_factory, monkeypatch, engine_binds):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        engine, replay_address = start_subscribed(sub, sim_factory, engine_binds)
        prompts = []
        for i in range(3):
            result = post(
                f"{engine.url}/v1/completions",
                {
                    "prompt": f"Tenant {i} system prompt. " + "Rules and context for the assistant. " * 8,
                    "max_tokens": 1,
                    "temperature": 0,
                    "return_token_ids": True,
                },
            )
            prompts.append(result["choices"][0]["prompt_token_ids"])
        batches = receive(sub, time.monotonic() + 5)
        assert batches, f"no KV events received; engine said:\n{engine.log}"
        assert all(topic == b"kv" for topic, _, _ in batches)
        seqs = [seq for _, seq, _ in batches]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        stored: list[int] = []
        for _, _, payload in batches:
            ts, events, dp_rank = payload
            assert isinstance(ts, float) and dp_rank == 0
            for event in events:
                assert event["type"] == "BlockStored"
                assert list(event)[:8] == [
                    "type",
                    "block_hashes",
                    "parent_block_hash",
                    "token_ids",
                    "block_size",
                    "lora_id",
                    "medium",
                    "lora_name",
                ]
                assert event["block_size"] == BLOCK and event["medium"] == "GPU"
                assert len(event["token_ids"]) == BLOCK * len(event["block_hashes"])
                stored.extend(event["block_hashes"])
        expected = [h for p in prompts for h in vllm_chain(p, BLOCK)]
        assert stored == expected  # every full prompt block, in order, with vLLM's hashes

        # replay: a DEALER asks for everything from the first sequence number
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(replay_address)
        dealer.send_multipart([b"", seqs[0].to_bytes(8, "big")])
        replayed = []
        while dealer.poll(2000):
            _, seq, payload = dealer.recv_multipart()
            if seq == b"\xff" * 8:
                break
            replayed.append(int.from_bytes(seq, "big"))
        dealer.close(linger=0)
        assert replayed == seqs

        # eviction: a long unrelated prompt forces cached blocks out -> BlockRemoved
        post(
            f"{engine.url}/v1/completions",
            {"prompt": list(range(1000, 1000 + 2000)), "max_tokens": 1, "temperature": 0},
        )
        removed = [
            h
            for _, _, (_, events, _) in receive(sub, time.monotonic() + 5)
            for e in events
            if e["type"] == "BlockRemoved"
            for h in e["block_hashes"]
        ]
        assert set(removed) & set(expected)
        reset = urllib.request.Request(f"{engine.url}/reset_prefix_cache", data=b"", method="POST")
        assert urllib.request.urlopen(reset).status == 200
        cleared = [e for _, _, (_, events, _) in receive(sub, time.monotonic() + 5) for e in events]
        assert {"type": "AllBlocksCleared"} in cleared
    finally:
        ctx.destroy(linger=0)  # every socket, the dealer too when an assertion stopped the test early


def test_two_gateways_both_learn_one_engines_blocks_from_its_kv_events(sim_factory, tmp_path):
    """The shipped topology: the engine binds tcp://*:PORT, two `pdgate serve` processes connect to it.

    The prompt goes to the engine directly, so neither gateway sent it anywhere: a gateway that
    expects its blocks on the engine (a prefix hit, from its exact index) learned them from KV events.
    """
    engine = sim_factory(*engine_flags("both", kv_events=True))
    entry = instance_entry(engine, "both", "sim")
    assert entry["kv_events"]["endpoint"].startswith("tcp://*:")  # the engine binds, gateways connect
    config = write_config(tmp_path / "gateway.yaml", [entry])
    gateways: list[PdgateProcess] = []
    try:
        gateways = [start_gateway(config) for _ in range(2)]  # the second could not start if it had to bind
        prompt = "One engine, two gateways: both follow its KV cache events. " * 6
        sent = post(f"{engine.url}/v1/completions", {"prompt": prompt, "max_tokens": 1, "return_token_ids": True})
        full_blocks = len(sent["choices"][0]["prompt_token_ids"]) // BLOCK
        assert full_blocks >= 4
        counter = itertools.count()

        def hit_tokens(gateway: PdgateProcess) -> Callable[[], float]:
            def probe() -> float:
                fresh_blocks(engine, counter)  # a later batch: a gateway that missed one asks for a replay
                post(f"{gateway.url}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1})
                return metric(gateway.url, "pdgate_prefix_cache_hit_tokens_total", instance=entry["id"])

            return probe

        for gateway in gateways:
            hits = wait_until(
                hit_tokens(gateway), timeout=15, interval=0.1, message=lambda g=gateway: f"a prefix hit\n{g.log}"
            )
            assert hits == full_blocks * BLOCK  # every full block of the prompt, from the events alone
    finally:
        for gateway in gateways:
            gateway.stop()
