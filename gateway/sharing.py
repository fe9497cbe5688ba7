"""What gateway replicas share, behind one small interface: :class:`SharedState`.

Replicas of one gateway (processes, hosts) agree on the fleet's changes (instances added and
removed at run time) and on drains through key-value buckets that every replica writes and
watches. The implementation is NATS with JetStream (:class:`pdgate.gateway.nats_state.NatsState`); a gateway
without ``sharing.nats_url`` has none and shares nothing.

Contract:

* :meth:`SharedState.put` records the latest value of a key; every *other* replica's watcher
  of that bucket is called with it (a replica never hears its own writes back). Values are
  JSON objects.
* A watcher is first called with every value the bucket holds (a replica that starts, or
  restarts, catches up), then with each change as it comes.
* Subjects carry figures that are sent again (:meth:`SharedState.publish`) and requests to one
  replica (:meth:`SharedState.request`); durable streams (:meth:`SharedState.append`) carry
  records every replica must see once, also one that starts later; blobs carry large values
  (a cost model); a lease with a time to live elects one replica for exactly-once duties.
* Nothing on the request path waits for it. While the server cannot be reached, writes are
  kept (the latest per key) and sent on reconnection; :attr:`SharedState.connected` says which.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

Watcher = Callable[[str, dict[str, Any]], Awaitable[None]]
Listener = Callable[[bytes], Awaitable[None]]
Responder = Callable[[bytes], Awaitable[bytes]]


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

    def respond(self, subject: str, handler: Responder) -> None:
        """Answer requests on ``subject`` with ``handler(data)`` (before start)."""

    async def request(self, subject: str, data: bytes, timeout_s: float) -> bytes | None:
        """One answer to a request on ``subject``; None when nobody answered in time or the server is away."""

    async def claim(self, lease: str, ttl_s: float) -> bool:
        """Take or renew the lease ``lease`` for ``ttl_s``: True while this process holds it."""

    async def holder(self, lease: str) -> str | None:
        """The replica holding ``lease``, if any is known."""

    async def release(self, lease: str) -> None:
        """Give up ``lease`` if this replica holds it, so another takes it at once (not a lease later)."""

    def follow(self, stream: str, on_message: Listener) -> None:
        """Call ``on_message(data)`` for every message of the durable ``stream``, from its first one
        still kept, other replicas' only (before start)."""

    async def append(self, stream: str, data: bytes) -> bool:
        """Add a message to the durable ``stream``; False while the server is away."""

    async def put_blob(self, name: str, data: bytes) -> bool: ...

    async def get_blob(self, name: str) -> bytes | None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"
