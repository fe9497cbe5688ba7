"""What gateway replicas share, behind one small interface: :class:`SharedState`.

Replicas of one gateway (processes, hosts) agree on the fleet's changes (instances added and
removed at run time) and on drains through key-value buckets that every replica writes and
watches. The implementation is NATS JetStream key-value (:class:`NatsState`); a gateway
without ``sharing.nats_url`` has none and shares nothing.

Contract:

* :meth:`SharedState.put` records the latest value of a key; every *other* replica's watcher
  of that bucket is called with it (a replica never hears its own writes back). Values are
  JSON objects.
* A watcher is first called with every value the bucket holds (a replica that starts, or
  restarts, catches up), then with each change as it comes.
* Nothing on the request path waits for it. While the server cannot be reached, writes are
  kept (the latest per key) and sent on reconnection; :attr:`SharedState.connected` says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pdgate.common.tasks import OwnedTasks

log = logging.getLogger("pdgate.sharing")

Watcher = Callable[[str, dict[str, Any]], Awaitable[None]]
Listener = Callable[[bytes], Awaitable[None]]
RETRY_S = 1.0


class SharedState(Protocol):
    replica_id: str

    @property
    def connected(self) -> bool: ...

    def watch(self, bucket: str, on_change: Watcher) -> None:
        """Call ``on_change(key, value)`` for the bucket's values and other replicas' changes (before start)."""

    async def put(self, bucket: str, key: str, value: dict[str, Any]) -> None: ...

    def subscribe(self, subject: str, on_message: Listener) -> None:
        """Call ``on_message(data)`` for every message on ``subject``, this replica's too (before start)."""

    async def publish(self, subject: str, data: bytes) -> None:
        """Send a message now, or drop it while the server is away (for figures that are sent again)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class NatsState:
    """:class:`SharedState` over NATS JetStream key-value buckets (one per ``bucket`` name).

    Connects in the background (retrying until the server answers, then nats-py reconnects by
    itself); one task per watched bucket, owned here and cancelled by :meth:`close`.
    """

    def __init__(self, url: str, replica_id: str | None = None) -> None:
        self.url = url
        self.replica_id = replica_id or default_replica_id()
        # what this process's writes carry: a replica restarted under the same id catches up on
        # what it wrote before it died, and still never hears its own writes back
        self.origin = f"{self.replica_id}/{secrets.token_hex(4)}"
        self._watchers: dict[str, Watcher] = {}
        self._listeners: dict[str, Listener] = {}
        self._buckets: dict[str, Any] = {}
        self._unsent: dict[tuple[str, str], dict[str, Any]] = {}
        self._nc: Any = None
        self._tasks = OwnedTasks()
        self._ready = asyncio.Event()
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def watch(self, bucket: str, on_change: Watcher) -> None:
        self._watchers[bucket] = on_change

    def subscribe(self, subject: str, on_message: Listener) -> None:
        self._listeners[subject] = on_message

    async def publish(self, subject: str, data: bytes) -> None:
        if not self.connected:
            return
        try:
            await self._nc.publish(subject, data)
        except Exception as exc:
            log.debug("shared state: %s not published (%r)", subject, exc)

    async def start(self) -> None:
        self._tasks.spawn(self._connect(), "sharing-connect")

    async def close(self) -> None:
        self._closing = True
        await self._tasks.close()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None

    async def wait_ready(self, timeout_s: float) -> bool:
        """Whether the buckets are open and watched within ``timeout_s`` (for start-up and tests)."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def put(self, bucket: str, key: str, value: dict[str, Any]) -> None:
        if not self._ready.is_set():
            self._unsent[(bucket, key)] = value
            return
        try:
            await self._put(bucket, key, value)
        except Exception as exc:  # the server went away: keep it for the reconnection
            log.warning("shared state: %s/%s not written (%r); kept until the server is back", bucket, key, exc)
            self._unsent[(bucket, key)] = value  # sent again on reconnection

    async def _put(self, bucket: str, key: str, value: dict[str, Any]) -> None:
        kv = await self._bucket(bucket)
        payload = json.dumps({"origin": self.origin, "value": value}, separators=(",", ":")).encode()
        await kv.put(_encode_key(key), payload)

    # ---------------------------------------------------------------- internals
    async def _connect(self) -> None:
        import nats

        while True:
            try:
                self._nc = await nats.connect(
                    self.url,
                    name=f"pdgate-{self.replica_id}",
                    connect_timeout=2,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    error_cb=_quiet,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                )
                break
            except Exception as exc:
                log.warning("shared state: NATS at %s not reachable (%r); retrying", self.url, exc)
                await asyncio.sleep(RETRY_S)
        for subject, on_message in self._listeners.items():

            async def deliver(msg: Any, on_message: Listener = on_message) -> None:
                await on_message(msg.data)

            await self._nc.subscribe(subject, cb=deliver)
        for bucket, on_change in self._watchers.items():
            watcher = await (await self._bucket(bucket)).watchall()
            self._tasks.spawn(self._follow(bucket, watcher, on_change), f"sharing-watch-{bucket}")
        self._ready.set()
        log.info("shared state: connected to %s as replica %s", self.url, self.replica_id)
        await self._flush()

    async def _bucket(self, name: str) -> Any:
        kv = self._buckets.get(name)
        if kv is None:
            from nats.js.errors import BucketNotFoundError

            js = self._nc.jetstream()
            try:
                kv = await js.key_value(name)
            except BucketNotFoundError:
                kv = await js.create_key_value(bucket=name, history=1)
            self._buckets[name] = kv
        return kv

    async def _follow(self, bucket: str, watcher: Any, on_change: Watcher) -> None:
        async for entry in watcher:
            if entry is None or entry.value is None:  # the end of what the bucket held; a deleted key
                continue
            try:
                record = json.loads(entry.value)
                if record.get("origin") == self.origin:
                    continue
                await on_change(_decode_key(entry.key), record["value"])
            except Exception:  # one bad record must not stop following the bucket
                log.exception("shared state: cannot apply %s/%s", bucket, entry.key)

    async def _flush(self) -> None:
        unsent, self._unsent = self._unsent, {}
        for (bucket, key), value in unsent.items():
            await self.put(bucket, key, value)

    async def _on_disconnect(self) -> None:
        if self._closing:
            return
        log.warning("shared state: disconnected from NATS; serving on the local view")

    async def _on_reconnect(self) -> None:
        log.info("shared state: reconnected to NATS")
        self._tasks.spawn(self._flush(), "sharing-flush")


async def _quiet(exc: Exception) -> None:
    log.debug("NATS: %r", exc)


def _encode_key(key: str) -> str:
    """NATS keys allow few characters; instance ids (``host:port``) are hex-encoded."""
    return key.encode().hex()


def _decode_key(key: str) -> str:
    return bytes.fromhex(key).decode()
