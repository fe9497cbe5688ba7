"""Prefix indexes (exact from KV events, approximate from what was sent) and the KV event subscriber.

Unit tests drive the indexes directly, then the subscriber against a hand-driven XPUB/ROUTER
pair (so sequence gaps, replays and restarts are deterministic), then end to end against a
real simulated engine process publishing vLLM-format KV events.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio
from support.procs import PdgateProcess, free_port, start_sim
from support.waiting import wait_until_async

from pdgate.adapters.kv_events import (
    KvEventSource,
    KvEventSubscriber,
    subscriber_address,
)
from pdgate.common import kv_events as wire
from pdgate.common.block_hash import block_hashes, to_event_hash
from pdgate.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch
from pdgate.scheduler.prefix_index import (
    ApproximatePrefixIndex,
    ExactPrefixIndex,
    PrefixIndex,
)

BLOCK = 16
WAIT_S = 5.0


def chain(n: int, seed: int = 0) -> list[int]:
    """``n`` distinct 64-bit hashes standing in for one prompt's block chain."""
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(n)]


# ============================================================================ exact index


def test_exact_prefix_semantics_stop_at_first_miss():
    index = ExactPrefixIndex()
    h = chain(6)
    index.apply("a", [BlockStored(tuple(h[:4]))])
    index.apply("b", [BlockStored(tuple(h[:2])), BlockStored((h[3],))])  # holds 0, 1, 3
    assert index.match("a", h) == 4
    assert index.match("b", h) == 2  # block 3 without block 2 is unusable
    assert index.match("c", h) == 0
    assert index.match("a", []) == 0
    assert index.match("a", [h[4], h[0]]) == 0  # a miss on the first block ends the match
    assert index.match_all(h, ["a", "b", "c"]) == {"a": 4, "b": 2, "c": 0}
    assert index.match_all(h[:3], ["a", "a"]) == {"a": 3}


def test_exact_remove_clear_forget_and_media():
    index = ExactPrefixIndex()
    h = chain(5)
    index.apply("a", [BlockStored(tuple(h))])
    index.apply("b", [BlockStored(tuple(h))])
    index.apply("a", [BlockRemoved((h[2], 12345))])  # unknown hashes are ignored
    assert index.match_all(h, ["a", "b"]) == {"a": 2, "b": 5}
    index.apply("a", [BlockStored((h[2],), parent_block_hash=h[1])])
    assert index.match("a", h) == 5
    index.apply("a", [BlockRemoved(tuple(h), medium="CPU")])  # another tier: not GPU blocks
    index.apply("a", [BlockStored((999,), medium="CPU")])
    assert index.match("a", h) == 5 and index.stats().blocks["a"] == 5
    index.apply("a", [AllBlocksCleared()])
    assert index.match_all(h, ["a", "b"]) == {"a": 0, "b": 5}
    index.forget("b")
    assert index.match("b", h) == 0
    stats = index.stats()
    assert stats.blocks == {"a": 0} and stats.unique_hashes == 0
    with pytest.raises(TypeError):
        index.apply("a", ["BlockStored"])  # type: ignore[list-item]


def test_exact_per_instance_cap_evicts_least_recently_stored_tails_first():
    index = ExactPrefixIndex(max_blocks_per_instance=6)
    old, new = chain(4, seed=1), chain(4, seed=2)
    index.apply("a", [BlockStored(tuple(old))])
    index.apply("b", [BlockStored(tuple(old))])
    index.apply("a", [BlockStored(tuple(new))])  # 8 > 6: two of ``old``'s tail blocks go
    stats = index.stats()
    assert stats.blocks == {"a": 6, "b": 4}
    assert stats.evictions == {"a": 2}
    assert index.match("a", old) == 2 and index.match("a", new) == 4
    assert index.match("b", old) == 4  # other instances untouched
    index.apply("a", [BlockStored(tuple(new) + tuple(chain(10, seed=3)))])  # one batch over the cap
    assert index.stats().blocks["a"] == 6 and index.match("a", new) == 4  # its head survives


