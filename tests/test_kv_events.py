"""Wire-format tests: KV-event encoding (``pdgate.common.kv_events``), the sim's publisher, block hashing;
and one publisher that binds feeding several gateway subscribers (``pdgate.adapters.kv_events``).

The wire-format subscriber side is written independently with plain pyzmq + msgpack; it
never calls the publisher's encoding helpers.
"""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from support.ports import reserve_port
from support.waiting import wait_until_async

from pdgate.adapters.kv_events import KvEventSource, KvEventSubscriber, connect_address
from pdgate.common.block_hash import (
    NONE_HASH_SEED,
    BlockHasher,
    block_hashes,
    hash_block,
    none_hash,
    to_event_hash,
)
from pdgate.common.kv_events import (
    DEFAULT_SCHEMA,
    VLLM_EXTENDED_SCHEMA,
    VLLM_UPSTREAM_SCHEMA,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvCacheEvent,
    WireSchema,
    encode_batch,
)
from pdgate.engines.sim.kv_events import KvEventPublisher
from pdgate.scheduler.prefix_index import ExactPrefixIndex

pytestmark = pytest.mark.unit

RECV_TIMEOUT_S = 2.0
WAIT_S = 10.0
END_MARKER = b"\xff" * 8


# --------------------------------------------------------------------------- hashing


