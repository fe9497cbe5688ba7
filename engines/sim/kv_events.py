"""KV-cache event publisher speaking vLLM's ZMQ wire format.

Sources read: ``vllm-project/vllm`` ``vllm/distributed/kv_events.py`` (commit
0181ea3 and the older b4e69e0), the newer tree in ``local-inference-lab/vllm``
(same path), and a real vLLM 0.26 capture quoted in volcano-sh/kthena#1535.
vLLM PR #42892 dropped ``array_like`` from the *event* structs; the batch
stayed array-like (0.26 capture: ``[ts, [{'type': 'BlockStored', ...}], 0]``).

Structs (msgspec; ``omit_defaults=True, gc=False``; fields in declaration order)::

    EventBatch(array_like=True): ts: float, events: list, data_parallel_rank: int|None = None
    KVCacheEvent(tag=True):      base class; map-encoded, tag key "type" = class name, first
    BlockStored:      block_hashes, parent_block_hash, token_ids, block_size,
                      lora_id, medium, lora_name                   # no default: always sent
                      extra_keys, group_idx, kv_cache_spec_kind,
                      kv_cache_spec_sliding_window                 # =None  (vllm-project/vllm)
                      locality, ownership, session_id, skipped_parent_block_hash,
                      skipped_token_ids, skipped_extra_keys        # =None  (newer tree)
    BlockRemoved:     block_hashes, medium                         # no default
                      group_idx                                    # =None  (vllm-project/vllm)
                      locality, ownership                          # =None  (newer tree)
    AllBlocksCleared: no fields
    (b4e69e0, pre-#42892: events array_like too -> ["BlockStored", hashes,
     parent, tokens, block_size, lora_id]; BlockRemoved [tag, hashes].)

msgspec encoding details reproduced here (checked against msgspec 0.22):

* The batch is always a 3-element array ``[ts(float64), [events], rank]``:
  ``omit_defaults`` does not shorten array-like structs, a ``None`` rank is nil.
* Event maps hold ``type``, every no-default field (even when nil), then each
  defaulted field whose value is not ``None``, in declaration order.
* The map header width depends on the number of *declared* fields, not on the
  number written: ``fields + 1 (tag) < 16`` -> fixmap, else map16. Hence the
  vLLM tree matters for byte identity (the 11-field upstream ``BlockStored``
  uses fixmap, the 17-field newer one map16); see :class:`WireSchema`.
* Hashes are uint64 (``pdgate.common.block_hash.to_event_hash``), or raw digest
  ``bytes`` (msgpack bin) when vLLM runs with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``.

ZmqEventPublisher protocol:

* PUB socket, ``set_hwm(hwm)``. Bind if the endpoint contains ``*`` or ``::``
  or starts with ``ipc://`` / ``inproc://``; otherwise *connect* (then the
  subscriber binds). Frames: ``[topic.encode(), seq.to_bytes(8, "big"), payload]``
  with ``seq`` counting 0, 1, 2, ... per publisher.
* The last ``buffer_steps`` (default 10 000) ``(seq, payload)`` pairs are kept.
* Replay: a ROUTER bound on ``replay_endpoint``. A request is exactly
  ``[identity, b"", start_seq(8-byte big-endian)]`` (a DEALER sends
  ``[b"", start]``, a REQ sends ``[start]``); anything else is ignored. The
  reply is ``[b"", seq, payload]`` for every buffered ``seq >= start`` (no
  topic frame), then the end marker ``[b"", b"\xff" * 8, b""]``
  (``END_SEQ = (-1).to_bytes(8, "big", signed=True)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack
import zmq
import zmq.asyncio

logger = logging.getLogger(__name__)

ExternalBlockHash: TypeAlias = int | bytes
"""Published block hash: uint64 by default, raw digest bytes if vLLM is configured so."""

MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""Sequence frame that terminates a replay response."""
SHUTDOWN_TIMEOUT_S = 1.0
"""How long ``close()`` waits for queued batches to be sent (vLLM uses 1 s)."""