def test_exact_stale_marks_reset_by_clear_and_forget():
    index = ExactPrefixIndex()
    index.mark_stale("a")
    index.mark_stale("b")
    assert index.is_stale("a") and index.stats().stale == {"a", "b"}
    index.apply("a", [AllBlocksCleared()])
    index.forget("b")
    assert not index.is_stale("a") and not index.is_stale("b")


def test_slots_are_reused_after_forget():
    index = ExactPrefixIndex()
    h = chain(3)
    for i in range(100):  # many instances coming and going: bit slots are recycled
        index.apply(f"i{i}", [BlockStored(tuple(h))])
        if i % 2:
            index.forget(f"i{i}")
    assert index.match_all(h, [f"i{i}" for i in range(100)]) == {f"i{i}": 0 if i % 2 else 3 for i in range(100)}
    index.apply("new", [BlockStored(tuple(h[:1]))])
    assert index.match_all(h, ["new", "i0", "i99"]) == {"new": 1, "i0": 3, "i99": 0}


def test_match_all_is_fast():
    index = ExactPrefixIndex()
    prompt = chain(1000)
    ids = [f"i{i}" for i in range(8)]
    for k, iid in enumerate(ids):
        index.apply(iid, [BlockStored(tuple(prompt[: 1000 - k]))])
        index.apply(iid, [BlockStored(tuple(chain(2000, seed=100 + k)))])  # unrelated blocks
    assert index.match_all(prompt, ids) == {iid: 1000 - k for k, iid in enumerate(ids)}
    rounds = 50
    best = min(_timed(lambda: index.match_all(prompt, ids), rounds) for _ in range(3))
    assert best < 1e-3, f"match_all of 1000 blocks over 8 instances took {best * 1e6:.0f} us"


def _timed(fn: Callable[[], object], rounds: int) -> float:
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t0) / rounds


# ============================================================================ approximate index


def test_approximate_records_and_matches_prefixes():
    index = ApproximatePrefixIndex(max_blocks=100)
    a, b = chain(5, seed=1), chain(5, seed=2)
    index.record("x", a)
    index.record("y", a[:2] + b[2:])
    assert index.match_all(a, ["x", "y", "z"]) == {"x": 5, "y": 2, "z": 0}
    assert index.match("y", a[:2] + b[2:]) == 5
    index.forget("x")
    assert index.match("x", a) == 0 and index.stats().blocks == {"y": 5}


def test_approximate_global_budget_is_lru_across_instances():
    index = ApproximatePrefixIndex(max_blocks=10)
    p1, p2, p3 = chain(4, seed=1), chain(4, seed=2), chain(4, seed=3)
    index.record("x", p1)
    index.record("y", p2)
    index.record("x", p1)  # refresh p1: p2 on y is now the least recently used
    index.record("z", p3)  # 12 > 10: two entries go, tails first
    stats = index.stats()
    assert stats.total_blocks == 10
    assert stats.evictions == {"y": 2}
    assert index.match_all(p1, ["x"]) == {"x": 4}
    assert index.match("y", p2) == 2 and index.match("z", p3) == 4
    for i in range(50):
        index.record(f"w{i % 3}", chain(7, seed=10 + i))
        assert index.stats().total_blocks <= 10
    index.record("big", chain(25, seed=99))  # a prompt bigger than the budget keeps its head
    assert {iid: n for iid, n in index.stats().blocks.items() if n} == {"big": 10}
    assert index.match("big", chain(25, seed=99)) == 10


