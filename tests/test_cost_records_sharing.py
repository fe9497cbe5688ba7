"""Replicas share their completed-request records through a real NATS server's JetStream.

Records of long prompts carry tens of kB of hashed text features each; a batch of them must be
cut below NATS's message limit (1 MB by default) rather than refused and lost.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

from support.nats import NatsServer

from pdgate.gateway.config import CostModelConfig
from pdgate.gateway.costs import CostModelService, RecordWindow
from pdgate.gateway.nats_state import NatsState
from pdgate.scheduler.costmodel.features import RequestFeatures, hash_text


def long_prompt_record(i: int, rng: random.Random) -> dict:
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    features = RequestFeatures(2800, 64, "completions", "m", None, hash_text(" ".join(words)))
    return {"v": 1, "kind": "pdgate-request", "request_id": f"r{i}", **features.to_record(), "output_tokens": 40}


async def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def test_long_prompt_records_reach_the_other_replica_whole(nats: NatsServer) -> None:
    rng = random.Random(7)
    records = [long_prompt_record(i, rng) for i in range(60)]
    assert sum(len(json.dumps(r)) for r in records) > 2_000_000  # a batch of them would be over 1 MB
    states = [NatsState(nats.url, replica_id=name) for name in ("a", "b")]
    services = [CostModelService(CostModelConfig(), {}) for _ in states]
    for state, service in zip(states, services):
        service.share(state, duties_here=lambda: False)
        await state.start()
        assert await state.wait_ready(10)
        await service.start()
    sender, receiver = services
    try:
        for record in records:
            sender.observe(record)
        assert await wait_for(lambda: receiver.held >= len(records), 15), f"received {receiver.held}"
        received = [json.loads(line) for line in receiver.records]
        assert [r["request_id"] for r in received] == [r["request_id"] for r in records]
        assert received[0]["text_hash"] == [list(pair) for pair in records[0]["text_hash"]]
        assert sender.held == len(records)  # its own, once each
    finally:
        for service, state in zip(services, states):
            await service.close()
            await state.close()


def test_the_training_records_are_bounded_in_bytes_as_well_as_in_count() -> None:
    """A long prompt's record is ~50 kB: 50,000 of them (the count limit) would be 2.5 GB of gateway
    memory; the byte limit drops the oldest first."""
    window = RecordWindow(max_records=100, max_bytes=10_000)
    window.extend(b"%04d" % i + b"x" * 996 for i in range(50))  # 50 records of 1 kB
    assert len(window) == 10 and window.bytes == 10_000
    assert [line[:4] for line in window] == [b"%04d" % i for i in range(40, 50)]  # the newest
    window.extend([b"y"] * 200)  # then the count limit
    assert len(window) == 100 and window.bytes == 100


async def test_a_replica_that_starts_later_reads_the_blob_a_replayed_value_names(nats: NatsServer) -> None:
    """What a restarted replica does for the cost model in force: its bucket watcher replays the
    value (before the replica counts as connected) and reads the blob the value names."""
    first = NatsState(nats.url, replica_id="a")
    await first.start()
    assert await first.wait_ready(10)
    assert await first.put_blob("model-v1", b"the model")
    await first.put("models", "current", {"blob": "model-v1"})
    seen: list[bytes | None] = []
    later = NatsState(nats.url, replica_id="b")

    async def on_change(key: str, value: dict | None) -> None:
        if value is not None:
            seen.append(await later.get_blob(value["blob"]))

    async def ignore(key: str, value: dict | None) -> None:
        pass

    later.watch("models", on_change)
    for n in range(8):  # more buckets to open after it: the replay comes before the replica counts as connected
        later.watch(f"other-{n}", ignore)
    await later.start()
    try:
        assert await later.wait_ready(10)
        assert await wait_for(lambda: bool(seen), 5)
        assert seen == [b"the model"]
    finally:
        await later.close()
        await first.close()
