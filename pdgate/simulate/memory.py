"""An in-memory transport: requests between the load generator, the gateway and the engines
without sockets or HTTP framing.

:class:`MemoryTransport` has the :class:`~pdgate.common.http_client.Upstream` interface the
gateway's adapters and the load generator send through. An origin ``(host, port)`` is served by
an :data:`Endpoint`, a coroutine that answers one request into a :class:`MemoryReply`; each
request runs as a task the transport owns. The reply has the
:class:`~pdgate.common.http_client.UpstreamReply` interface: the body is read whole or relayed
piece by piece as the endpoint writes it, closing an unfinished reply cancels the endpoint's
task (as a closed connection aborts a request on a real engine), and a deadline fails it.

Two writers fill a reply: :class:`GatewayResponder` (the gateway's
:class:`~pdgate.common.http_server.Responder`, for requests to the gateway) and
:class:`EngineReply` (the simulated engine's reply interface, for requests to an engine).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pdgate.common.http_client import Origin, UpstreamError
from pdgate.common.http_server import HttpRequest, Responder
from pdgate.common.tasks import OwnedTasks

Endpoint = Callable[[str, str, dict[str, str], bytes, "MemoryReply"], Awaitable[None]]
"""Answers one request ``(method, path with query, headers, body, reply)``."""


class MemoryReply:
    """One response in memory (see the module doc); the endpoint writes, the caller reads."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.complete = False
        self._loop = loop
        self._head: asyncio.Future[None] = loop.create_future()
        self._waiter: asyncio.Future[None] | None = None  # woken by data, the end or an error
        self._chunks: list[bytes] = []
        self._sink: Callable[[bytes], None] | None = None
        self._error: UpstreamError | None = None
        self._task: asyncio.Task[None] | None = None  # the endpoint's
        self._deadline: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------- the endpoint's side
    def begin(self, status: int, headers: Mapping[str, str]) -> None:
        if self._head.done():
            return
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self._head.set_result(None)

    def feed(self, data: bytes) -> None:
        if not data or self._error is not None or self.complete:
            return
        if self._sink is not None:
            self._sink(data)
        else:
            self._chunks.append(data)
            self._wake()

    def finish(self) -> None:
        if self.complete or self._error is not None:
            return
        self.complete = True
        self._cancel_deadline()
        if not self._head.done():
            self.begin(200, {})
        self._wake()

    def fail(self, reason: str) -> None:
        if self.complete or self._error is not None:
            return
        self._error = UpstreamError(reason)
        self._cancel_deadline()
        if not self._head.done():
            self._head.set_exception(self._error)
            self._head.exception()  # retrieved: nobody may be waiting any more
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --------------------------------------------------------------- the caller's side
    async def wait_head(self) -> None:
        await self._head

    async def read(self) -> bytes:
        while not self.complete:
            await self._wait()
        return self._take()

    async def first_chunk(self) -> bytes:
        while not self._chunks and not self.complete:
            await self._wait()
        return self._take()

    async def relay(self, sink: Callable[[bytes], None]) -> None:
        if self._chunks:
            sink(self._take())
        self._sink = sink
        while not self.complete:
            await self._wait()

    def pause_reading(self) -> None:
        """Nothing to do: a reader in memory takes every piece as it comes."""

    def resume_reading(self) -> None:
        """Nothing to do (see :meth:`pause_reading`)."""

    def abort(self, reason: str) -> None:
        self.fail(reason)
        self.close()

    def close(self) -> None:
        """Done with the reply; an endpoint whose answer is unfinished is cancelled (the request is
        aborted), one that finished its answer runs on to its end."""
        self._sink = None
        self._cancel_deadline()
        task, self._task = self._task, None
        if task is not None and not task.done() and not self.complete:
            task.cancel()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self._loop.create_future()
        await self._waiter
        self._waiter = None
        if self._error is not None:
            raise self._error

    def _take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class MemoryTransport:
    """Routes requests to the endpoints registered by origin; owns every request's task.

    A request reaches its endpoint ``hop_s`` plus the endpoint's ``s_per_kib`` per KiB of body
    later (virtual time): what the HTTP round trip and the server's parsing take on real hosts
    (0 by default; ``docs/simulate.md`` has the figures measured on the project's box)."""

    def __init__(
        self,
        endpoints: dict[tuple[str, int], tuple[Endpoint, float]] | None = None,
        hop_s: float = 0.0,
    ) -> None:
        self._endpoints: dict[tuple[str, int], tuple[Endpoint, float]] = {} if endpoints is None else endpoints
        self.hop_s = hop_s
        self._tasks = OwnedTasks()
        self._closed = False
        self.requests = 0

    def view(self) -> MemoryTransport:
        """Another client of the same endpoints, with its own requests (closing it closes only those)."""
        return MemoryTransport(self._endpoints, self.hop_s)

    def serve(self, host: str, port: int, endpoint: Endpoint, s_per_kib: float = 0.0) -> None:
        self._endpoints[(host, port)] = (endpoint, s_per_kib)

    def unserve(self, host: str, port: int) -> None:
        """The origin stops answering (an engine killed): new requests are refused."""
        self._endpoints.pop((host, port), None)

    async def request(
        self, origin: Origin, method: str, path: str, body: bytes, *, headers: dict[str, str], timeout_s: float
    ) -> MemoryReply:
        host, port, _ = origin
        served = self._endpoints.get((host, port))
        if served is None or self._closed:
            raise UpstreamError(f"cannot connect to {host}:{port} (nothing serves it)")
        endpoint, s_per_kib = served
        delay = self.hop_s + s_per_kib * len(body) / 1024
        self.requests += 1
        loop = asyncio.get_running_loop()
        reply = MemoryReply(loop)
        reply._task = self._tasks.spawn(self._answer(endpoint, method, path, headers, body, reply, delay), path)
        reply._deadline = loop.call_later(timeout_s, reply.abort, f"no complete answer within {timeout_s:g} s")
        try:
            await reply.wait_head()
        except BaseException:
            reply.close()
            raise
        return reply

    @staticmethod
    async def _answer(
        endpoint: Endpoint,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        reply: MemoryReply,
        delay_s: float,
    ) -> None:
        try:
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            await endpoint(method, path, headers, body, reply)
        except asyncio.CancelledError:
            reply.fail("the request was cancelled")
            raise
        except Exception as exc:
            reply.fail(f"the endpoint failed: {exc!r}")
            raise
        reply.fail("the endpoint ended without finishing its answer")  # no-op once finished

    async def close(self) -> None:
        self._closed = True
        await self._tasks.close()