def test_approximate_per_instance_cap():
    index = ApproximatePrefixIndex(max_blocks=12, max_blocks_per_instance=5)
    p1, p2 = chain(4, seed=1), chain(4, seed=2)
    index.record("x", p1)
    index.record("y", p1)
    index.record("x", p2)
    assert index.stats().blocks == {"x": 5, "y": 4}
    assert index.stats().evictions == {"x": 3}
    assert index.match("x", p2) == 4 and index.match("x", p1) == 1 and index.match("y", p1) == 4
    index.forget("x")  # its entries leave the global LRU too: 4 + 5 + 3 = 12 fits the budget
    index.record("z", chain(5, seed=3))
    index.record("w", chain(3, seed=4))
    assert index.stats().blocks == {"y": 4, "z": 5, "w": 3}
    assert index.stats().evictions == {"x": 3}
    with pytest.raises(ValueError):
        ApproximatePrefixIndex(max_blocks=0)


def test_both_indexes_satisfy_the_protocol():
    indexes: list[PrefixIndex] = [ExactPrefixIndex(), ApproximatePrefixIndex()]
    for index in indexes:
        assert index.match_all([1, 2], ["a"]) == {"a": 0}
        index.forget("a")


# ============================================================================ decoding + addressing


def test_decode_map_legacy_array_and_bytes_hashes():
    digest = bytes(range(32))
    payload = msgpack.packb(
        [
            1.5,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [1, digest],
                    "parent_block_hash": None,
                    "token_ids": [],
                    "block_size": 16,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                },
                ["BlockStored", [3], 2, [0] * 16, 16, None],  # pre-#42892 array-like event
                ["BlockStored", [4], 3, [0] * 16, 16, None, "CPU"],
                ["BlockRemoved", [3]],
                {"type": "BlockRemoved", "block_hashes": [4], "medium": "CPU"},
                ["AllBlocksCleared"],
                {"type": "AllBlocksCleared"},
                {"type": "SomethingNew", "x": 1},
            ],
            0,
        ]
    )
    events, skipped = decode_batch(payload)
    assert events == [
        BlockStored((1, to_event_hash(digest)), None, medium="GPU"),
        BlockStored((3,), 2, medium=None),
        BlockStored((4,), 3, medium="CPU"),
        BlockRemoved((3,), None),
        BlockRemoved((4,), "CPU"),
        AllBlocksCleared(),
        AllBlocksCleared(),
    ]
    assert skipped == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        msgpack.packb({"ts": 1}),
        msgpack.packb([1.0, "x", 0]),
        msgpack.packb([1.0, [{"type": "BlockStored"}], 0]),
        msgpack.packb([1.0, [["BlockRemoved"]], 0]),
        msgpack.packb([1.0, [{"block_hashes": [1]}], 0]),
        msgpack.packb([1.0, [7], 0]),
    ],
)
def test_decode_rejects_malformed_batches(payload):
    with pytest.raises(ValueError):
        decode_batch(payload)


def test_subscriber_address_mirrors_vllm_bind_rule():
    assert subscriber_address("tcp://127.0.0.1:5557") == (True, "tcp://127.0.0.1:5557")
    assert subscriber_address("tcp://*:5557") == (False, "tcp://127.0.0.1:5557")
    assert subscriber_address("tcp://*:5557", "10.0.0.7") == (False, "tcp://10.0.0.7:5557")
    assert subscriber_address("tcp://[::]:5557", "::1") == (False, "tcp://[::1]:5557")
    assert subscriber_address("tcp://[::1]:5557") == (False, "tcp://[::1]:5557")
    assert subscriber_address("ipc:///tmp/kv") == (False, "ipc:///tmp/kv")


# ============================================================================ subscriber vs a fake engine


def stored(hashes: Sequence[int]) -> wire.BlockStored:
    return wire.BlockStored(
        block_hashes=list(hashes), parent_block_hash=None, token_ids=[0] * (BLOCK * len(hashes)), block_size=BLOCK
    )


