"""KV-cache event publisher speaking vLLM's ZMQ wire format (vLLM's ``ZmqEventPublisher``).

The events and their byte-identical encoding are defined in :mod:`pdgate.common.kv_events`
(with the vLLM sources they were read from); this module is the publisher's ZMQ side.

ZmqEventPublisher protocol:

* PUB socket, ``set_hwm(hwm)``. Bind if the endpoint contains ``*`` or ``::``
  or starts with ``ipc://`` / ``inproc://``; otherwise *connect* (then the
  subscriber binds), see :func:`pdgate.common.kv_events.engine_binds`. Frames:
  ``[topic.encode(), seq.to_bytes(8, "big"), payload]`` with ``seq`` counting
  0, 1, 2, ... per publisher.
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
from collections import deque
from collections.abc import Sequence

import zmq
import zmq.asyncio

from pdgate.common.kv_events import (
    DEFAULT_SCHEMA,
    END_SEQ,
    KvCacheEvent,
    WireSchema,
    encode_batch,
    engine_binds,
)

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 1.0
"""How long ``close()`` waits for queued batches to be sent (vLLM uses 1 s)."""


class KvEventPublisher:
    """Asyncio ZMQ PUB (+ optional ROUTER replay) publisher, wire-compatible with vLLM.

    Lifecycle: ``await start()``, then ``publish()`` from the event-loop thread,
    then ``await close()``. The publisher owns its ZMQ context and background
    tasks; nothing here blocks the loop. Sequence numbers start at 0 and are
    assigned in publish order.

    ``endpoint`` follows vLLM's bind/connect rule (``tcp://*:5557`` binds and any number of
    subscribers connect; ``tcp://host:5557`` connects to the one subscriber bound there;
    ``tcp://127.0.0.1:*`` binds a free port, see ``pub_address``). ``replay_endpoint`` is always
    bound; like ``endpoint`` it may use ``:*`` for an ephemeral port, see ``replay_address``.
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
            if engine_binds(self._endpoint):
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

    def publish(self, ts: float, events: Sequence[KvCacheEvent]) -> None:
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