class GatewayResponder(Responder):
    """The gateway's responder writing into a :class:`MemoryReply` (a client connection in memory)."""

    __slots__ = ("reply",)

    def __init__(self, reply: MemoryReply) -> None:  # no connection: the base's state only
        self.reply = reply
        self.keep_alive = True
        self.started = self.finished = self.streaming = self.paused = False
        self._flow = None
        self.status = 0

    @property
    def peer_host(self) -> str | None:
        return "127.0.0.1"

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        return None  # no TLS in memory

    @property
    def client_gone(self) -> bool:
        return self.reply._task is None and not self.reply.complete

    def send(
        self, status: int, body: bytes, *, content_type: str = "application/json", headers: dict[str, str] | None = None
    ) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.finished = True
        self.status = status
        self.reply.begin(status, {"content-type": content_type, **(headers or {})})
        self.reply.feed(body)
        self.reply.finish()

    def start(
        self, status: int, *, content_type: str, headers: dict[str, str] | None = None, first: bytes = b""
    ) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.streaming = True
        self.status = status
        self.reply.begin(status, {"content-type": content_type, **(headers or {})})
        self.reply.feed(first)

    def write(self, data: bytes) -> None:
        self.reply.feed(data)

    def end(self, last: bytes = b"") -> None:
        if self.finished:
            return
        self.finished = True
        self.reply.feed(last)
        self.reply.finish()


def gateway_endpoint(app: Callable[[HttpRequest, Responder], Awaitable[None]], request_ids: str = "") -> Endpoint:
    """An endpoint serving the gateway's application as its HTTP server would (an error the
    application let escape is a 500 in the gateway's error shape; an unfinished stream ends).
    With ``request_ids``, a request without an ``x-request-id`` gets ``request_ids`` + its number
    (the gateway's own ids are random; a simulation's must not be)."""
    numbers = itertools.count()

    async def answer(method: str, target: str, headers: dict[str, str], body: bytes, reply: MemoryReply) -> None:
        path, _, query = target.partition("?")
        lowered = {k.lower(): v for k, v in headers.items()}
        if request_ids and "x-request-id" not in lowered:
            lowered["x-request-id"] = f"{request_ids}{next(numbers)}"
        request = HttpRequest(method, path, query, lowered, body, True)
        responder = GatewayResponder(reply)
        try:
            await app(request, responder)
        except Exception as exc:
            if not responder.started:
                error = {"message": f"internal error in the gateway: {exc!r}", "type": "server_error"}
                responder.send(500, json.dumps({"error": error}).encode())
        if not responder.finished:
            reply.fail("the gateway ended the stream without finishing it")

    return answer


class EngineReply:
    """The simulated engine's reply interface (``engines.sim.reply.Reply``) writing into a :class:`MemoryReply`."""

    def __init__(self, reply: MemoryReply) -> None:
        self.reply = reply

    async def json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self.reply.begin(status, {"content-type": "application/json", **(headers or {})})
        self.reply.feed(json.dumps(payload, separators=(",", ":")).encode())
        self.reply.finish()

    async def text(
        self,
        status: int,
        text: str,
        content_type: str = "text/plain; charset=utf-8",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.reply.begin(status, {"content-type": content_type, **(headers or {})})
        self.reply.feed(text.encode())
        self.reply.finish()

    async def start_stream(self, headers: Mapping[str, str]) -> None:
        self.reply.begin(200, {"content-type": "text/event-stream", **headers})

    async def write(self, data: bytes) -> None:
        self.reply.feed(data)

    async def end(self) -> None:
        self.reply.finish()
