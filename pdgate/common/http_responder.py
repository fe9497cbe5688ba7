"""How a handler of :mod:`pdgate.common.http_server` answers: :class:`Responder`, a whole
response or a stream (chunked, or ended by the connection's close for HTTP/1.0), writing
straight to the connection's transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}


class Connection(Protocol):
    """What a responder needs of its client connection."""

    transport: asyncio.Transport | None

    @property
    def write_buffer_limit(self) -> int:
        """Unsent bytes a client that is not reading may hold before it is dropped."""
        ...

    def drop(self, limit: str) -> None:
        """Abort the connection, counting the limit it hit."""
        ...


def response_head(status: int, headers: dict[str, str] | None, extra: str) -> bytes:
    """A response's status line and headers (``extra``: header lines already formatted)."""
    line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n"
    if headers:
        extra += "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    return (line + extra + "\r\n").encode("latin-1")


class Responder:
    """How a handler answers one request; see :mod:`pdgate.common.http_server`'s doc."""

    __slots__ = (
        "_bodiless",
        "_chunked",
        "_conn",
        "_flow",
        "_transport",
        "finished",
        "keep_alive",
        "paused",
        "started",
        "status",
        "streaming",
    )

    def __init__(self, conn: Connection, keep_alive: bool, *, head: bool = False, http10: bool = False) -> None:
        self._conn = conn
        self._transport = conn.transport
        self.keep_alive = keep_alive
        self._bodiless = head  # a response to HEAD: its head only (RFC 9110 9.3.2)
        self._chunked = not http10  # HTTP/1.0 knows no chunked coding: the stream ends with the connection
        self.started = False
        self.finished = False
        self.streaming = False
        self.paused = False
        self._flow: tuple[Callable[[], None], Callable[[], None]] | None = None
        self.status = 0

    @property
    def peer_host(self) -> str | None:
        """The client's address (None when unknown)."""
        peer = self._transport.get_extra_info("peername") if self._transport is not None else None
        return peer[0] if isinstance(peer, tuple) and peer else None

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        """The client certificate verified in this connection's TLS handshake (``ssl``'s
        ``getpeercert()`` dict), or None: plain HTTP, no certificate sent, or none asked for."""
        cert = self._transport.get_extra_info("peercert") if self._transport is not None else None
        return cert if isinstance(cert, dict) and cert else None

    @property
    def client_gone(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def send(
        self, status: int, body: bytes, *, content_type: str = "application/json", headers: dict[str, str] | None = None
    ) -> None:
        """A whole response."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.finished = True
        self.status = status
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        connection = "keep-alive" if self.keep_alive else "close"
        extra = f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: {connection}\r\n"
        transport.write(response_head(status, headers, extra) + (b"" if self._bodiless else body))

    def send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self.send(status, json.dumps(data).encode(), headers=headers)

    def start(
        self, status: int, *, content_type: str, headers: dict[str, str] | None = None, first: bytes = b""
    ) -> None:
        """Start a chunked response, optionally with its first piece in the same write."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.streaming = True
        self.status = status
        if not self._chunked:
            self.keep_alive = False
        framing = "Transfer-Encoding: chunked\r\n" if self._chunked else ""
        connection = "keep-alive" if self.keep_alive else "close"
        data = response_head(status, headers, f"Content-Type: {content_type}\r\n{framing}Connection: {connection}\r\n")
        if first and not self._bodiless:
            data += b"%x\r\n%b\r\n" % (len(first), first) if self._chunked else first
        if not self.client_gone:
            self._transport.write(data)  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        """One chunk of a started stream (empty data is skipped: it would end the stream). A client
        with more than ``max_write_buffer_bytes`` unsent is dropped instead."""
        transport = self._transport
        if data and transport is not None and not transport.is_closing() and not self._bodiless:
            if self.paused and transport.get_write_buffer_size() > self._conn.write_buffer_limit:
                self._conn.drop("write_buffer")
                return
            transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)

    def end(self, last: bytes = b"") -> None:
        """End a started stream, optionally with a last piece in the same write."""
        if self.finished:
            return
        self.finished = True
        if self._bodiless:
            return
        if not self._chunked:  # the connection's close ends the stream (see _after)
            data = last
        else:
            data = b"%x\r\n%b\r\n0\r\n\r\n" % (len(last), last) if last else b"0\r\n\r\n"
        if data and not self.client_gone:
            self._transport.write(data)  # type: ignore[union-attr]

    def on_flow(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        """Hooks for backpressure: ``pause`` when the client's buffer fills, ``resume`` when it drains."""
        self._flow = (pause, resume)
        if self.paused:
            pause()

    def _pause(self) -> None:
        self.paused = True
        if self._flow is not None:
            self._flow[0]()

    def _resume(self) -> None:
        self.paused = False
        if self._flow is not None:
            self._flow[1]()