def _ref_sha256(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _ref_chain(tokens: list[int], bs: int, seed: str) -> list[bytes]:
    parent = _ref_sha256(seed)  # NONE_HASH
    out = []
    for i in range(len(tokens) // bs):
        parent = _ref_sha256((parent, tuple(tokens[i * bs : (i + 1) * bs]), None))
        out.append(parent)
    return out


@pytest.fixture(autouse=True)
def _no_hash_seed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)


def test_block_hashes_match_reference_chain() -> None:
    tokens = list(range(1000, 1000 + 37))  # 2 full blocks of 16 + 5 left over
    expected = _ref_chain(tokens, 16, "vllm-none-hash")
    got = block_hashes(tokens, 16)
    assert got == expected and len(got) == 2
    # First block's parent is NONE_HASH = sha256(pickle("vllm-none-hash")).
    assert none_hash() == _ref_sha256(NONE_HASH_SEED) == _ref_sha256("vllm-none-hash")
    assert hash_block(None, tokens[:16]) == expected[0]
    assert hash_block(none_hash(), tokens[:16]) == expected[0]
    assert hash_block(expected[0], tokens[16:32]) == expected[1]
    # Continuing a chain from an explicit parent.
    assert block_hashes(tokens[16:], 16, parent=expected[0]) == expected[1:]
    assert block_hashes(tokens[:15], 16) == []


def test_none_hash_seed_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = list(range(8))
    assert none_hash("abc") == _ref_sha256("abc")
    assert block_hashes(tokens, 4, seed="abc") == _ref_chain(tokens, 4, "abc")
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # vLLM: PYTHONHASHSEED replaces the seed
    assert none_hash() == _ref_sha256("0")
    assert block_hashes(tokens, 4) == _ref_chain(tokens, 4, "0")


def test_extra_keys_enter_the_hash() -> None:
    toks = [1, 2, 3, 4]
    expected = _ref_sha256((none_hash(), (1, 2, 3, 4), ("lora-a",)))
    assert hash_block(None, toks, ("lora-a",)) == expected
    assert hash_block(None, toks, ("lora-a",)) != hash_block(None, toks)


def test_to_event_hash_is_low_64_bits_big_endian() -> None:
    h = bytes(range(32))
    assert to_event_hash(h) == int.from_bytes(h[-8:], "big")
    assert to_event_hash(b"\xff" * 32) == 2**64 - 1


@pytest.mark.parametrize("chunks", [[37], [1] * 37, [5, 11, 16, 5], [16, 16, 5]])
def test_incremental_hasher_matches_batch(chunks: list[int]) -> None:
    tokens = list(range(500, 537))
    hasher = BlockHasher(16)
    produced: list[bytes] = []
    pos = 0
    for n in chunks:
        produced += hasher.extend(tokens[pos : pos + n])
        pos += n
    assert produced == hasher.hashes == block_hashes(tokens, 16)
    assert hasher.num_tokens == 37
    assert hasher.last_hash == produced[-1]
    assert hasher.append(0) is None


# --------------------------------------------------------------------------- encoding


def _decode(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def test_encoding_structure_and_field_order() -> None:
    stored = BlockStored([2**64 - 1, 7], None, [1, 2, 3, 4], 2, group_idx=0)
    payload = encode_batch(12.5, [stored, BlockRemoved([7]), AllBlocksCleared()], dp_rank=3)
    assert payload[:10] == b"\x93\xcb" + struct.pack(">d", 12.5)  # fixarray(3), float64 ts
    ts, events, rank = _decode(payload)
    assert (ts, rank) == (12.5, 3)
    assert [list(e) for e in events] == [
        [
            "type",
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "lora_name",
            "group_idx",
        ],
        ["type", "block_hashes", "medium"],
        ["type"],
    ]
    assert events[0] == {
        "type": "BlockStored",
        "block_hashes": [2**64 - 1, 7],
        "parent_block_hash": None,
        "token_ids": [1, 2, 3, 4],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "group_idx": 0,
    }
    assert events[1] == {"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU"}
    assert events[2] == {"type": "AllBlocksCleared"}
    assert _decode(encode_batch(1, [], dp_rank=None)) == [1.0, [], None]


def _vllm_structs(extended: bool) -> tuple[Any, ...]:
    """msgspec mirrors of vllm/distributed/kv_events.py (post vLLM PR #42892)."""
    msgspec = pytest.importorskip("msgspec")

    class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: int | None = None

    class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStoredV(KVCacheEvent, tag="BlockStored"):  # vllm-project/vllm @0181ea3
        block_hashes: list[int | bytes]
        parent_block_hash: int | bytes | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[tuple[Any, ...] | None] | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None

    class BlockRemovedV(KVCacheEvent, tag="BlockRemoved"):
        block_hashes: list[int | bytes]
        medium: str | None
        group_idx: int | None = None

    class BlockStoredX(BlockStoredV, tag="BlockStored"):  # newer tree
        locality: str | None = None
        ownership: str | None = None
        session_id: str | None = None
        skipped_parent_block_hash: int | bytes | None = None
        skipped_token_ids: list[int] | None = None
        skipped_extra_keys: list[tuple[Any, ...] | None] | None = None

    class BlockRemovedX(BlockRemovedV, tag="BlockRemoved"):
        locality: str | None = None
        ownership: str | None = None

    class AllBlocksClearedV(KVCacheEvent, tag="AllBlocksCleared"):
        pass

    stored, removed = (BlockStoredX, BlockRemovedX) if extended else (BlockStoredV, BlockRemovedV)
    # KVEventBatch as a decode type (a local class body cannot see `stored` under
    # postponed annotations, so spell the array-like batch as a tuple).
    batch_type = tuple[float, list[stored | removed | AllBlocksClearedV], int | None]
    return msgspec, EventBatch, batch_type, stored, removed, AllBlocksClearedV


def _sample_pairs(S: Any, R: Any, C: Any, extended: bool) -> tuple[list[Any], list[Any]]:
    """The same batch as our dataclasses and as the vLLM struct mirrors S/R/C."""
    hashes = [to_event_hash(h) for h in block_hashes(list(range(64)), 16)]
    extra: dict[str, Any] = dict(
        locality="LOCAL",
        ownership="t2",
        session_id="s",
        skipped_parent_block_hash=5,
        skipped_token_ids=[1],
        skipped_extra_keys=[None],
    )
    ours = [
        BlockStored(hashes[:2], None, list(range(32)), 16),
        BlockStored(
            hashes[2:],
            hashes[1],
            list(range(32, 64)),
            16,
            lora_id=3,
            lora_name="ad",
            extra_keys=[None, ("ad", ("mm", 4))],
            group_idx=0,
            kv_cache_spec_kind="full_attention",
            kv_cache_spec_sliding_window=128,
            **(extra if extended else {}),
        ),
        BlockStored([b"\x01" * 32], b"\x02" * 32, [9], 1, medium=None),
        BlockRemoved(hashes, group_idx=1, **(dict(locality="REMOTE") if extended else {})),
        BlockRemoved([1], medium="CPU"),
        AllBlocksCleared(),
    ]
    theirs = [
        S(hashes[:2], None, list(range(32)), 16, None, "GPU", None),
        S(
            hashes[2:],
            hashes[1],
            list(range(32, 64)),
            16,
            3,
            "GPU",
            "ad",
            [None, ("ad", ("mm", 4))],
            0,
            "full_attention",
            128,
            **(extra if extended else {}),
        ),
        S([b"\x01" * 32], b"\x02" * 32, [9], 1, None, None, None),
        R(hashes, "GPU", 1, **(dict(locality="REMOTE") if extended else {})),
        R([1], "CPU"),
        C(),
    ]
    return ours, theirs


@pytest.mark.parametrize(("schema", "extended"), [(VLLM_UPSTREAM_SCHEMA, False), (VLLM_EXTENDED_SCHEMA, True)])
def test_encoding_is_byte_identical_to_vllm_msgspec(schema: WireSchema, extended: bool) -> None:
    msgspec, EventBatch, batch_type, S, R, C = _vllm_structs(extended)
    ours, theirs = _sample_pairs(S, R, C, extended)
    enc = msgspec.msgpack.Encoder()
    ts = time.time()
    for rank in (0, 5, None):
        expected = enc.encode(EventBatch(ts, theirs, rank))
        assert encode_batch(ts, ours, rank, schema=schema) == expected
    assert encode_batch(ts, [], 0, schema=schema) == enc.encode(EventBatch(ts, [], 0))
    # A subscriber using vLLM's typed decoder reads our payload.
    ts2, events, rank = msgspec.msgpack.Decoder(batch_type).decode(encode_batch(ts, ours, 0, schema=schema))
    assert (ts2, rank) == (ts, 0)
    assert [type(e) for e in events] == [type(e) for e in theirs]
    # (msgspec turns the innermost extra_keys tuple, typed Any, into a list.)
    assert events[:1] + events[2:] == theirs[:1] + theirs[2:]


def test_default_schema_is_upstream_and_rejects_unknown_fields() -> None:
    assert DEFAULT_SCHEMA is VLLM_UPSTREAM_SCHEMA
    event = BlockStored([1], None, [1], 1, session_id="s")
    with pytest.raises(ValueError, match="session_id"):
        encode_batch(0.0, [event])
    _, events, _ = _decode(encode_batch(0.0, [event], schema=VLLM_EXTENDED_SCHEMA))
    assert events[0]["session_id"] == "s"


# --------------------------------------------------------------------------- ZMQ


async def _recv(sock: zmq.asyncio.Socket, timeout: float = RECV_TIMEOUT_S) -> list[bytes]:
    return await asyncio.wait_for(sock.recv_multipart(), timeout)


async def _until_connected(pub: KvEventPublisher, sub: zmq.asyncio.Socket) -> int:
    """Publish probe batches until one arrives (PUB drops until the link is up).

    Returns the seq of the probe received.
    """
    deadline = time.monotonic() + RECV_TIMEOUT_S
    while time.monotonic() < deadline:
        pub.publish(time.time(), [AllBlocksCleared()])
        if await sub.poll(50):
            frames = await sub.recv_multipart()
            while await sub.poll(20):  # drain late-arriving probes, keep the last
                frames = await sub.recv_multipart()
            return int.from_bytes(frames[1], "big")
    raise AssertionError("publisher never connected")


async def test_pub_connects_to_bound_sub_and_frames_match_vllm() -> None:
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    dealer = ctx.socket(zmq.DEALER)
    pub: KvEventPublisher | None = None
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
        sub.bind("tcp://127.0.0.1:*")
        sub_addr = sub.getsockopt_string(zmq.LAST_ENDPOINT)
        # Concrete host => vLLM's rule makes the PUB connect to our bound SUB.
        pub = KvEventPublisher(sub_addr, replay_endpoint="tcp://127.0.0.1:*", topic="kv-events")
        await pub.start()
        assert pub.pub_address == sub_addr
        last_probe = await _until_connected(pub, sub)

        tokens = list(range(100, 148))
        hs = [to_event_hash(h) for h in block_hashes(tokens, 16)]
        batches: list[tuple[float, list[KvCacheEvent]]] = [
            (1.25, [BlockStored(hs, None, tokens, 16)]),
            (2.5, [BlockRemoved(hs[1:]), BlockStored([hs[0]], None, tokens[:16], 16, lora_id=7)]),
            (3.75, [AllBlocksCleared()]),
        ]
        for ts, events in batches:
            pub.publish(ts, events)

        received = [await _recv(sub) for _ in batches]
        for i, frames in enumerate(received):
            assert len(frames) == 3
            topic, seq, payload = frames
            assert topic == b"kv-events"
            assert len(seq) == 8 and int.from_bytes(seq, "big") == last_probe + 1 + i

        ts, events, rank = _decode(received[0][2])
        assert (ts, rank) == (1.25, 0)
        assert events == [
            {
                "type": "BlockStored",
                "block_hashes": hs,
                "parent_block_hash": None,
                "token_ids": tokens,
                "block_size": 16,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
            }
        ]
        assert list(events[0]) == [
            "type",
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "lora_name",
        ]
        ts, events, rank = _decode(received[1][2])
        assert ts == 2.5
        assert events[0] == {"type": "BlockRemoved", "block_hashes": hs[1:], "medium": "GPU"}
        assert events[1]["type"] == "BlockStored" and events[1]["lora_id"] == 7
        assert _decode(received[2][2]) == [3.75, [{"type": "AllBlocksCleared"}], 0]

        # Replay from the first real batch: [b"", seq, payload]... then the end marker.
        replay_addr = pub.replay_address
        assert replay_addr is not None and not replay_addr.endswith(":*")
        dealer.connect(replay_addr)
        start = last_probe + 1
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        replayed = []
        while True:
            frames = await _recv(dealer)
            assert len(frames) == 3 and frames[0] == b""
            if frames[1] == END_MARKER:
                assert frames[2] == b""
                break
            replayed.append((int.from_bytes(frames[1], "big"), frames[2]))
        assert replayed == [(int.from_bytes(seq, "big"), payload) for _, seq, payload in received]

        # Replay from 0 also returns the probes the subscriber may have missed.
        await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        seqs = []
        while (frames := await _recv(dealer))[1] != END_MARKER:
            seqs.append(int.from_bytes(frames[1], "big"))
        assert seqs == list(range(last_probe + 1 + len(batches)))
    finally:
        if pub is not None:
            await pub.close()
        sub.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


async def test_wildcard_endpoint_binds_and_replay_buffer_is_bounded() -> None:
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    dealer = ctx.socket(zmq.DEALER)
    pub = KvEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", buffer_size=3)
    try:
        await pub.start()  # '*' => PUB binds, the subscriber connects
        addr = pub.pub_address
        assert addr is not None and not addr.endswith(":*")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(addr)
        first = await _until_connected(pub, sub)
        for i in range(5):
            pub.publish(float(i), [BlockRemoved([i])])
        got = [await _recv(sub) for _ in range(5)]
        assert [f[0] for f in got] == [b""] * 5  # empty topic frame
        last = int.from_bytes(got[-1][1], "big")
        assert last == first + 5

        dealer.connect(pub.replay_address or "")
        await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        seqs = []
        while (frames := await _recv(dealer))[1] != END_MARKER:
            seqs.append(int.from_bytes(frames[1], "big"))
        assert seqs == [last - 2, last - 1, last]  # only the newest buffer_size batches
        # Malformed request (extra frame) is ignored; a valid one still works.
        await dealer.send_multipart([b"", b"x", b"y"])
        await dealer.send_multipart([b"", (last + 1).to_bytes(8, "big")])
        assert await _recv(dealer) == [b"", END_MARKER, b""]
    finally:
        await pub.close()
        sub.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


async def test_publish_requires_running_publisher() -> None:
    pub = KvEventPublisher("tcp://127.0.0.1:*")
    with pytest.raises(RuntimeError):
        pub.publish(0.0, [AllBlocksCleared()])
    await pub.start()
    pub.publish(0.0, [AllBlocksCleared()])
    await pub.close()
    await pub.close()  # idempotent
    with pytest.raises(RuntimeError):
        pub.publish(0.0, [AllBlocksCleared()])


# --------------------------------------------------------------------------- one engine, several gateways


def test_a_socket_bound_on_every_interface_is_reached_at_the_instance_host() -> None:
    assert connect_address("tcp://*:5558", "10.0.0.7") == "tcp://10.0.0.7:5558"
    assert connect_address("tcp://0.0.0.0:5558", "10.0.0.7") == "tcp://10.0.0.7:5558"
    assert connect_address("tcp://[::]:5558", "fe80::1") == "tcp://[fe80::1]:5558"
    assert connect_address("tcp://10.0.0.9:5558", "10.0.0.7") == "tcp://10.0.0.9:5558"
    assert connect_address("ipc:///tmp/kv.sock", "10.0.0.7") == "ipc:///tmp/kv.sock"


async def test_every_subscriber_of_an_engine_that_binds_learns_its_blocks() -> None:
    """``tcp://*:PORT``: the engine binds, any number of gateways connect; a late one catches up by replay."""
    pub = KvEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", topic="kv")
    await pub.start()
    assert pub.pub_address is not None and pub.replay_address is not None
    port, replay_port = pub.pub_address.rsplit(":", 1)[1], pub.replay_address.rsplit(":", 1)[1]
    # as a gateway config writes it: the engine's own endpoints, reached at the instance's host
    source = KvEventSource("e0", f"tcp://*:{port}", f"tcp://*:{replay_port}", topic="kv", host="127.0.0.1")
    tokens = list(range(200, 264))
    hashes = [to_event_hash(h) for h in block_hashes(tokens, 16)]
    indexes = [ExactPrefixIndex() for _ in range(3)]
    subs = [KvEventSubscriber(index, [source], replay_timeout_s=0.5) for index in indexes]

    def learned(index: ExactPrefixIndex) -> Callable[[], bool]:
        def check() -> bool:
            pub.publish(time.time(), [])  # a later batch: a subscriber that missed one replays it
            return index.match("e0", hashes) == len(hashes)

        return check

    try:
        for sub in subs[:2]:
            await sub.start()
            assert sub.addresses["e0"] == f"tcp://127.0.0.1:{port}"  # connected, not bound
        pub.publish(time.time(), [BlockStored(hashes, None, tokens, 16)])
        for index in indexes[:2]:
            await wait_until_async(learned(index), WAIT_S, interval=0.05, message="both subscribers learn the blocks")
        await subs[2].start()  # a replica that starts later: its first batch shows the gap, replay fills it
        await wait_until_async(learned(indexes[2]), WAIT_S, interval=0.05, message="the late subscriber catches up")
        assert subs[2].counters["e0"].replayed_batches >= 1
        assert all(not index.is_stale("e0") for index in indexes)
    finally:
        for sub in subs:
            await sub.close()
        await pub.close()


async def test_a_second_gateway_cannot_bind_for_an_engine_that_connects_and_is_told_why() -> None:
    port = reserve_port()
    source = KvEventSource("e0", f"tcp://127.0.0.1:{port}")  # concrete host: the engine connects
    async with KvEventSubscriber(ExactPrefixIndex(), [source]) as first:
        assert first.addresses["e0"] == f"tcp://127.0.0.1:{port}"
        with pytest.raises(zmq.ZMQError, match=rf"let the engine bind: tcp://\*:{port}"):
            await KvEventSubscriber(ExactPrefixIndex(), [source]).start()