class FakeEngine:
    """An XPUB publishing hand-numbered batches, plus a ROUTER answering replays from ``buffer``."""

    def __init__(self, ctx: zmq.asyncio.Context, topic: bytes = b"kv") -> None:
        self.ctx = ctx
        self.topic = topic
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.router: zmq.asyncio.Socket | None = None
        self.buffer: dict[int, bytes] = {}
        self.replay_requests: list[int] = []
        self._replay_task: asyncio.Task[None] | None = None

    async def subscribed(self) -> None:
        """Wait until the subscriber's subscription reached us (no batch is lost after this)."""
        message = await asyncio.wait_for(self.pub.recv(), WAIT_S)
        assert message == b"\x01" + self.topic

    def serve_replay(self, address: str) -> None:
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(address)
        self._replay_task = asyncio.create_task(self._replay_loop())

    async def send(
        self,
        seq: int,
        events: Sequence[wire.KvCacheEvent] | None = None,
        *,
        payload: bytes | None = None,
        publish: bool = True,
    ) -> None:
        """Buffer batch ``seq`` for replays; publish it unless ``publish`` is False (a lost message)."""
        if payload is None:
            payload = wire.encode_batch(time.time(), events or [])
        self.buffer[seq] = payload
        if publish:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])

    async def _replay_loop(self) -> None:
        assert self.router is not None
        while True:
            ident, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            self.replay_requests.append(first)
            for seq in sorted(s for s in self.buffer if s >= first):
                await self.router.send_multipart([ident, b"", seq.to_bytes(8, "big"), self.buffer[seq]])
            await self.router.send_multipart([ident, b"", wire.END_SEQ, b""])

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            await asyncio.gather(self._replay_task, return_exceptions=True)
        for sock in (self.pub, self.router):
            if sock is not None:
                sock.close(linger=0)


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def no_task_left_behind() -> Callable[[], Awaitable[None]]:
    def kv_event_tasks() -> list[asyncio.Task[Any]]:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return [t for t in others if t.get_name().startswith("kv-events")]

    async def check() -> None:
        await wait_until_async(lambda: not kv_event_tasks(), WAIT_S, message=lambda: f"{kv_event_tasks()} to end")

    return check


async def run_fake(
    zctx: zmq.asyncio.Context, *, replay: bool, connect_mode: bool = False
) -> tuple[ExactPrefixIndex, KvEventSubscriber, FakeEngine]:
    port = free_port()
    engine = FakeEngine(zctx)
    replay_endpoint = f"tcp://127.0.0.1:{free_port()}" if replay else None
    if replay_endpoint:
        engine.serve_replay(replay_endpoint)
    endpoint = f"tcp://*:{port}" if connect_mode else f"tcp://127.0.0.1:{port}"
    index = ExactPrefixIndex()
    sub = KvEventSubscriber(index, [KvEventSource("e0", endpoint, replay_endpoint, topic="kv")], replay_timeout_s=0.5)
    if connect_mode:
        engine.pub.bind(f"tcp://127.0.0.1:{port}")  # the engine binds tcp://*:port; we connect
        await sub.start()
    else:
        await sub.start()  # concrete host: the engine connects, so we bind first
        engine.pub.connect(endpoint)
    await engine.subscribed()
    return index, sub, engine


@pytest.mark.parametrize("connect_mode", [False, True])
async def test_subscriber_feeds_index_in_both_connection_modes(zctx, no_task_left_behind, connect_mode):
    index, sub, engine = await run_fake(zctx, replay=False, connect_mode=connect_mode)
    h = chain(4)
    try:
        await engine.send(0, [stored(h[:3])])
        legacy = msgpack.packb(
            [time.time(), [["BlockStored", [h[3]], h[2], [0] * 16, 16, None], ["BlockRemoved", [h[0]]]], 0]
        )
        await engine.send(1, payload=legacy)
        await wait_until_async(lambda: sub.counters["e0"].batches == 2, WAIT_S)
        assert index.stats().blocks == {"e0": 3} and index.match("e0", h[1:]) == 3
        counters = sub.counters["e0"]
        assert (counters.events, counters.gaps, counters.restarts, counters.last_seq) == (3, 0, 0, 1)
        assert not index.is_stale("e0")
    finally:
        await sub.close()
        await engine.close()
    await no_task_left_behind()
    await sub.close()  # idempotent


