"""A lean HTTP/1.1 client for the request path: pooled keep-alive connections to the engines.

The gateway's legs (:meth:`adapters.base.EngineAdapter.send`) go through this rather than
aiohttp's client, which cost several times more CPU per request on this kind of machine
(docs/gateway-benchmarks.md). It is an ``asyncio.Protocol`` per connection with ``httptools``'
response parser (llhttp), nothing else:

* :meth:`UpstreamPool.request` sends one request and returns an :class:`UpstreamResponse` as soon
  as the status line and headers are in. A reused keep-alive connection that the engine closed
  meanwhile (nothing answered) is retried once on a fresh connection, as browsers and aiohttp do.
* The body is consumed either whole (:meth:`UpstreamResponse.read`) or relayed: after
  :meth:`UpstreamResponse.first_chunk`, :meth:`UpstreamResponse.relay` calls a sink straight
  from ``data_received`` (no task switch per chunk) and returns when the body ends. Chunked
  transfer encoding is decoded; the sink gets everything one socket read brought, so SSE
  events that arrived together leave in one write.
* :meth:`UpstreamResponse.close` hands a fully read keep-alive connection back to the pool and
  closes any other. Closing mid-response is how a request is aborted on the engine.
* Every request has a deadline; on expiry the connection is closed and the waiter gets
  :class:`UpstreamError`.
* ``https`` origins (the third member of an :data:`Origin`) are served over TLS with the pool's
  ``ssl_context`` (:func:`pdgate.common.tls.client_context`: the configured CA, host names
  checked), or the system's trust store when none is given. A certificate that does not verify
  is an :class:`UpstreamError` that says so.

Errors are :class:`UpstreamError` (connect refused, reset, TLS verification, malformed response,
timeout).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

import httptools

Origin = tuple[str, int, bool]  # host, port, TLS
_TIMER_SLACK_S = 0.002  # a timer may fire this early (the loop's clock is coarse): its deadline has come


class UpstreamError(Exception):
    """The exchange with the engine failed (connection, protocol or deadline)."""


class UpstreamReply(Protocol):
    """One engine response as the gateway reads it (:class:`UpstreamResponse` over HTTP; ``pdgate
    simulate`` has an in-memory one): status and headers are set when the request's awaitable
    returns; the body is read whole or relayed; closing an unfinished one aborts the request."""

    status: int
    headers: dict[str, str]

    async def read(self) -> bytes: ...

    async def first_chunk(self) -> bytes: ...

    async def relay(self, sink: Callable[[bytes], None]) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def abort(self, reason: str) -> None: ...

    def close(self) -> None: ...


class Upstream(Protocol):
    """Where engine requests go: :class:`UpstreamPool` over HTTP, or an in-memory transport."""

    async def request(
        self, origin: Origin, method: str, path: str, body: bytes, *, headers: dict[str, str], timeout_s: float
    ) -> UpstreamReply: ...

    async def close(self) -> None: ...


class _StaleConnection(UpstreamError):
    """A reused connection closed before answering anything: safe to resend once."""


class UpstreamResponse:
    """One response; its status and headers are set when :meth:`UpstreamPool.request` returns."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_first",
        "_got_bytes",
        "_head",
        "_loop",
        "_sink",
        "complete",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._conn: _Connection | None = conn
        self._loop = loop
        self._head: asyncio.Future[None] = loop.create_future()
        self._done: asyncio.Future[None] | None = None
        self._first: asyncio.Future[bytes] | None = None
        self._chunks: list[bytes] = []
        self._sink: Callable[[bytes], None] | None = None
        self.complete = False
        self.keep_alive = False
        self._error: UpstreamError | None = None
        self._got_bytes = False

    # ------------------------------------------------------------ from the connection
    def _on_head(self, status: int, headers: dict[str, str], keep_alive: bool) -> None:
        self.status, self.headers, self.keep_alive = status, headers, keep_alive
        if not self._head.done():
            self._head.set_result(None)

    def _on_complete(self) -> None:
        self.complete = True
        self._cancel_deadline()

    def _after_read(self) -> None:
        """After each socket read is parsed: deliver its body pieces, wake whoever waits."""
        chunks = self._chunks  # the parser appended the read's body pieces (see _Connection.start)
        if chunks:
            if self._sink is not None:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._sink(data)
            elif self._first is not None and not self._first.done():
                self._first.set_result(self._take_chunks())
        if self.complete:
            if self._first is not None and not self._first.done():
                self._first.set_result(self._take_chunks())
            if self._done is not None and not self._done.done():
                self._done.set_result(None)

    def _on_error(self, error: UpstreamError) -> None:
        if self.complete:
            return
        self._error = error
        self._cancel_deadline()
        for future in (self._head, self._first, self._done):
            if future is not None and not future.done():
                future.set_exception(error)

    def _until_close(self) -> bool:
        """Whether the body (its head is in) has no length and ends when the connection does."""
        if not self._head.done() or self._head.exception() is not None:
            return False
        if self.status < 200 or self.status in (204, 304):
            return False
        return "content-length" not in self.headers and "chunked" not in self.headers.get("transfer-encoding", "")

    def _take_chunks(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    def _cancel_deadline(self) -> None:
        if self._conn is not None:
            self._conn.clear_deadline(self)

    # ------------------------------------------------------------------ for the caller
    async def read(self) -> bytes:
        """The whole body (waits for its end)."""
        if not self.complete:
            self._raise_if_failed()
            self._done = self._loop.create_future()
            await self._done
        return self._take_chunks()

    async def first_chunk(self) -> bytes:
        """The first piece of body (``b""`` when the body is empty); then use :meth:`relay`."""
        if self._chunks or self.complete:
            return self._take_chunks()
        self._raise_if_failed()
        self._first = self._loop.create_future()
        return await self._first

    async def relay(self, sink: Callable[[bytes], None]) -> None:
        """Call ``sink`` with every further piece of body, as it arrives; return at its end.

        ``sink`` runs inside the connection's ``data_received`` and must not raise.
        """
        if self._chunks:
            sink(self._take_chunks())
        if self.complete:
            return
        self._raise_if_failed()
        self._sink = sink
        self._done = self._loop.create_future()
        await self._done

    def pause_reading(self) -> None:
        """Backpressure: stop reading from the engine until :meth:`resume_reading`."""
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._conn is not None and self._conn.transport is not None and not self._conn.transport.is_closing():
            self._conn.transport.resume_reading()

    def abort(self, reason: str) -> None:
        """Fail whoever waits on this response with ``reason`` and close its connection (which
        aborts the request on the engine)."""
        self._on_error(UpstreamError(reason))
        self.close()

    def close(self) -> None:
        """Release the connection: back to the pool if the response was read to its end and the
        engine keeps it alive; closed otherwise (which aborts an unfinished request)."""
        conn, self._conn = self._conn, None
        self._sink = None
        if conn is not None:
            conn.clear_deadline(self)
            conn.finish(reusable=self.complete and self.keep_alive)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine; serves one response at a time."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.parser: Any = None
        self.idle_since = 0.0
        self.closed = False
        self._header_names: list[bytes] = []
        self._header_values: list[bytes] = []
        self.on_body: Callable[[bytes], None] = _no_body  # the parser's body callback: see start
        # the response in progress must be complete by _deadline_at (see set_deadline)
        self._deadline_of: UpstreamResponse | None = None
        self._deadline_at = 0.0
        self._deadline_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # --------------------------------------------------------------- deadlines
    # One deadline per request, on a connection that serves request after request: rather than a
    # loop timer scheduled and cancelled per request, one stays scheduled while the deadline moves
    # later, and reschedules itself for the deadline in force when it fires early.

    def set_deadline(self, response: UpstreamResponse, timeout_s: float) -> None:
        """Fail ``response`` and close the connection unless it is complete in ``timeout_s``."""
        loop = response._loop
        at = loop.time() + timeout_s
        self._deadline_of, self._deadline_at, self._deadline_s = response, at, timeout_s
        if self._timer is None or self._timer_at > at:
            self._schedule(loop, at)

    def clear_deadline(self, response: UpstreamResponse) -> None:
        if self._deadline_of is response:
            self._deadline_of = None  # a scheduled timer finds nothing to do

    def _schedule(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(at, self._deadline_passed)
        self._timer_at = at

    def _deadline_passed(self) -> None:
        self._timer = None
        response = self._deadline_of
        if response is None:
            return
        if self._deadline_at - response._loop.time() > _TIMER_SLACK_S:  # moved later since: wait for it
            self._schedule(response._loop, self._deadline_at)
            return
        self._deadline_of = None
        _expire(response, self, self._deadline_s)

    # ------------------------------------------------------------ transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or self.parser is None:  # bytes nobody asked for: the connection is unusable
            self._abort()
            return
        response._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            response._on_error(UpstreamError(f"malformed response from the engine: {exc}"))
            self._abort()
            return
        chunks, sink = response._chunks, response._sink
        if chunks and sink is not None and not response.complete:  # a relayed stream: _after_read's work, in line
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            sink(data)
        else:
            response._after_read()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        response, self.response = self.response, None
        if response is not None and not response.complete and exc is None and response._until_close():
            response._on_complete()  # a body delimited by the end of the connection (RFC 9112 6.3)
            response._after_read()
        elif response is not None and not response.complete:
            if response._got_bytes:
                response._on_error(UpstreamError(f"the engine closed the connection mid-response ({exc or 'EOF'})"))
            else:
                response._on_error(_StaleConnection(f"the engine closed the connection ({exc or 'EOF'})"))

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # -------------------------------------------------------------- parser callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_names.append(name)
        self._header_values.append(value)

    def on_headers_complete(self) -> None:
        headers = {
            n.decode("latin-1").lower(): v.decode("latin-1") for n, v in zip(self._header_names, self._header_values)
        }
        self._header_names.clear()
        self._header_values.clear()
        if self.response is not None:
            self.response._on_head(self.parser.get_status_code(), headers, self.parser.should_keep_alive())

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response._on_complete()

    # ------------------------------------------------------------------ use
    def start(self, response: UpstreamResponse, request: bytes) -> None:
        self.response = response
        # body pieces go straight to the response's list (no Python call per piece), handed on once
        # the whole read is parsed: one write for many chunks; the parser reads on_body when built
        self.on_body = response._chunks.append
        self.parser = httptools.HttpResponseParser(self)
        assert self.transport is not None
        self.transport.write(request)

    def finish(self, reusable: bool) -> None:
        self.response = None
        self.parser = None
        if reusable and not self.closed and self.transport is not None and not self.transport.is_closing():
            self.idle_since = time.monotonic()
            self.pool._park(self)
        else:
            self._abort()

    def _abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections per origin ``(host, port, tls)``; one owner closes it at shutdown.

    ``idle_timeout_s`` should stay below the engines' own keep-alive timeout (uvicorn, which
    vLLM and SGLang run, closes idle connections after 5 s), so that a parked connection is
    rarely one the engine is about to close.
    """

    def __init__(
        self,
        *,
        idle_timeout_s: float = 4.0,
        max_idle_per_origin: int = 256,
        connect_timeout_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``ssl_context``: how ``https`` origins are verified (None: the system's trust store,
        host names checked)."""
        self.idle_timeout_s = idle_timeout_s
        self.max_idle_per_origin = max_idle_per_origin
        self.connect_timeout_s = connect_timeout_s
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._closed = False
        self.connections_opened = 0

    async def request(
        self, origin: Origin, method: str, path: str, body: bytes, *, headers: dict[str, str], timeout_s: float
    ) -> UpstreamResponse:
        """Send the request; return once the response's head is in (see the module doc)."""
        host, port, _tls = origin
        if self._closed:
            raise UpstreamError("the upstream pool is closed")
        head = [f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"]
        for name, value in headers.items():
            head.append(f"{name}: {value}\r\n")
        head.append("\r\n")
        raw = "".join(head).encode("latin-1") + body
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            conn = self._take_idle(origin) if attempt == 0 else None  # the retry goes on a new connection
            reused = conn is not None
            if conn is None:
                conn = await self._connect(loop, origin)
            response = UpstreamResponse(conn, loop)
            conn.set_deadline(response, timeout_s)
            conn.start(response, raw)
            try:
                await response._head
            except _StaleConnection:
                response.close()
                if reused:
                    continue
                raise UpstreamError(f"{host}:{port} closed the connection without answering") from None
            except BaseException:
                response.close()
                raise
            return response
        raise UpstreamError(f"{host}:{port} closed the connection without answering")

    async def _connect(self, loop: asyncio.AbstractEventLoop, origin: Origin) -> _Connection:
        host, port, tls = origin
        if self._closed:
            raise UpstreamError("the upstream pool is closed")
        context = self._tls_context() if tls else None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, origin),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if tls else None,
                )
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamError(
                f"TLS verification of https://{host}:{port} failed: {exc.verify_message or exc.reason}"
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamError(f"TLS handshake with https://{host}:{port} failed: {exc.reason or exc}") from None
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc!r}") from None
        self._all.add(conn)
        self.connections_opened += 1
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        """The context ``https`` origins are reached with (the system's trust store by default,
        made once)."""
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _take_idle(self, origin: Origin) -> _Connection | None:
        parked = self._idle.get(origin)
        if not parked:
            return None
        oldest_ok = time.monotonic() - self.idle_timeout_s
        while parked:
            conn = parked.pop()  # most recently used first: it is the least likely to be stale
            if conn.idle_since >= oldest_ok and not conn.closed:
                return conn
            conn._abort()
        return None

    def _park(self, conn: _Connection) -> None:
        parked = self._idle.setdefault(conn.origin, [])
        if self._closed or len(parked) >= self.max_idle_per_origin:
            conn._abort()
            return
        parked.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        parked = self._idle.get(conn.origin)
        if parked and conn in parked:
            parked.remove(conn)

    def idle_connections(self) -> int:
        return sum(len(p) for p in self._idle.values())

    async def close(self) -> None:
        """Close every connection, in use or parked."""
        self._closed = True
        for conn in list(self._all):
            conn._abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports deliver connection_lost


def _expire(response: UpstreamResponse, conn: _Connection, timeout_s: float) -> None:
    response._on_error(UpstreamError(f"no complete answer within {timeout_s:g} s"))
    conn._abort()


def _no_body(body: bytes) -> None:
    """The body callback of a connection before its first request."""
