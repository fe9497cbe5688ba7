"""The :class:`~pdgate.gateway.sharing.SharedState` of gateway replicas over NATS: core subjects
for figures and requests, JetStream key-value buckets (watched), durable streams (followed), an
object store for blobs, and a key with a time to live for leases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from pdgate.common.tasks import OwnedTasks
from pdgate.gateway.sharing import Listener, Responder, Watcher, default_replica_id

log = logging.getLogger("pdgate.sharing")

RETRY_S = 1.0
ORIGIN_HEADER = "Pdgate-Origin"
BLOB_BUCKET = "pdgate_blobs"
STREAM_MAX_MSGS = 100_000


class NatsState:
    """:class:`SharedState` over NATS JetStream key-value buckets (one per ``bucket`` name).

    Connects in the background (retrying until the server answers, then nats-py reconnects by
    itself); one task per watched bucket, owned here and cancelled by :meth:`close`.
    """

    def __init__(self, url: str, replica_id: str | None = None, *, copies: int = 1) -> None:
        self.url = url
        self.copies = copies  # JetStream replicas of each bucket and stream (sharing.stream_replicas)
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
        self._responders: dict[str, Responder] = {}
        self._followers: dict[str, Listener] = {}
        self._followed: dict[str, int] = {}  # durable stream -> last sequence applied
        self._lease_revisions: dict[str, int] = {}
        self._watching = OwnedTasks()  # the bucket watchers and stream followers, renewed on reconnection
        self._blobs: Any = None

    @property
    def connected(self) -> bool:
        """Connected, subscribed and watching (what ``/ready`` reports as ``sync: ok``)."""
        return self._ready.is_set() and self._nc is not None and self._nc.is_connected

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

    def respond(self, subject: str, handler: Responder) -> None:
        self._responders[subject] = handler

    async def request(self, subject: str, data: bytes, timeout_s: float) -> bytes | None:
        if not self.connected:
            return None
        try:
            reply = await self._nc.request(subject, data, timeout=timeout_s)
        except Exception as exc:  # no responders, a timeout, the server away
            log.debug("shared state: request on %s not answered (%r)", subject, exc)
            return None
        return bytes(reply.data)

    async def claim(self, lease: str, ttl_s: float) -> bool:
        if not self.connected:
            self._lease_revisions.pop(lease, None)
            return False
        try:
            kv = await self._bucket(f"pdgate_lease_{lease}", ttl_s=ttl_s)
            revision = self._lease_revisions.get(lease)
            if revision is None:
                self._lease_revisions[lease] = await kv.create("holder", self.origin.encode())
            else:
                self._lease_revisions[lease] = await kv.update("holder", self.origin.encode(), last=revision)
            return True
        except Exception as exc:  # held by another, or the server away: not ours (any more)
            log.debug("shared state: lease %s not held (%r)", lease, exc)
            self._lease_revisions.pop(lease, None)
            return False

    async def holder(self, lease: str) -> str | None:
        if not self.connected:
            return None
        try:
            entry = await (await self._bucket(f"pdgate_lease_{lease}")).get("holder")
        except Exception:
            return None
        return bytes(entry.value).decode().rsplit("/", 1)[0] if entry.value else None

    async def release(self, lease: str) -> None:
        revision = self._lease_revisions.pop(lease, None)
        kv = self._buckets.get(f"pdgate_lease_{lease}")  # opened by claim (never created here: no TTL)
        if revision is None or kv is None or not self.connected:
            return
        try:
            await kv.delete("holder", last=revision)
        except Exception as exc:  # taken meanwhile, or the server away: it expires on its own
            log.debug("shared state: lease %s not released (%r)", lease, exc)

    def follow(self, stream: str, on_message: Listener) -> None:
        self._followers[stream] = on_message

    async def append(self, stream: str, data: bytes) -> bool:
        if not self.connected:
            return False
        try:
            await self._nc.jetstream().publish(_stream_subject(stream), data, headers={ORIGIN_HEADER: self.origin})
        except Exception as exc:
            log.debug("shared state: not appended to %s (%r)", stream, exc)
            return False
        return True

    async def put_blob(self, name: str, data: bytes) -> bool:
        if not self.connected:
            return False
        try:
            await (await self._blob_store()).put(name, data)
        except Exception as exc:
            log.warning("shared state: blob %s not stored (%r)", name, exc)
            return False
        return True

    async def get_blob(self, name: str) -> bytes | None:
        # connected to NATS is enough: a watcher replaying a bucket at (re)connection, before
        # ``connected``, reads the blobs its values name (a restarted replica's cost model in force)
        if self._nc is None or not self._nc.is_connected:
            return None
        try:
            result = await (await self._blob_store()).get(name)
        except Exception as exc:
            log.warning("shared state: blob %s not read (%r)", name, exc)
            return None
        return bytes(result.data) if result.data is not None else None

    async def start(self) -> None:
        self._tasks.spawn(self._connect(), "sharing-connect")

    async def close(self) -> None:
        self._closing = True
        await self._watching.close()
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
                    [u.strip() for u in self.url.split(",") if u.strip()],  # one server, or a cluster's seeds
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
        for subject, handler in self._responders.items():
            await self._nc.subscribe(subject, cb=_answering(handler))
        while True:
            try:
                await self._open_watchers()
                break
            except Exception as exc:  # JetStream not ready yet (a server starting)
                log.warning("shared state: cannot watch the shared state yet (%r); retrying", exc)
                await asyncio.sleep(RETRY_S)
        self._ready.set()
        log.info("shared state: connected to %s as replica %s", self.url, self.replica_id)
        await self._flush()

    async def _open_watchers(self) -> None:
        """Watch every bucket and follow every durable stream (again, after a reconnection: a
        server that restarted has forgotten the consumers; what is replayed is applied again)."""
        await self._watching.close()
        self._watching = OwnedTasks()
        self._buckets.clear()
        self._blobs = None
        for bucket, on_change in self._watchers.items():
            watcher = await (await self._bucket(bucket)).watchall()
            self._watching.spawn(self._follow(bucket, watcher, on_change), f"sharing-watch-{bucket}")
        for stream, on_message in self._followers.items():
            await self._subscribe_stream(stream, on_message)

    async def _subscribe_stream(self, stream: str, on_message: Listener) -> None:
        from nats.js.api import DeliverPolicy, StreamConfig

        js = self._nc.jetstream()
        subject = _stream_subject(stream)
        config = StreamConfig(
            name=_stream_name(stream), subjects=[subject], max_msgs=STREAM_MAX_MSGS, num_replicas=self.copies
        )
        try:
            await js.add_stream(config)
        except Exception:  # it exists (possibly with other limits): use it as it is
            log.debug("shared state: stream %s exists", stream)
        after = self._followed.get(stream)

        async def deliver(msg: Any) -> None:
            self._followed[stream] = msg.metadata.sequence.stream
            if (msg.headers or {}).get(ORIGIN_HEADER) == self.origin:
                return
            try:
                await on_message(msg.data)
            except Exception:
                log.exception("shared state: cannot apply a message of %s", stream)

        if after is None:
            sub = await js.subscribe(subject, cb=deliver, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        else:
            sub = await js.subscribe(
                subject,
                cb=deliver,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                config=_start_at(after + 1),
            )
        self._watching.spawn(_hold(sub), f"sharing-follow-{stream}")

    async def _bucket(self, name: str, *, ttl_s: float | None = None) -> Any:
        kv = self._buckets.get(name)
        if kv is None:
            from nats.js.errors import BucketNotFoundError

            js = self._nc.jetstream()
            try:
                kv = await js.key_value(name)
            except BucketNotFoundError:
                kv = await js.create_key_value(bucket=name, history=1, ttl=ttl_s, replicas=self.copies)
            self._buckets[name] = kv
        return kv

    async def _blob_store(self) -> Any:
        if self._blobs is None:
            from nats.js.errors import NotFoundError

            js = self._nc.jetstream()
            try:
                self._blobs = await js.object_store(BLOB_BUCKET)
            except NotFoundError:
                from nats.js.api import ObjectStoreConfig

                self._blobs = await js.create_object_store(
                    BLOB_BUCKET, config=ObjectStoreConfig(bucket=BLOB_BUCKET, replicas=self.copies)
                )
        return self._blobs

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
        self._tasks.spawn(self._resync(), "sharing-resync")

    async def _resync(self) -> None:
        while not self._closing:
            try:
                await self._open_watchers()
                break
            except Exception as exc:
                log.warning("shared state: cannot resynchronise yet (%r); retrying", exc)
                await asyncio.sleep(RETRY_S)
        await self._flush()


async def _quiet(exc: Exception) -> None:
    log.debug("NATS: %r", exc)


def _answering(handler: Responder) -> Callable[[Any], Awaitable[None]]:
    async def answer(msg: Any) -> None:
        try:
            reply = await handler(msg.data)
        except Exception:
            log.exception("shared state: a request on %s failed", msg.subject)
            return
        await msg.respond(reply)

    return answer


async def _hold(subscription: Any) -> None:
    """Keep a subscription until cancelled, then unsubscribe it."""
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()


def _start_at(sequence: int) -> Any:
    from nats.js.api import ConsumerConfig

    return ConsumerConfig(opt_start_seq=sequence)


def _stream_subject(stream: str) -> str:
    return f"pdgate.{stream}"


def _stream_name(stream: str) -> str:
    return f"PDGATE_{stream.upper()}"


def _encode_key(key: str) -> str:
    """NATS keys allow few characters; instance ids (``host:port``) are hex-encoded."""
    return key.encode().hex()


def _decode_key(key: str) -> str:
    return bytes.fromhex(key).decode()