async def test_gap_without_replay_marks_stale(zctx):
    index, sub, engine = await run_fake(zctx, replay=False)
    h = chain(3)
    try:
        await engine.send(0, [stored(h[:1])])
        await engine.send(1, [stored(h[1:2])], publish=False)  # lost
        await engine.send(2, [stored(h[2:])])
        await wait_until_async(lambda: sub.counters["e0"].batches == 2, WAIT_S)
        assert sub.counters["e0"].gaps == 1 and index.is_stale("e0")
        assert index.match("e0", h) == 1
        await engine.send(3, [wire.AllBlocksCleared()])  # a clear gives the full state back
        await wait_until_async(lambda: sub.counters["e0"].last_seq == 3, WAIT_S)
        assert not index.is_stale("e0")
    finally:
        await sub.close()
        await engine.close()


async def test_gap_is_filled_by_replay(zctx):
    index, sub, engine = await run_fake(zctx, replay=True)
    h = chain(4)
    try:
        await engine.send(0, [stored(h[:1])])
        await engine.send(1, [stored(h[1:2])], publish=False)
        await engine.send(2, [stored(h[2:3])], publish=False)
        await engine.send(3, [stored(h[3:])])
        await wait_until_async(lambda: sub.counters["e0"].last_seq == 3, WAIT_S)
        counters = sub.counters["e0"]
        assert engine.replay_requests == [1]
        assert (counters.gaps, counters.replays, counters.replayed_batches, counters.batches) == (1, 1, 2, 4)
        assert index.match("e0", h) == 4 and not index.is_stale("e0")
    finally:
        await sub.close()
        await engine.close()


async def test_replay_that_cannot_reach_back_marks_stale(zctx):
    """Joining late: the first batch seen is seq 5 and the engine only buffers from seq 4."""
    index, sub, engine = await run_fake(zctx, replay=True)
    h = chain(2)
    try:
        await engine.send(4, [stored(h[:1])], publish=False)
        await engine.send(5, [stored(h[1:])])
        await wait_until_async(lambda: sub.counters["e0"].last_seq == 5, WAIT_S)
        assert engine.replay_requests == [0]
        assert index.match("e0", h) == 2 and index.is_stale("e0")
    finally:
        await sub.close()
        await engine.close()


async def test_seq_going_backwards_is_a_restart(zctx):
    index, sub, engine = await run_fake(zctx, replay=True)
    old, new = chain(3, seed=1), chain(3, seed=2)
    try:
        for seq in range(3):
            await engine.send(seq, [stored(old[seq : seq + 1])])
        await wait_until_async(lambda: index.match("e0", old) == 3, WAIT_S)
        engine.buffer.clear()  # a new engine process: fresh buffer, seq from 0 again
        await engine.send(0, [stored(new[:1])], publish=False)  # its first batch is lost...
        await engine.send(1, [stored(new[1:])])  # ...and recovered by replay after the restart
        await wait_until_async(lambda: sub.counters["e0"].restarts == 1 and sub.counters["e0"].last_seq == 1, WAIT_S)
        assert index.match("e0", old) == 0 and index.match("e0", new) == 3
        assert engine.replay_requests == [0] and not index.is_stale("e0")
    finally:
        await sub.close()
        await engine.close()


async def test_undecodable_batch_is_counted_and_the_stream_goes_on(zctx):
    index, sub, engine = await run_fake(zctx, replay=False)
    h = chain(2)
    try:
        await engine.send(0, payload=b"\xc1garbage")
        await engine.pub.send_multipart([b"kv", b"\x00"])  # wrong frame count
        await engine.send(1, [stored(h)])
        await wait_until_async(lambda: sub.counters["e0"].last_seq == 1, WAIT_S)
        counters = sub.counters["e0"]
        assert counters.decode_errors == 2 and counters.gaps == 0 and index.is_stale("e0")
        assert index.match("e0", h) == 2
    finally:
        await sub.close()
        await engine.close()


