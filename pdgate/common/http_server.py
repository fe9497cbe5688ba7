"""The gateway's HTTP/1.1 server: an ``asyncio.Protocol`` per connection on ``httptools``.

aiohttp's server cost more per request than all of the gateway's own logic on this kind of
machine (docs/gateway-benchmarks.md), so the gateway serves HTTP itself; this module knows
HTTP and nothing about the gateway:

* Requests are parsed by llhttp (``httptools``); keep-alive and pipelined requests are served
  one at a time per connection, in order. A body over ``max_body_bytes`` is answered 413
  (from ``Content-Length`` before it is read, or as it grows) and the connection closed.
* Each request runs the handler in its own task with a :class:`Responder`: a whole response
  (:meth:`Responder.send`) or a chunked stream (:meth:`Responder.start`, :meth:`Responder.write`,
  :meth:`Responder.end`). Writes go straight to the transport.
* When the client goes away, the request's task is cancelled (the handler's ``finally`` then
  aborts its upstream work). Backpressure: while the client's socket buffer is full,
  :attr:`Responder.paused` is set and the hooks given to :meth:`Responder.on_flow` are called.
* Idle keep-alive connections are closed after ``keepalive_timeout_s``; a request's head and
  body must arrive within ``request_timeout_s`` (408 otherwise).
* HTTP/1.0 clients get their streams delimited by the connection's close (they know no chunked
  coding); responses to HEAD carry no body; trailer fields of a chunked body are not merged
  into the headers; bytes after a request that closes the connection are ignored, that request
  is still answered.
* Limits against hostile or broken clients (:class:`HttpLimits`; each hit is reported to the
  ``on_limit`` hook by name, :data:`LIMIT_NAMES`): a request head (request line and headers) over
  ``max_header_bytes`` is answered 431 and the connection closed, also while it is still arriving;
  a connection beyond ``max_connections`` gets 503 with ``Retry-After`` and is closed; a client
  that reads nothing of its response for ``slow_reader_timeout_s`` while its socket buffer is
  full, or lets more than ``max_write_buffer_bytes`` pile up unsent, is dropped (the request's
  task is cancelled as when it leaves). A handler that honours :meth:`Responder.on_flow` pauses
  its source instead of buffering, so the write-buffer limit is the backstop.
* ``Expect: 100-continue`` (HTTP/1.1) is answered ``100 Continue`` as soon as the head shows the
  body is acceptable (curl and others wait for it before sending a body), after the response in
  progress when the request is pipelined; a body over the limit gets the 413 instead, and any
  other expectation 417.
* :meth:`HttpServer.close` stops listening, lets in-flight requests finish for a grace period,
  then cancels what is left.
* HTTPS when :meth:`HttpServer.start` is given an ``ssl.SSLContext`` (:mod:`pdgate.common.tls`).
  The handshake must finish within ``tls_handshake_timeout_s``; a failed one (an untrusted or
  missing client certificate where one is required, plain HTTP sent to the HTTPS port) closes
  the connection without a response and is not logged above debug level (asyncio reports TLS
  errors, which are ``OSError``, only in debug mode). :attr:`Responder.peer_certificate` is the
  client's verified certificate, if it sent one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import httptools

from pdgate.common.http_responder import Responder, response_head

__all__ = ["LIMIT_NAMES", "HttpLimits", "HttpRequest", "HttpServer", "HttpServerProtocol", "Responder"]

log = logging.getLogger("pdgate.http")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_TIMER_SLACK_S = 0.002  # a timer may fire this early (the loop's clock is coarse): its deadline has come
TLS_HANDSHAKE_TIMEOUT_S = 10.0
LIMIT_NAMES = (
    "body",  # 413: the body is over max_body_bytes
    "header",  # 431: the request line and headers are over max_header_bytes
    "request_timeout",  # 408: the head and body did not arrive within request_timeout_s
    "malformed",  # 400: not HTTP/1.x the parser accepts
    "connections",  # 503: max_connections already open
    "slow_reader",  # dropped: read nothing for slow_reader_timeout_s with its buffer full
    "write_buffer",  # dropped: over max_write_buffer_bytes unsent
)


@dataclasses.dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one server process accepts from its clients; see the module doc."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_connections: int = 10_000
    keepalive_timeout_s: float = 75.0
    request_timeout_s: float = 60.0
    slow_reader_timeout_s: float = 60.0
    max_write_buffer_bytes: int = 4 * 1024 * 1024


@dataclasses.dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes
    keep_alive: bool
    version: str = "1.1"  # the client's HTTP version: "1.0" or "1.1"


Handler = Callable[[HttpRequest, Responder], Awaitable[None]]


class HttpServerProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._rejected = False
        self._pending: deque[HttpRequest] = deque()
        self._task: asyncio.Task[None] | None = None
        self._responder: Responder | None = None
        self._timer: asyncio.TimerHandle | None = None  # scheduled for _timer_at, at or before _deadline
        self._timer_at = 0.0
        self._deadline = 0.0
        self._on_deadline: Callable[[], None] | None = None  # None: no deadline armed
        self._in_message = False
        self._last_request = False  # a request that closes the connection arrived: nothing after it is read
        self._in_head = False  # a request line or headers are arriving (and count towards max_header_bytes)
        self._head_size = 0  # bytes of request line and headers parsed
        self._head_bytes = 0  # bytes received since the head began, but for the chunk it began in
        self._expects_continue = False  # the request in arrival awaits a 100 Continue before its body

    # ------------------------------------------------------------ transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        limit = self.server.limits.max_connections
        if len(self.server._connections) >= limit:
            self._reject(503, f"the gateway has {limit} connections open, its limit: retry shortly", "connections")
            return
        self.server._connections.add(self)
        self._arm(self.server.limits.keepalive_timeout_s, self._idle_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self._stop_timer()
        self._pending.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: the handler's finally aborts its upstream work

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._in_head:  # the whole chunk is head unless the head ends in it (checked below)
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not supported", "malformed")
        except httptools.HttpParserError as exc:
            if self._last_request:  # bytes after a request that closes the connection: ignored
                if self.transport is not None:
                    self.transport.pause_reading()
            elif not self._rejected:
                self._reject(400, f"malformed HTTP request: {exc}", "malformed")
        else:
            # the parser buffers a header until it is whole: bound what a head still arriving holds
            if self._in_head and self._head_bytes > self.server.limits.max_header_bytes and not self._rejected:
                self._header_overflow()

    def pause_writing(self) -> None:
        if self._responder is not None:
            self._responder._pause()
            if self._task is not None:  # the deadline slot is free while a response is written
                self._arm(self.server.limits.slow_reader_timeout_s, self._reader_stalled)

    def resume_writing(self) -> None:
        if self._responder is not None:
            if self._task is not None:
                self._disarm()
            self._responder._resume()

    @property
    def write_buffer_limit(self) -> int:
        return self.server.limits.max_write_buffer_bytes

    def drop(self, limit: str) -> None:
        """Abort the connection (unsent data discarded: a client that does not read would keep a
        graceful close waiting forever); the request's task is cancelled by :meth:`connection_lost`."""
        self.server.limit_hit(limit)
        if self.transport is not None:
            self.transport.abort()

    # -------------------------------------------------------------- parser callbacks
    def on_message_begin(self) -> None:
        self._in_message = True
        self._url = b""
        self._head_size = 0
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._expects_continue = False
        self._head_bytes = 0
        self._in_head = True
        if self._task is None:
            self._arm(self.server.limits.request_timeout_s, self._request_expired)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self.server.limits.max_header_bytes:
            self._header_overflow()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer of a chunked body: never merged into the headers (RFC 9110 6.5.1)
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.server.limits.max_header_bytes:
            self._header_overflow()
            return
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def _header_overflow(self) -> None:
        if not self._rejected:
            limit = self.server.limits.max_header_bytes
            self._reject(431, f"request line and headers over {limit} bytes", "header")

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._rejected:
            return
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.limits.max_body_bytes:
            limit = self.server.limits.max_body_bytes
            self._reject(413, f"request body too large: {length} bytes (limit {limit})", "body")
            return
        expect = self._headers.get("expect")
        if expect is None:
            return
        if expect.strip().lower() != "100-continue":
            self._reject(417, f"unsupported expectation: Expect: {expect}", None)
        elif self.parser.get_http_version() != "1.0":  # an HTTP/1.0 client does not know 100 (RFC 9110 10.1.1)
            has_body = (length is not None and length != "0") or "transfer-encoding" in self._headers
            self._expects_continue = has_body  # no body to wait for: the final response is the answer
            self._send_continue()

    def _send_continue(self) -> None:
        """Tell a client waiting with ``Expect: 100-continue`` to send its body; not while another
        request's response is being written (then once it is done: :meth:`_after`)."""
        if not self._expects_continue or self._task is not None or self._rejected:
            return
        self._expects_continue = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._expects_continue = False  # the body is on its way: no 100 needed (RFC 9110 10.1.1 allows leaving it out)
        self._body_size += len(body)
        if self._body_size > self.server.limits.max_body_bytes:
            self._reject(413, f"request body too large: over {self.server.limits.max_body_bytes} bytes", "body")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._expects_continue = False
        if self._rejected:
            return
        target = self._url.decode("latin-1")
        path, _, query = target.partition("?")
        request = HttpRequest(
            self.parser.get_method().decode("latin-1"),
            path,
            query,
            self._headers,
            b"".join(self._body),
            self.parser.should_keep_alive(),
            self.parser.get_http_version(),
        )
        if not request.keep_alive:
            self._last_request = True  # what follows on this connection is not read (RFC 9112 9.6)
        if self._task is None:
            self._disarm()
            self._run(request)
        else:
            self._pending.append(request)
            if self.transport is not None:
                self.transport.pause_reading()  # one request at a time; the client waits

    # ------------------------------------------------------------------- serving
    def _run(self, request: HttpRequest) -> None:
        self._responder = Responder(
            self,
            request.keep_alive and not self.server.closing,
            head=request.method == "HEAD",
            http10=request.version == "1.0",
        )
        self._task = self.loop.create_task(self._serve(request, self._responder))

    async def _serve(self, request: HttpRequest, responder: Responder) -> None:
        try:
            await self.server.handler(request, responder)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            if not responder.started:
                responder.send_json(500, _error_body(500, "internal error in the gateway (logged)", "server_error"))
        finally:
            self._after(responder)

    def _after(self, responder: Responder) -> None:
        self._task = None
        self._responder = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not responder.finished or not responder.keep_alive:
            transport.close()  # an unfinished stream can only be ended by closing
            return
        if self._pending:
            self._run(self._pending.popleft())
            if not self._pending:
                transport.resume_reading()
        elif self._in_message:  # the next request has begun to arrive: it has request_timeout_s to finish
            self._arm(self.server.limits.request_timeout_s, self._request_expired)
            self._send_continue()  # its head asked for a 100 Continue while this response was written
        else:
            self._arm(self.server.limits.keepalive_timeout_s, self._idle_expired)

    def _reject(self, status: int, message: str, limit: str | None) -> None:
        """Answer an unparseable or oversized request and close the connection; ``limit``: the
        name of the limit it hit (:data:`LIMIT_NAMES`), reported to the server's hook."""
        if self._rejected:
            return
        self._rejected = True  # ignore whatever else arrives
        if limit is not None:
            self.server.limit_hit(limit)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._task is None:
            err_type = "service_unavailable" if status == 503 else "invalid_request_error"
            body = json.dumps(_error_body(status, message, err_type)).encode()
            headers = {"Retry-After": "1"} if status == 503 else None
            transport.write(
                response_head(
                    status,
                    headers,
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n",
                )
                + body
            )
            transport.close()
        else:  # a pipelined request went wrong while another is served: drop the connection afterwards
            self._pending.clear()
            transport.pause_reading()
            if self._responder is not None:
                self._responder.keep_alive = False

    # -------------------------------------------------------------------- timers
    # One deadline at a time (keep-alive or request), moved at least twice per request. Moving a
    # loop timer means cancelling it and scheduling another, so the timer is lazy instead: it stays
    # scheduled while the deadline moves later, and when it fires early it reschedules itself for
    # the deadline in force. A busy connection then schedules a timer about once a timeout period.

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` in ``delay`` seconds unless re-armed or disarmed before."""
        deadline = self.loop.time() + delay
        self._deadline = deadline
        self._on_deadline = callback
        if self._timer is None or self._timer_at > deadline:
            self._schedule(deadline)

    def _disarm(self) -> None:
        self._on_deadline = None  # a scheduled timer finds nothing to do

    def _schedule(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(at, self._timer_fired)
        self._timer_at = at

    def _stop_timer(self) -> None:
        self._on_deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timer_fired(self) -> None:
        self._timer = None
        callback = self._on_deadline
        if callback is None:
            return
        if self._deadline - self.loop.time() > _TIMER_SLACK_S:  # the deadline moved since: wait for it
            self._schedule(self._deadline)
            return
        self._on_deadline = None
        callback()

    def _idle_expired(self) -> None:
        transport = self.transport
        if self._task is None and not self._in_message and transport is not None:
            if transport.get_write_buffer_size():  # a client that never read its last response
                transport.abort()  # (a graceful close would wait for it forever)
            else:
                transport.close()

    def _request_expired(self) -> None:
        if self._task is None and self._in_message:
            self._reject(408, "the request did not arrive in time", "request_timeout")

    def _reader_stalled(self) -> None:
        if self._responder is not None and self._responder.paused:
            self.drop("slow_reader")

    def shutdown(self) -> None:
        """Close now if idle; otherwise after the response in progress."""
        if self._task is None:
            if self.transport is not None:
                self.transport.close()
        elif self._responder is not None:
            self._responder.keep_alive = False


def _error_body(status: int, message: str, err_type: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": None, "code": None}}


class HttpServer:
    """Listens on one address and serves every request with ``handler``."""

    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits | None = None,
        *,
        on_limit: Callable[[str], None] | None = None,
        **overrides: float,
    ) -> None:
        """``overrides``: fields of :class:`HttpLimits` that differ from ``limits`` (or its defaults)."""
        self.handler = handler
        self.limits = dataclasses.replace(limits or HttpLimits(), **overrides)  # type: ignore[arg-type]
        self.on_limit = on_limit  # called with a name of LIMIT_NAMES each time a limit is hit
        self.loop = asyncio.get_running_loop()
        self._connections: set[HttpServerProtocol] = set()
        self._server: asyncio.base_events.Server | None = None
        self.closing = False
        self.tls = False
        self.port = 0

    async def start(
        self,
        host: str,
        port: int,
        backlog: int = 1024,
        *,
        reuse_port: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        tls_handshake_timeout_s: float = TLS_HANDSHAKE_TIMEOUT_S,
    ) -> None:
        """Listen on ``host:port``; ``reuse_port``: SO_REUSEPORT, so that several processes serve one
        address and the kernel spreads the connections over them. ``ssl_context``: serve HTTPS
        (the context stays in use: a certificate loaded into it later serves new handshakes)."""
        self._server = await self.loop.create_server(
            lambda: HttpServerProtocol(self),
            host,
            port,
            backlog=backlog,
            reuse_address=True,
            reuse_port=reuse_port,
            ssl=ssl_context,
            ssl_handshake_timeout=tls_handshake_timeout_s if ssl_context is not None else None,
        )
        self.tls = ssl_context is not None
        self.port = self._server.sockets[0].getsockname()[1]

    def active_requests(self) -> int:
        return sum(1 for c in self._connections if c._task is not None)

    def open_connections(self) -> int:
        return len(self._connections)

    def limit_hit(self, name: str) -> None:
        if self.on_limit is not None:
            self.on_limit(name)

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop listening; finish in-flight requests for up to ``grace_s``, then cancel them."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.shutdown()
        deadline = self.loop.time() + grace_s
        while self.active_requests() and self.loop.time() < deadline:  # noqa: ASYNC110 (shutdown only)
            await asyncio.sleep(0.05)
        tasks = [c._task for c in self._connections if c._task is not None]
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
