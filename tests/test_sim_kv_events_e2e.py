"""A subscriber written for real vLLM (plain zmq + msgpack, hashes recomputed by hand) reads the sim."""

from __future__ import annotations

import hashlib
import json
import pickle
import time
import urllib.request

import msgpack
import zmq
from support.procs import free_port

BLOCK = 16


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


def test_kv_events_match_vllm_format_and_prompt_hashes(sim_factory, monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    pub_port, replay_port = free_port(), free_port()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(f"tcp://127.0.0.1:{pub_port}")  # vLLM's PUB connects to a concrete host: the subscriber binds
    try:
        engine = sim_factory(
            "--kv-events-endpoint",
            f"tcp://127.0.0.1:{pub_port}",
            "--kv-events-replay-endpoint",
            f"tcp://127.0.0.1:{replay_port}",
            "--num-gpu-blocks",
            "130",
            "--max-model-len",
            "2048",
        )
        # a bound SUB forwards its subscription to a newly connected PUB only when polled
        assert not sub.poll(300)
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
        dealer.connect(f"tcp://127.0.0.1:{replay_port}")
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
        sub.close(linger=0)
        ctx.term()