async def test_replay_timeout_marks_stale_and_resets_the_socket(zctx):
    index = ExactPrefixIndex()
    port, silent = free_port(), free_port()  # nobody answers replays on ``silent``
    sub = KvEventSubscriber(
        index,
        [KvEventSource("e0", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{silent}", topic="kv")],
        replay_timeout_s=0.2,
    )
    await sub.start()
    engine = FakeEngine(zctx)
    engine.pub.connect(f"tcp://127.0.0.1:{port}")
    try:
        await engine.subscribed()
        await engine.send(3, [stored(chain(1))])
        await wait_until_async(lambda: sub.counters["e0"].last_seq == 3, WAIT_S)
        counters = sub.counters["e0"]
        assert (counters.replays, counters.replay_failures) == (1, 1) and index.is_stale("e0")
    finally:
        await sub.close()
        await engine.close()


async def test_start_failure_and_remove_leave_nothing_behind(zctx, no_task_left_behind):
    port = free_port()
    index = ExactPrefixIndex()
    blocker = zctx.socket(zmq.PULL)
    blocker.bind(f"tcp://127.0.0.1:{port}")
    try:
        sub = KvEventSubscriber(
            index, [KvEventSource("ok", f"tcp://*:{free_port()}"), KvEventSource("busy", f"tcp://127.0.0.1:{port}")]
        )
        with pytest.raises(zmq.ZMQError):
            await sub.start()  # the port is taken: the first stream is torn down too
        await no_task_left_behind()
        with pytest.raises(ValueError):
            KvEventSubscriber(index, [KvEventSource("x", "tcp://*:1"), KvEventSource("x", "tcp://*:2")])
    finally:
        blocker.close(linger=0)
    index.apply("ok", [BlockStored((1,))])
    async with KvEventSubscriber(index, [KvEventSource("ok", f"tcp://127.0.0.1:{free_port()}")]) as sub:
        await sub.add(KvEventSource("other", f"tcp://127.0.0.1:{free_port()}"))
        assert set(sub.counters) == {"ok", "other"}
        with pytest.raises(ValueError):
            await sub.add(KvEventSource("ok", "tcp://*:1"))
        await sub.remove("ok")
        assert set(sub.addresses) == {"other"} and index.stats().blocks == {}
    await no_task_left_behind()


# ============================================================================ end to end with the sim


class SimClient:
    def __init__(self, session: aiohttp.ClientSession, engine: PdgateProcess) -> None:
        self.session = session
        self.engine = engine

    async def complete(self, prompt: str | list[int]) -> tuple[list[int], int]:
        """Send one prompt; return its token ids and the engine's cached prompt tokens."""
        body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "return_token_ids": True}
        async with self.session.post(f"{self.engine.url}/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            data: dict[str, Any] = await resp.json()
        details = data["usage"]["prompt_tokens_details"] or {}  # vLLM sends null when nothing was cached
        return data["choices"][0]["prompt_token_ids"], details.get("cached_tokens", 0)

    async def reset_prefix_cache(self) -> None:
        async with self.session.post(f"{self.engine.url}/reset_prefix_cache") as resp:
            assert resp.status == 200, await resp.text()


def full_blocks(token_ids: Sequence[int]) -> list[int]:
    return [to_event_hash(h) for h in block_hashes(token_ids, BLOCK)]


async def barrier(client: SimClient, index: ExactPrefixIndex, iid: str, tag: str) -> None:
    """Send fresh probe prompts until one shows up in the index.

    The stream is ordered and gaps are replayed before a batch is applied, so once the probe
    is indexed every earlier event of the engine is too.
    """
    for attempt in range(10):
        ids, _ = await client.complete(f"probe {tag} {attempt}: " + "xy " * 12)
        expected = full_blocks(ids)
        indexed = lambda want=expected: index.match(iid, want) == len(want) > 0
        try:
            await wait_until_async(indexed, 0.5, interval=0.005)
        except AssertionError:
            continue  # not indexed yet: send another probe
        return
    raise AssertionError(f"KV events never arrived; engine said:\n{client.engine.log}")


async def test_exact_index_follows_a_real_sim_engine(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    num_blocks = 48
    pub, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    flags = (
        "--kv-events-endpoint",
        pub,
        "--kv-events-replay-endpoint",
        replay,
        "--num-gpu-blocks",
        str(num_blocks),
        "--max-model-len",
        str(num_blocks * BLOCK),
    )
    index = ExactPrefixIndex()
    engines: list[PdgateProcess] = []

    async def launch() -> PdgateProcess:
        engines.append(await asyncio.to_thread(start_sim, *flags))
        return engines[-1]

    sub = KvEventSubscriber(index, [KvEventSource("sim", pub, replay, topic="kv")])
    await sub.start()
    try:
        async with aiohttp.ClientSession() as session:
            client = SimClient(session, await launch())
            await barrier(client, index, "sim", "start")

            # every full block of every prompt is indexed with the hashes we compute ourselves
            texts = [
                f"Tenant {i} system prompt. " + "Rules and context for the assistant. " * (5 + i) for i in range(2)
            ]
            prompts = [(await client.complete(t))[0] for t in texts]
            await barrier(client, index, "sim", "prompts")
            for ids in prompts:
                assert len(ids) >= 4 * BLOCK
                assert index.match("sim", full_blocks(ids)) == len(ids) // BLOCK

            # a long unrelated prompt evicts them: BlockRemoved reaches the index
            long_ids, _ = await client.complete(list(range(1000, 1000 + (num_blocks - 6) * BLOCK)))
            await barrier(client, index, "sim", "evicted")
            assert sub.counters["sim"].events > 0 and index.stats().blocks["sim"] <= num_blocks
            assert index.match("sim", full_blocks(prompts[0])) < len(prompts[0]) // BLOCK
            # the index predicts the engine's own prefix-cache hit (capped at len - 1 tokens)
            predictions = []
            for ids in [*prompts, long_ids]:
                predicted = min(index.match("sim", full_blocks(ids)), (len(ids) - 1) // BLOCK) * BLOCK
                _, cached = await client.complete(ids)
                predictions.append((predicted, cached))
                await barrier(client, index, "sim", f"resend {len(ids)}")
            assert all(p == c for p, c in predictions) and predictions[-1][0] > 0, predictions

            # /reset_prefix_cache -> AllBlocksCleared -> the instance is empty
            await client.reset_prefix_cache()
            await wait_until_async(lambda: index.stats().blocks["sim"] == 0, WAIT_S, message="AllBlocksCleared")
            assert index.match("sim", full_blocks(prompts[0])) == 0

            # an engine restart on the same endpoint: seq restarts at 0 -> forget
            await client.complete(texts[0])
            await barrier(client, index, "sim", "before restart")
            assert index.match("sim", full_blocks(prompts[0])) == len(prompts[0]) // BLOCK
            await asyncio.to_thread(engines[-1].stop)
            client = SimClient(session, await launch())
            second, _ = await client.complete(texts[1])
            await barrier(client, index, "sim", "after restart")
            assert sub.counters["sim"].restarts == 1
            assert index.match("sim", full_blocks(prompts[0])) == 0
            assert index.match("sim", full_blocks(second)) == len(second) // BLOCK
            assert sub.counters["sim"].decode_errors == 0
    finally:
        await sub.close()
        for engine in engines:
            await asyncio.to_thread(engine.stop)
