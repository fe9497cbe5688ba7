"""Subscribe to engines' KV cache events (vLLM's ZMQ format) and feed a prefix index.

The wire format (frames, payload, event types, replay protocol, vLLM's bind/connect rule) is
defined in :mod:`pdgate.common.kv_events`; the simulated engine publishes the same
(``engines/sim/kv_events.py``). This module holds the ZMQ side: sockets, sequence tracking,
replays, counters.

Connection rule, mirroring vLLM's and SGLang's publisher (:func:`pdgate.common.kv_events.engine_binds`):
the engine *binds* when its endpoint contains ``*`` or ``::`` or is ``ipc://`` / ``inproc://``,
otherwise it *connects*. So for ``tcp://*:5557`` (the default topology) we connect a SUB to
``tcp://<source.host>:5557``, and so does every other gateway replica: one engine, any number of
subscribers. For ``tcp://127.0.0.1:5557`` we bind a SUB there, and the engine's PUB connects to
it: one subscriber only (a second process cannot bind the same address). The replay ROUTER is
always bound by the engine: we connect to it, at ``source.host`` when its host is a wildcard
(``*``, ``0.0.0.0``, ``[::]``), see :func:`connect_address`.

Sequence tracking per instance (``last`` = last seq applied, none at start):

* ``seq <= last``: the engine restarted; ``forget`` the instance, then go on as if nothing
  had been seen (counted in ``restarts``).
* ``seq > expected`` (``expected = last + 1``, or 0 when nothing was seen): a gap (counted).
  With a replay endpoint, batches ``expected .. seq-1`` are requested and applied first;
  any that do not come back within ``replay_timeout_s`` (or without a replay endpoint) mark
  the instance's index stale (``sink.mark_stale``). A subscriber that joins a running
  engine therefore starts stale unless the engine's replay buffer still reaches seq 0.
* A batch that cannot be decoded is counted and marks the index stale; ``last`` advances.

Caveat: an engine that restarts and publishes past the old ``last`` before we see any of
its batches looks like a gap, not a restart; whoever sees the restart (health checks)
should call ``sink.forget``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, Self, cast

import zmq
import zmq.asyncio

from pdgate.common.kv_events import END_SEQ, DecodeError, KvCacheEvent, decode_batch, engine_binds

logger = logging.getLogger(__name__)

RCV_HWM = 100_000
"""SUB receive high-water mark in messages (vLLM's publisher default ``hwm``)."""
RECV_ERROR_BACKOFF_S = 0.1
_ANY_HOSTS = ("*", "0.0.0.0", "[::]", "::", "[::0]")
"""Hosts that mean "every interface" in a bound endpoint: a peer connects to the engine's host instead."""


class KvEventSink(Protocol):
    """Where decoded events go (the gateway passes :class:`pdgate.scheduler.prefix_index.ExactPrefixIndex`)."""

    def apply(self, instance_id: str, events: Sequence[KvCacheEvent]) -> None: ...

    def forget(self, instance_id: str) -> None: ...

    def mark_stale(self, instance_id: str) -> None: ...


class KvEventFeed(Protocol):
    """What follows the engines' KV events into a sink: :class:`KvEventSubscriber` over ZMQ, or
    ``pdgate simulate``'s in-memory feed. Lifecycle: ``start``, ``add``/``remove`` while
    running, ``close`` (idempotent)."""

    async def start(self) -> None: ...

    async def add(self, source: KvEventSource) -> None: ...

    async def remove(self, instance_id: str, *, forget: bool = True) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class KvEventSource:
    """One engine's KV event stream.

    ``endpoint`` / ``replay_endpoint`` / ``topic`` are the engine's own
    ``--kv-events-config`` values; ``host`` (the instance's host) is where to connect when the
    engine binds every interface (``tcp://*:port``, and for the replay also ``0.0.0.0``).
    """

    instance_id: str
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    host: str = "127.0.0.1"


@dataclass
class KvEventCounters:
    """Cumulative counters of one instance's stream (for metrics)."""

    batches: int = 0
    events: int = 0
    ignored_events: int = 0
    gaps: int = 0
    replays: int = 0
    replayed_batches: int = 0
    replay_failures: int = 0
    stale_marks: int = 0
    restarts: int = 0
    decode_errors: int = 0
    last_seq: int | None = None


# ----------------------------------------------------------------------------- addressing


def connect_address(endpoint: str, host: str) -> str:
    """Where a peer connects to reach a socket bound on ``endpoint``.

    A ``tcp://HOST:PORT`` whose HOST means every interface (``*``, ``0.0.0.0``, ``[::]``) is
    reached at ``host`` (bracketed when IPv6); any other endpoint is returned as it is.
    """
    scheme, sep, rest = endpoint.partition("://")
    addr, colon, port = rest.rpartition(":")
    if scheme == "tcp" and sep and colon and addr in _ANY_HOSTS:
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"tcp://{host}:{port}"
    return endpoint


def subscriber_address(endpoint: str, host: str = "127.0.0.1") -> tuple[bool, str]:
    """``(bind, address)`` for our SUB socket given the engine's publisher ``endpoint``.

    An engine that binds (``tcp://*:PORT``) is connected to at ``host``, its instance's host; one
    that connects (``tcp://HOST:PORT``) needs us to bind that very address.
    """
    if engine_binds(endpoint):
        return False, connect_address(endpoint, host)
    return True, endpoint


# ----------------------------------------------------------------------------- streams


class _InstanceStream:
    """One instance's SUB socket (and replay DEALER), sequence tracking and counters."""

    def __init__(
        self, ctx: zmq.asyncio.Context, source: KvEventSource, sink: KvEventSink, replay_timeout_s: float
    ) -> None:
        self.source = source
        self.counters = KvEventCounters()
        self._ctx = ctx
        self._sink = sink
        self._replay_timeout_s = replay_timeout_s
        # The SUB is a plain (blocking-API) socket read without blocking from the loop's reader
        # callback: every message that arrived is taken in one wake-up, and one that continues
        # the sequence is applied there, without a future or a task switch per message (pyzmq's
        # asyncio sockets cost more per message than decoding and applying it). Messages that
        # need a replay first wait in _queue for run(), which may await the replay.
        self._sub: zmq.Socket[bytes] | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._queue: collections.deque[list[bytes]] = collections.deque()
        self._wake = asyncio.Event()
        self.address = ""

    def open(self) -> None:
        """Create and bind/connect the sockets; errors propagate (sockets closed)."""
        bind, self.address = subscriber_address(self.source.endpoint, self.source.host)
        try:
            self._sub = zmq.Context.shadow(self._ctx.underlying).socket(zmq.SUB)
            self._sub.setsockopt(zmq.LINGER, 0)
            self._sub.setsockopt(zmq.RCVHWM, RCV_HWM)
            self._sub.setsockopt(zmq.IPV6, "[" in self.address)
            self._sub.setsockopt(zmq.SUBSCRIBE, self.source.topic.encode())
            if bind:
                self._bind(self._sub)
            else:
                self._sub.connect(self.address)
            if self.source.replay_endpoint is not None:
                self._open_replay()
        except BaseException:
            self.close()
            raise

    def _bind(self, sock: zmq.Socket[bytes]) -> None:
        """Bind for an engine that connects (``tcp://HOST:PORT``), saying why when that fails."""
        try:
            sock.bind(self.address)
        except zmq.ZMQError as exc:
            port = self.address.rsplit(":", 1)[-1]
            raise zmq.ZMQError(
                exc.errno,
                f"KV events of {self.source.instance_id}: cannot bind {self.address} ({exc.strerror}). With a "
                "concrete host the engine connects and this gateway must bind that address, so only one "
                f"gateway process on that host can; for several, let the engine bind: tcp://*:{port}",
            ) from exc

    def close(self) -> None:
        for sock in (self._sub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._sub = self._replay = None

    async def run(self) -> None:
        assert self._sub is not None
        loop = asyncio.get_running_loop()
        fd = cast(int, self._sub.getsockopt(zmq.FD))
        loop.add_reader(fd, self._on_readable)
        try:
            self._on_readable()  # what came before the reader was registered (the FD is edge-triggered)
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    frames = self._queue.popleft()
                    try:
                        await self._on_message(frames)
                    except Exception:  # keep the stream alive; the index may be off until repaired
                        logger.exception("KV events of %s: batch failed", self.source.instance_id)
                        self._mark_stale()
        finally:
            loop.remove_reader(fd)

    def _on_readable(self) -> None:
        """Take every message that arrived (ZMQ's FD signals edges: read until none is left)."""
        sub = self._sub
        while sub is not None:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                logger.exception("KV events of %s: receive failed", self.source.instance_id)
                return
            if self._queue or not self._applied_at_once(frames):
                self._queue.append(frames)
                self._wake.set()

    def _applied_at_once(self, frames: list[bytes]) -> bool:
        """Apply a well-formed batch that continues the sequence; False leaves it to :meth:`_on_message`."""
        if len(frames) != 3 or len(frames[1]) != 8:
            return False
        seq = int.from_bytes(frames[1], "big")
        last = self.counters.last_seq
        if seq != (0 if last is None else last + 1):
            return False
        try:
            self._apply(seq, frames[2])
        except Exception:  # keep the stream alive; the index may be off until repaired
            logger.exception("KV events of %s: batch failed", self.source.instance_id)
            self._mark_stale()
        return True

    async def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.counters.decode_errors += 1
            self._mark_stale()
            return
        seq = int.from_bytes(frames[1], "big")
        last = self.counters.last_seq
        if last is not None and seq <= last:
            self.counters.restarts += 1
            self._sink.forget(self.source.instance_id)
            self.counters.last_seq = last = None
        expected = 0 if last is None else last + 1
        if seq > expected:
            self.counters.gaps += 1
            await self._fill_gap(expected, seq)
        self._apply(seq, frames[2])

    def _apply(self, seq: int, payload: bytes) -> None:
        self.counters.last_seq = seq
        self.counters.batches += 1
        try:
            events, skipped = decode_batch(payload)
        except DecodeError as exc:
            logger.warning("KV events of %s: seq %d undecodable: %s", self.source.instance_id, seq, exc)
            self.counters.decode_errors += 1
            self._mark_stale()
            return
        self.counters.events += len(events)
        self.counters.ignored_events += skipped
        self._sink.apply(self.source.instance_id, events)

    async def _fill_gap(self, start: int, stop: int) -> None:
        """Replay and apply batches ``start .. stop-1``; mark stale if any is missing."""
        if self._replay is None:
            self._mark_stale()
            return
        self.counters.replays += 1
        replayed = await self._request_replay(start)
        if replayed is None:
            self.counters.replay_failures += 1
            self._mark_stale()
            return
        wanted = {seq: payload for seq, payload in replayed if start <= seq < stop}
        self.counters.replayed_batches += len(wanted)
        for seq in sorted(wanted):
            self._apply(seq, wanted[seq])
        if len(wanted) < stop - start:
            self._mark_stale()

    async def _request_replay(self, start: int) -> list[tuple[int, bytes]] | None:
        """Everything the engine still buffers from ``start`` on; ``None`` on timeout."""
        assert self._replay is not None
        sock = self._replay
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._replay_timeout_s
        out: list[tuple[int, bytes]] = []
        with contextlib.suppress(zmq.Again):  # a full queue: no answer, handled as a timeout
            await sock.send_multipart((b"", start.to_bytes(8, "big")), flags=zmq.NOBLOCK)
        while (remaining := deadline - loop.time()) > 0:
            if not await sock.poll(int(remaining * 1000)):  # (POLLIN)
                break
            frames = await sock.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                continue
            if frames[1] == END_SEQ:
                return out
            out.append((int.from_bytes(frames[1], "big"), frames[2]))
        # A late answer must not be taken for the next request's: start a fresh socket.
        sock.close(linger=0)
        self._replay = None
        self._open_replay()
        return None

    def _open_replay(self) -> None:
        assert self.source.replay_endpoint is not None
        address = connect_address(self.source.replay_endpoint, self.source.host)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, "[" in address)
        try:
            sock.connect(address)
        except BaseException:
            sock.close(linger=0)
            raise
        self._replay = sock

    def _mark_stale(self) -> None:
        self.counters.stale_marks += 1
        self._sink.mark_stale(self.source.instance_id)


# ----------------------------------------------------------------------------- subscriber


class KvEventSubscriber:
    """Runs one asyncio task per subscribed instance, feeding ``sink`` from its KV events.

    Lifecycle: ``await start()`` (sockets are bound/connected there; errors propagate and
    nothing is left open), ``add``/``remove`` while running, ``await close()`` (cancels and
    awaits every task, closes every socket and the owned ZMQ context; idempotent). Also an
    async context manager. All methods must be called from the event loop's thread.
    """

    def __init__(
        self, sink: KvEventSink, sources: Iterable[KvEventSource] = (), *, replay_timeout_s: float = 1.0
    ) -> None:
        self._sink = sink
        self._replay_timeout_s = replay_timeout_s
        self._pending: list[KvEventSource] = []
        for source in sources:
            if any(s.instance_id == source.instance_id for s in self._pending):
                raise ValueError(f"duplicate instance id {source.instance_id!r}")
            self._pending.append(source)
        self._ctx: zmq.asyncio.Context | None = None
        self._streams: dict[str, _InstanceStream] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    async def start(self) -> None:
        if self._ctx is not None or self._closed:
            raise RuntimeError("subscriber already started or closed")
        self._ctx = zmq.asyncio.Context()
        try:
            for source in self._pending:
                await self.add(source)
        except BaseException:
            await self.close()
            raise
        self._pending.clear()

    async def add(self, source: KvEventSource) -> None:
        """Subscribe to one more instance (after :meth:`start`)."""
        if self._ctx is None or self._closed:
            raise RuntimeError("subscriber is not running")
        if source.instance_id in self._streams:
            raise ValueError(f"duplicate instance id {source.instance_id!r}")
        stream = _InstanceStream(self._ctx, source, self._sink, self._replay_timeout_s)
        stream.open()
        self._streams[source.instance_id] = stream
        self._tasks[source.instance_id] = asyncio.create_task(stream.run(), name=f"kv-events-{source.instance_id}")

    async def remove(self, instance_id: str, *, forget: bool = True) -> None:
        """Stop following an instance and (by default) forget what the sink knows of it."""
        task = self._tasks.pop(instance_id, None)
        stream = self._streams.pop(instance_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if stream is not None:
            stream.close()
            if forget:
                self._sink.forget(instance_id)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for instance_id in list(self._streams):
            await self.remove(instance_id, forget=False)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def counters(self) -> Mapping[str, KvEventCounters]:
        """Live counters per instance (do not mutate)."""
        return {iid: stream.counters for iid, stream in self._streams.items()}

    @property
    def addresses(self) -> Mapping[str, str]:
        """The address each instance's SUB socket bound or connected to."""
        return {iid: stream.address for iid, stream in self._streams.items()}