@dataclass(frozen=True)
class BlockStored:
    """Full blocks newly cached (vLLM ``BlockStored``, same field order).

    Defaults are what the engine usually sends; on the wire ``lora_id``,
    ``medium`` and ``lora_name`` are always present (nil allowed) and the
    remaining fields only when not ``None``.
    """

    block_hashes: Sequence[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: Sequence[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None
    extra_keys: Sequence[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    skipped_parent_block_hash: ExternalBlockHash | None = None
    skipped_token_ids: Sequence[int] | None = None
    skipped_extra_keys: Sequence[tuple[Any, ...] | None] | None = None


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks evicted (vLLM ``BlockRemoved``); ``medium`` is always on the wire."""

    block_hashes: Sequence[ExternalBlockHash]
    medium: str | None = MEDIUM_GPU
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole prefix cache was reset."""


KvEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared

# vLLM fields without a default (always encoded). All other fields default to None.
_REQUIRED: dict[type, tuple[str, ...]] = {
    BlockStored: (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ),
    BlockRemoved: ("block_hashes", "medium"),
    AllBlocksCleared: (),
}


@dataclass(frozen=True)
class WireSchema:
    """Declared field order of vLLM's event structs in one vLLM tree.

    Only the declared *count* changes bytes (map header width); a field not in
    the schema cannot be sent and raises ``ValueError`` if set.
    """

    name: str
    block_stored: tuple[str, ...]
    block_removed: tuple[str, ...]

    def fields(self, cls: type) -> tuple[str, ...]:
        if cls is BlockStored:
            return self.block_stored
        if cls is BlockRemoved:
            return self.block_removed
        return ()


VLLM_UPSTREAM_SCHEMA = WireSchema(
    "vllm-project/vllm@0181ea3 (matches the vLLM 0.26 capture)",
    _REQUIRED[BlockStored] + ("extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window"),
    _REQUIRED[BlockRemoved] + ("group_idx",),
)
VLLM_EXTENDED_SCHEMA = WireSchema(
    "newer tree (local-inference-lab/vllm): + locality/ownership/session_id/skipped_*",
    VLLM_UPSTREAM_SCHEMA.block_stored
    + (
        "locality",
        "ownership",
        "session_id",
        "skipped_parent_block_hash",
        "skipped_token_ids",
        "skipped_extra_keys",
    ),
    VLLM_UPSTREAM_SCHEMA.block_removed + ("locality", "ownership"),
)
DEFAULT_SCHEMA = VLLM_UPSTREAM_SCHEMA


def _msgspec_map_header(declared_fields: int, entries: int) -> bytes:
    """msgspec sizes a struct's map header by its declared field count (+1 for the tag)."""
    if declared_fields + 1 < 16:
        return bytes((0x80 | entries,))
    return b"\xde" + struct.pack(">H", entries)


def _encode_event(event: KvEvent, schema: WireSchema, pack: msgpack.Packer) -> bytes:
    cls = type(event)
    if cls not in _REQUIRED:
        raise TypeError(f"not a KV event: {event!r}")
    declared = schema.fields(cls)
    required = _REQUIRED[cls]
    items: list[tuple[str, Any]] = [("type", cls.__name__)]
    items += [(name, getattr(event, name)) for name in required]
    items += [(name, value) for name in declared[len(required) :] if (value := getattr(event, name)) is not None]
    for name in getattr(event, "__dataclass_fields__", {}):
        if name not in declared and getattr(event, name) is not None:
            raise ValueError(f"{cls.__name__}.{name} is not part of schema {schema.name!r}")
    body = b"".join(pack.pack(key) + pack.pack(value) for key, value in items)
    return _msgspec_map_header(len(declared), len(items)) + body


def encode_batch(
    ts: float,
    events: Sequence[KvEvent],
    dp_rank: int | None = 0,
    *,
    schema: WireSchema = DEFAULT_SCHEMA,
) -> bytes:
    """Encode one ``KVEventBatch`` byte-identically to vLLM's ``msgspec.msgpack.Encoder``.

    ``ts`` is encoded as float64 (vLLM passes ``time.time()``); lists/tuples
    become arrays, ``bytes`` become bin. ``schema`` selects the vLLM tree
    whose struct declarations are mirrored.
    """
    pack = msgpack.Packer(use_bin_type=True)
    return b"".join(
        (
            pack.pack_array_header(3),
            pack.pack(float(ts)),
            pack.pack_array_header(len(events)),
            *(_encode_event(e, schema, pack) for e in events),
            pack.pack(dp_rank),
        )
    )


def _should_bind(endpoint: str) -> bool:
    """vLLM's heuristic: bind wildcard / IPv6-any / ipc / inproc endpoints, connect otherwise."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KvEventPublisher:
    """Asyncio ZMQ PUB (+ optional ROUTER replay) publisher, wire-compatible with vLLM.

    Lifecycle: ``await start()``, then ``publish()`` from the event-loop thread,
    then ``await close()``. The publisher owns its ZMQ context and background
    tasks; nothing here blocks the loop. Sequence numbers start at 0 and are
    assigned in publish order.

    ``endpoint`` follows vLLM's bind/connect rule (``tcp://*:5557`` binds,
    ``tcp://host:5557`` connects). ``replay_endpoint`` is always bound; like
    ``endpoint`` it may use ``:*`` for an ephemeral port, see ``replay_address``.
    ``dp_rank`` is the batch's ``data_parallel_rank``; ``buffer_size`` is
    vLLM's ``buffer_steps``; ``schema`` picks the vLLM struct layout.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        buffer_size: int = 10_000,
        hwm: int = 100_000,
        dp_rank: int | None = 0,
        max_queue_size: int = 100_000,
        schema: WireSchema = DEFAULT_SCHEMA,
    ) -> None:
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._topic = topic.encode("utf-8")
        self._hwm = hwm
        self._dp_rank = dp_rank
        self._schema = schema
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_size)
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=max_queue_size)
        self._next_seq = 0
        self._ctx: zmq.asyncio.Context | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def pub_address(self) -> str | None:
        """Endpoint actually bound/connected by the PUB socket (resolves ``:*`` ports)."""
        return self._last_endpoint(self._pub)

    @property
    def replay_address(self) -> str | None:
        """Endpoint actually bound by the replay ROUTER (resolves ``:*`` ports)."""
        return self._last_endpoint(self._replay)

    @staticmethod
    def _last_endpoint(sock: zmq.asyncio.Socket | None) -> str | None:
        if sock is None:
            return None
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    async def start(self) -> None:
        """Create the sockets and background tasks. Bind/connect errors propagate."""
        if self._ctx is not None:
            raise RuntimeError("publisher already started")
        if self._closed:
            raise RuntimeError("publisher is closed")
        self._ctx = zmq.asyncio.Context()
        try:
            self._pub = self._ctx.socket(zmq.PUB)
            self._pub.set_hwm(self._hwm)
            if _should_bind(self._endpoint):
                self._pub.bind(self._endpoint)
            else:
                self._pub.connect(self._endpoint)
            if self._replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.bind(self._replay_endpoint)
        except BaseException:
            self._ctx.destroy(linger=0)
            self._ctx = self._pub = self._replay = None
            raise
        self._tasks.append(asyncio.create_task(self._send_loop(), name="kv-events-pub"))
        if self._replay is not None:
            self._tasks.append(asyncio.create_task(self._replay_loop(), name="kv-events-replay"))

    def publish(self, ts: float, events: Sequence[KvEvent]) -> None:
        """Encode and enqueue one batch; never blocks.

        Must be called from the event-loop thread after ``start()``.
        Raises ``asyncio.QueueFull`` if ``max_queue_size`` batches are pending.
        """
        if self._ctx is None or self._closed:
            raise RuntimeError("publisher is not running")
        self._queue.put_nowait(encode_batch(ts, events, self._dp_rank, schema=self._schema))

    async def close(self) -> None:
        """Flush queued batches (up to ``SHUTDOWN_TIMEOUT_S``), stop tasks, close sockets.

        Sockets close with linger 0 and the owned context is terminated. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        if self._tasks and not self._tasks[0].done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._queue.join(), SHUTDOWN_TIMEOUT_S)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        self._ctx = self._pub = self._replay = None

    async def _send_loop(self) -> None:
        assert self._pub is not None
        while True:
            payload = await self._queue.get()
            try:
                seq = self._next_seq
                self._next_seq += 1
                # Buffer first so a failed send is still replayable; PUB itself
                # never blocks (at HWM or with no peers ZMQ drops the message).
                self._buffer.append((seq, payload))
                await self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
            except zmq.ZMQError:
                logger.exception("KV event publish failed (seq %d)", seq)
            finally:
                self._queue.task_done()

    async def _replay_loop(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                logger.warning("invalid KV event replay request: %r", frames)
                continue
            client_id, _, start_bytes = frames
            start = int.from_bytes(start_bytes, "big")
            # Snapshot: the send loop may append while we await below.
            pending = [(s, p) for s, p in self._buffer if s >= start]
            try:
                for seq, payload in pending:
                    await self._replay.send_multipart((client_id, b"", seq.to_bytes(8, "big"), payload))
                await self._replay.send_multipart((client_id, b"", END_SEQ, b""))
            except zmq.ZMQError:
                logger.exception("KV event replay failed")
