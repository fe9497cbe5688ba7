"""Property tests of the gateway's HTTP/1.1 server (pdgate/common/http_server.py).

Most examples drive :class:`HttpServerProtocol` through :class:`LoopbackTransport`, a transport
that behaves as asyncio's selector transport does (writes collected in order, reading paused and
resumed, ``connection_lost`` on the loop's next turn after ``close``, nothing delivered once
closing) but cuts the client's bytes exactly where the example says: a real socket may merge
writes, this one never does. The last two properties run the same checks over real loopback
sockets.

The properties:

* any sequence of well-formed requests (methods, targets, headers, bodies framed by
  Content-Length or chunked in any chunk sizes with extensions, HTTP/1.0 and 1.1, keep-alive or
  not, ``Expect: 100-continue``), pipelined and cut at any bytes, reaches the handler exactly,
  in order, one at a time, up to the first that ends the connection; the client reads back one
  well-framed response per request in order (a ``100 Continue`` only where asked for, never
  inside another response) and the connection is then closed or kept as the requests said;
* any bytes at all (noise, or valid requests with bytes changed) get responses for the valid
  requests before them, then at most one 4xx with an OpenAI-shaped JSON error, and the
  connection is closed within the timeouts; the server never raises, never sends a 5xx, and
  serves the next connection;
* a body over ``max_body_bytes`` is a 413 (before it is read when Content-Length tells), one at
  or under it reaches the handler whole.

The tests at the end pin bugs these properties found in http_server.py, since fixed.

``PDGATE_PROPERTY_EXAMPLES`` raises the number of examples (the default keeps this file fast).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import string
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import event as tally
from hypothesis import given, settings
from hypothesis import strategies as st
from support.waiting import wait_until_async

from pdgate.common.http_server import HttpRequest, HttpServer, HttpServerProtocol, Responder

pytestmark = pytest.mark.unit

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
URL_CHARS = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in "?#")
VALUE_CHARS = "".join(map(chr, range(0x21, 0x7F))) + "".join(map(chr, range(0xA0, 0x100)))
# header names a request may only carry as this test chooses (they change the framing or the handler's reply)
RESERVED = {"content-length", "transfer-encoding", "connection", "proxy-connection", "expect", "upgrade"}
RESERVED |= {"x-reply", "x-yields"}
ERROR_STATUSES = {400, 408, 413, 417}
WAIT_S = 2.0  # the longest an example waits for the server (it needs only loop turns, or 20 ms timeouts)
# bytes that make a request go wrong in interesting ways
NOISE = (
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b";",
    b"\x7f",
    b"\xff",
    b"0",
    b"f",
    b"-1",
    b"99999999999999999999",
    b"HTTP/1.1",
    b"Content-Length: 5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Expect: 100-continue\r\n",
    b"Expect: nothing\r\n",
    b"Connection: Upgrade\r\nUpgrade: h2c\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
)


def property_settings(default_examples: int) -> settings:
    """Deterministic, no example database written into the repository; more examples on request."""
    examples = int(os.environ.get("PDGATE_PROPERTY_EXAMPLES") or default_examples)
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None)


# ------------------------------------------------------------------------- the transport
class LoopbackTransport(asyncio.Transport):
    """The server's end of one connection, without a socket (see the module doc).

    ``send`` is the client writing: each piece is delivered by its own ``data_received`` call on
    a later turn of the loop, never merged with another, and held while reading is paused.
    ``received`` is everything the server wrote, in order.
    """

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__(extra={"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)})
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        self._inbox: deque[bytes] = deque()
        self._reading = True
        self._closing = False
        self.lost = False  # connection_lost was called
        self.received = bytearray()
        protocol.connection_made(self)

    # -- asyncio.Transport
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:  # (the selector transport drops writes once closed with an empty buffer)
            self.received += data

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._loop.call_soon(self._connection_lost)

    def abort(self) -> None:
        self.close()

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._loop.call_soon(self._deliver)

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    # -- the client's side
    def send(self, data: bytes) -> None:
        self._inbox.append(data)
        self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        if self._reading and self._inbox and not self._closing:
            self._protocol.data_received(self._inbox.popleft())
            if self._inbox:
                self._loop.call_soon(self._deliver)

    def _connection_lost(self) -> None:
        self.lost = True
        self._protocol.connection_lost(None)


def connect(server: HttpServer) -> LoopbackTransport:
    return LoopbackTransport(HttpServerProtocol(server))


# --------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    """A well-formed request and how it is written."""

    method: str
    path: str
    query: str | None
    version: str  # "1.1" or "1.0"
    headers: tuple[tuple[str, str], ...]
    body: bytes
    framing: str  # "length", "none" (no body, no Content-Length) or "chunked"
    chunks: tuple[int, ...]  # chunked: the chunk sizes
    extensions: bool  # chunked: chunk extensions
    connection: str | None  # the Connection header's value
    expect: bool  # Expect: 100-continue
    reply: str  # how the handler answers: send, stream, stream-first, stream-last
    yields: int  # loop turns the handler waits before and while it answers

    @property
    def keep_alive(self) -> bool:
        if self.version == "1.0":
            return self.connection == "keep-alive"
        return self.connection != "close"

    @property
    def kept_alive(self) -> bool:
        """Whether the connection goes on after the answer: not after a stream to an HTTP/1.0
        client, which only the connection's close can end (whatever the request asked)."""
        return self.keep_alive and not (self.version == "1.0" and self.reply.startswith("stream"))

    @property
    def may_get_continue(self) -> bool:
        return (
            self.expect
            and self.version == "1.1"
            and self.framing != "none"
            and (self.framing == "chunked" or bool(self.body))
        )

    def encode(self) -> bytes:
        target = self.path + ("" if self.query is None else "?" + self.query)
        lines = [f"{self.method} {target} HTTP/{self.version}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        lines.append(f"X-Reply: {self.reply}")
        lines.append(f"X-Yields: {self.yields}")
        if self.connection is not None:
            lines.append(f"Connection: {self.connection}")
        if self.expect:
            lines.append("Expect: 100-continue")
        if self.framing == "length":
            lines.append(f"Content-Length: {len(self.body)}")
        elif self.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + (self._chunked() if self.framing == "chunked" else self.body)

    def _chunked(self) -> bytes:
        out, at = bytearray(), 0
        ext = b";ext=1;flag" if self.extensions else b""
        for size in self.chunks:
            out += b"%x%s\r\n%s\r\n" % (size, ext, self.body[at : at + size])
            at += size
        return bytes(out) + b"0" + ext + b"\r\n\r\n"

    def expected_headers(self) -> dict[str, str]:
        """The headers the handler is to see: lower-case names, the last of a repeated one."""
        seen: dict[str, str] = {}
        for name, value in self.headers:
            seen[name.lower()] = value
        return seen


header_names = st.text(TCHAR, min_size=1, max_size=12).filter(lambda n: n.lower() not in RESERVED)
header_values = st.text(VALUE_CHARS + " \t", max_size=20).map(lambda v: v.strip(" \t"))


@st.composite
def requests(draw: st.DrawFn, max_body: int = 300) -> Request:
    version = draw(st.sampled_from(["1.1"] * 5 + ["1.0"]))
    # (a request that ends the connection ends the sequence: most keep it, to pipeline more)
    if version == "1.1":
        connection = draw(st.sampled_from([None, None, None, "keep-alive", "close"]))
    else:
        connection = draw(st.sampled_from(["keep-alive", "keep-alive", None, "close"]))
    body = draw(st.binary(max_size=max_body))
    framings = ["length", "chunked"] if version == "1.1" else ["length"]
    framing = draw(st.sampled_from([*framings, "none"] if not body else framings))
    chunks: list[int] = []
    while sum(chunks) < len(body):
        chunks.append(draw(st.integers(1, len(body) - sum(chunks))))
    names = draw(st.lists(header_names, max_size=5))
    repeated = draw(st.lists(st.sampled_from(names), max_size=2)) if names else []
    headers = tuple((name, draw(header_values)) for name in [*names, *(n.swapcase() for n in repeated)])
    return Request(
        method=draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])),
        path="/" + draw(st.text(URL_CHARS, max_size=20)),
        query=draw(st.none() | st.text(URL_CHARS + "?", max_size=20)),
        version=version,
        headers=headers,
        body=body,
        framing=framing,
        chunks=tuple(chunks),
        extensions=draw(st.booleans()),
        connection=connection,
        expect=draw(st.booleans()),
        reply=draw(st.sampled_from(["send", "stream", "stream-first", "stream-last"])),
        yields=draw(st.integers(0, 3)),
    )


def sequences(items: st.SearchStrategy[Request], most: int) -> st.SearchStrategy[list[Request]]:
    """1 to ``most`` requests, each length as likely (hypothesis favours short lists)."""
    return st.sampled_from(range(1, most + 1)).flatmap(lambda n: st.lists(items, min_size=n, max_size=n))


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` as the client's writes: cut at arbitrary bytes (sometimes at every byte)."""
    if data and len(data) < 400 and draw(st.integers(0, 9)) == 0:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=10)))) if len(data) > 1 else []
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


# --------------------------------------------------------------------------- responses
@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def read_responses(data: bytes, *, closed: bool = False) -> tuple[list[Response], bytes]:
    """The complete responses at the start of ``data`` and what follows them (the start of an
    incomplete one). Strict: anything that is not a well-framed HTTP/1.1 response fails. A stream
    to an HTTP/1.0 client (no framing, ``Connection: close``) ends with the connection: complete
    once ``closed``."""
    out: list[Response] = []
    pos = 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return out, data[pos:]
        lines = data[pos:end].decode("latin-1").split("\r\n")
        status_line = re.fullmatch(r"HTTP/1\.1 (\d{3}) [^\r\n]+", lines[0])
        assert status_line, f"not a status line: {lines[0]!r}"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(": ")
            assert sep and re.fullmatch(f"[{re.escape(TCHAR)}]+", name), f"bad header line {line!r}"
            assert name.lower() not in headers, f"repeated header {name!r}"
            headers[name.lower()] = value
        status, start = int(status_line[1]), end + 4
        if status < 200:
            assert not headers, "an interim response carries no headers here"
            out.append(Response(status, headers, b""))
            pos = start
            continue
        if "content-length" in headers:
            assert "transfer-encoding" not in headers
            length = int(headers["content-length"])
            if len(data) < start + length:
                return out, data[pos:]
            body, pos = data[start : start + length], start + length
        elif "transfer-encoding" not in headers:
            assert headers.get("connection") == "close", f"no framing: {headers}"
            if not closed:
                return out, data[pos:]
            body, pos = data[start:], len(data)
        else:
            assert headers.get("transfer-encoding") == "chunked", f"no framing: {headers}"
            chunked = read_chunked(data, start)
            if chunked is None:
                return out, data[pos:]
            body, pos = chunked
        out.append(Response(status, headers, body))


def read_chunked(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """A chunked body starting at ``pos``: the body and where it ends, None when incomplete."""
    body = bytearray()
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None
        size_line = data[pos:end]
        assert re.fullmatch(rb"[0-9a-f]+", size_line), f"bad chunk size line {size_line!r}"
        size = int(size_line, 16)
        if len(data) < end + 2 + size + 2:
            return None
        assert data[end + 2 + size : end + 4 + size] == b"\r\n", "a chunk not ended by CRLF"
        if size == 0:
            return bytes(body), end + 4
        body += data[end + 2 : end + 2 + size]
        pos = end + 4 + size


def assert_openai_error(response: Response) -> None:
    assert response.status in ERROR_STATUSES, response
    assert response.headers["connection"] == "close" and response.headers["content-type"] == "application/json"
    error = json.loads(response.body)
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert isinstance(error["error"]["message"], str) and error["error"]["message"]
    assert error["error"]["type"] == "invalid_request_error"


# ----------------------------------------------------------------------------- the handler
def reply_body(n: int, request: HttpRequest) -> bytes:
    return f"reply {n} to {request.method} {request.path} ({len(request.body)} bytes)\n".encode() * 3


@dataclass
class Recorder:
    """The handler: records what it is given and answers as the request's X-Reply says."""

    seen: list[HttpRequest] = field(default_factory=list)
    running: int = 0
    most_running: int = 0
    errors: list[BaseException] = field(default_factory=list)

    async def handle(self, request: HttpRequest, responder: Responder) -> None:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            n = len(self.seen)
            self.seen.append(request)
            asked = request.headers.get("x-yields", "")
            yields = int(asked) if asked in ("0", "1", "2", "3") else 0  # (mangled requests ask for anything)
            for _ in range(yields):
                await asyncio.sleep(0)
            await self._reply(n, request, responder, request.headers.get("x-reply", "send"), yields)
        except Exception as exc:  # (the server would answer 500: a test failure either way)
            self.errors.append(exc)
            raise
        finally:
            self.running -= 1

    @staticmethod
    async def _reply(n: int, request: HttpRequest, responder: Responder, mode: str, yields: int) -> None:
        body = reply_body(n, request)
        headers = {"X-N": str(n)}
        if mode not in ("stream", "stream-first", "stream-last"):
            responder.send(200, body, content_type="text/plain", headers=headers)
            return
        third = len(body) // 3
        pieces = [body[:third], body[third : 2 * third], body[2 * third :]]
        first = pieces.pop(0) if mode == "stream-first" else b""
        last = pieces.pop() if mode == "stream-last" else b""
        responder.start(200, content_type="text/plain", headers=headers, first=first)
        for piece in pieces:
            for _ in range(yields):
                await asyncio.sleep(0)
            responder.write(piece)
        responder.end(last)


# ---------------------------------------------------------------------------- running
def run_example(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run one example on a loop of its own; an exception the loop caught (a protocol callback
    that raised) fails it."""

    async def main() -> None:
        caught: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: caught.append(context))
        await scenario()
        assert not caught, caught

    asyncio.run(main())


async def send_all(transport: LoopbackTransport, pieces: list[bytes], pauses: list[int]) -> None:
    """Write ``pieces``, letting the loop turn ``pauses[i]`` times after piece i."""
    for piece, pause in zip(pieces, pauses + [0] * len(pieces), strict=False):
        transport.send(piece)
        for _ in range(pause):
            await asyncio.sleep(0)


def served_part(sequence: list[Request]) -> list[Request]:
    """The requests served: up to the first that ends the connection."""
    for n, request in enumerate(sequence):
        if not request.kept_alive:
            return sequence[: n + 1]
    return sequence


def check_replies(responses: list[Response], served: list[Request]) -> None:
    """One response per served request, in order, each after at most one 100 Continue it asked for."""
    at = 0
    for n, request in enumerate(served):
        if at < len(responses) and responses[at].status == 100:
            assert request.may_get_continue, f"a 100 Continue that request {n} did not ask for"
            at += 1
        assert at < len(responses), f"no response to request {n}"
        response = responses[at]
        assert (response.status, response.headers.get("x-n")) == (200, str(n)), (n, response)
        assert response.headers["connection"] == ("keep-alive" if request.kept_alive else "close")
        at += 1
    assert at == len(responses), f"responses nobody asked for: {responses[at:]}"


def check_seen(seen: list[HttpRequest], served: list[Request]) -> None:
    assert len(seen) == len(served)
    for got, sent in zip(seen, served, strict=True):
        assert (got.method, got.path, got.query) == (sent.method, sent.path, sent.query or "")
        assert got.body == sent.body
        assert got.keep_alive == sent.keep_alive
        for name, value in sent.expected_headers().items():
            assert got.headers.get(name) == value, (name, got.headers)


# --------------------------------------------------------------------------- properties
@property_settings(250)
@given(sequence=sequences(requests(), 6), data=st.data())
def test_pipelined_requests_cut_anywhere_are_served_in_order(sequence: list[Request], data: st.DataObject) -> None:
    served = served_part(sequence)  # (bytes after a request that ends the connection: test_a_request_that_closes...)
    pieces = data.draw(cut(b"".join(r.encode() for r in served)), label="writes")
    pauses = data.draw(st.lists(st.integers(0, 3), max_size=len(pieces)), label="loop turns between writes")

    async def scenario() -> None:
        recorder = Recorder()
        server = HttpServer(recorder.handle, max_body_bytes=1 << 20)
        transport = connect(server)
        await send_all(transport, pieces, pauses)

        def finished() -> bool:
            responses, rest = read_responses(bytes(transport.received), closed=transport.lost)
            finals = [r for r in responses if r.status >= 200]
            return len(finals) == len(served) and not rest and server.active_requests() == 0

        await wait_until_async(finished, timeout=WAIT_S, interval=0)
        if not served[-1].kept_alive:
            await wait_until_async(lambda: transport.lost, timeout=WAIT_S, interval=0)
        else:
            await asyncio.sleep(0)
            assert not transport.is_closing()  # kept alive for the next request
        responses, _ = read_responses(bytes(transport.received), closed=transport.lost)
        check_replies(responses, served)
        check_seen(recorder.seen, served)
        assert recorder.most_running == 1 and not recorder.errors
        tally(
            f"{len(served)} requests, the last {'closing' if not served[-1].kept_alive else 'keeping'} the connection"
        )
        tally(f"a 100 Continue went out: {any(r.status == 100 for r in responses)}")
        tally(f"chunked requests: {any(r.framing == 'chunked' for r in served)}")
        await server.close(grace_s=0)

    run_example(scenario)


@property_settings(60)
@given(sequence=sequences(requests(max_body=60).map(lambda r: replace(r, expect=True)), 4), data=st.data())
def test_a_client_waiting_for_100_continue_is_never_left_waiting(sequence: list[Request], data: st.DataObject) -> None:
    """As curl does: a request with ``Expect: 100-continue`` holds its body back until the 100
    comes (the requests before it pipelined, their answers still on the way)."""
    served = served_part(sequence)

    async def scenario() -> None:
        recorder = Recorder()
        server = HttpServer(recorder.handle, max_body_bytes=1 << 20)
        transport = connect(server)
        waited = 0
        for request in served:
            wire = request.encode()
            if not request.may_get_continue:
                await send_all(transport, data.draw(cut(wire), label="writes"), [])
                continue
            head, _, body = wire.partition(b"\r\n\r\n")
            await send_all(transport, data.draw(cut(head + b"\r\n\r\n"), label="head"), [])
            waited += 1
            tally("a client waited for 100 Continue")
            await wait_until_async(
                lambda expected=waited: (
                    [r.status for r in read_responses(bytes(transport.received))[0]].count(100) == expected
                ),
                timeout=WAIT_S,
                interval=0,
                message=f"the 100 Continue for request {served.index(request)}",
            )
            await send_all(transport, data.draw(cut(body), label="body"), [])
        await wait_until_async(
            lambda: (
                len([r for r in read_responses(bytes(transport.received), closed=transport.lost)[0] if r.status >= 200])
                == len(served)
            ),
            timeout=WAIT_S,
            interval=0,
        )
        responses, rest = read_responses(bytes(transport.received), closed=transport.lost)
        assert not rest
        check_replies(responses, served)
        check_seen(recorder.seen, served)
        await server.close(grace_s=0)

    run_example(scenario)


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """Bytes a client should not send: noise, or valid requests with some bytes changed."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=300))
    data = bytearray(b"".join(r.encode() for r in draw(st.lists(requests(max_body=40), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        change = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        noise = draw(st.sampled_from(NOISE) | st.binary(min_size=1, max_size=3))
        if change == "replace":
            data[at : at + len(noise)] = noise
        elif change == "insert":
            data[at:at] = noise
        elif change == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


@property_settings(200)
@given(wire=mangled(), data=st.data())
def test_any_bytes_get_at_most_one_4xx_json_error_and_a_close(wire: bytes, data: st.DataObject) -> None:
    pieces = data.draw(cut(wire), label="writes")

    async def scenario() -> None:
        recorder = Recorder()
        server = HttpServer(recorder.handle, max_body_bytes=100, keepalive_timeout_s=0.02, request_timeout_s=0.02)
        transport = connect(server)
        await send_all(transport, pieces, [])
        await wait_until_async(lambda: transport.lost, timeout=WAIT_S, interval=0.005)  # never left hanging
        responses, rest = read_responses(bytes(transport.received), closed=True)
        assert not rest, f"bytes that are no response: {rest[:100]!r}"
        finals = [r for r in responses if r.status >= 200]
        errors = [r for r in finals if r.status != 200]
        assert len(errors) <= 1 and finals[-len(errors) or len(finals) :] == errors, "the error is the last word"
        for response in errors:
            assert_openai_error(response)
        assert len(finals) - len(errors) == len(recorder.seen)  # every request the handler had was answered
        assert not recorder.errors

        fresh = connect(server)  # and the server goes on serving
        fresh.send(b"GET /next HTTP/1.1\r\nHost: test\r\n\r\n")
        await wait_until_async(lambda: read_responses(bytes(fresh.received))[0], timeout=WAIT_S, interval=0)
        assert read_responses(bytes(fresh.received))[0][0].status == 200
        await server.close(grace_s=0)

    run_example(scenario)


@property_settings(150)
@given(
    limit=st.integers(0, 200),
    delta=st.one_of(st.integers(-3, 3), st.integers(-200, 200)),
    framing=st.sampled_from(["length", "length-zeros", "chunked"]),
    expect=st.booleans(),
    data=st.data(),
)
def test_bodies_over_the_limit_are_413_and_others_arrive_whole(
    limit: int, delta: int, framing: str, expect: bool, data: st.DataObject
) -> None:
    body = data.draw(st.binary(min_size=max(0, limit + delta), max_size=max(0, limit + delta)), label="body")
    head = b"POST /up HTTP/1.1\r\nHost: test\r\n" + (b"Expect: 100-continue\r\n" if expect else b"")
    if framing == "chunked":
        sizes = []
        while sum(sizes) < len(body):
            sizes.append(data.draw(st.integers(1, len(body) - sum(sizes)), label="chunk"))
        parts, at = [], 0
        for size in sizes:
            parts.append(b"%x\r\n%s\r\n" % (size, body[at : at + size]))
            at += size
        wire = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(parts) + b"0\r\n\r\n"
    else:
        zeros = b"00" if framing == "length-zeros" else b""
        wire = head + b"Content-Length: " + zeros + str(len(body)).encode() + b"\r\n\r\n" + body
    pieces = data.draw(cut(wire), label="writes")

    async def scenario() -> None:
        recorder = Recorder()
        server = HttpServer(recorder.handle, max_body_bytes=limit)
        transport = connect(server)
        await send_all(transport, pieces, [])
        await wait_until_async(
            lambda: [r for r in read_responses(bytes(transport.received))[0] if r.status >= 200],
            timeout=5,
            interval=0,
        )
        responses, rest = read_responses(bytes(transport.received))
        assert not rest
        statuses = [r.status for r in responses]
        if len(body) > limit:
            # Content-Length tells before the body is read: no 100 asks for a body that is refused
            assert statuses == [413] or (framing == "chunked" and expect and statuses == [100, 413]), statuses
            assert_openai_error(responses[-1])
            assert recorder.seen == []
            await wait_until_async(lambda: transport.lost, timeout=WAIT_S, interval=0)
        else:
            assert statuses in ([200], [100, 200]) and (expect or statuses == [200]), statuses
            assert [r.body for r in recorder.seen] == [body]
        await server.close(grace_s=0)

    run_example(scenario)


# --------------------------------------------------------------- the same over real sockets
async def exchange_over_socket(server: HttpServer, pieces: list[bytes], until: Callable[[bytes], bool]) -> bytes:
    """Write ``pieces`` to a real loopback connection and read until ``until(received)`` or EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    received = bytearray()
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        while not until(bytes(received)):
            try:
                data = await asyncio.wait_for(reader.read(65536), WAIT_S)
            except ConnectionError:
                break
            if not data:
                break
            received += data
    finally:
        writer.close()
    return bytes(received)


@property_settings(30)
@given(sequence=sequences(requests(), 4), data=st.data())
def test_over_a_real_socket_pipelined_requests_are_served_in_order(
    sequence: list[Request], data: st.DataObject
) -> None:
    served = served_part(sequence)  # (bytes after a request that ends the connection: test_a_request_that_closes...)
    pieces = data.draw(cut(b"".join(r.encode() for r in served)), label="writes")

    def complete(received: bytes) -> bool:
        responses, rest = read_responses(received)
        return len([r for r in responses if r.status >= 200]) == len(served) and not rest

    async def scenario() -> None:
        recorder = Recorder()
        server = HttpServer(recorder.handle, max_body_bytes=1 << 20)
        await server.start("127.0.0.1", 0)
        try:
            received = await exchange_over_socket(server, pieces, complete)  # (or until closed)
            responses, rest = read_responses(received, closed=True)
            assert not rest
            check_replies(responses, served)
            check_seen(recorder.seen, served)
        finally:
            await server.close(grace_s=0)

    run_example(scenario)


@property_settings(30)
@given(wire=mangled(), data=st.data())
def test_over_a_real_socket_bad_bytes_end_in_one_4xx_and_the_server_serves_on(wire: bytes, data: st.DataObject) -> None:
    pieces = data.draw(cut(wire), label="writes")

    async def scenario() -> None:
        recorder = Recorder()
        server = HttpServer(recorder.handle, max_body_bytes=100, keepalive_timeout_s=0.05, request_timeout_s=0.05)
        await server.start("127.0.0.1", 0)
        try:
            received = await exchange_over_socket(server, pieces, lambda _: False)  # read until closed
            responses, rest = read_responses(received, closed=True)
            assert not rest
            finals = [r for r in responses if r.status >= 200]
            errors = [r for r in finals if r.status != 200]
            assert len(errors) <= 1 and finals[-len(errors) or len(finals) :] == errors
            for response in errors:
                assert_openai_error(response)
            again = await exchange_over_socket(
                server, [b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n"], lambda r: bool(read_responses(r)[0])
            )
            assert read_responses(again)[0][0].status == 200
        finally:
            await server.close(grace_s=0)

    run_example(scenario)


# ------------------------------------------------------------- bugs found, not fixed yet
def serve_once(wire: list[bytes], check: Callable[[LoopbackTransport, Recorder], None]) -> None:
    """Send ``wire`` (one write each) on a fresh connection; ``check`` once the server is idle."""

    async def scenario() -> None:
        recorder = Recorder()
        server = HttpServer(recorder.handle, max_body_bytes=1 << 20)
        transport = connect(server)
        await send_all(transport, wire, [])
        await wait_until_async(
            lambda: transport.lost or (server.active_requests() == 0 and bool(transport.received)),
            timeout=WAIT_S,
            interval=0,
        )
        check(transport, recorder)
        await server.close(grace_s=0)

    run_example(scenario)


def test_a_request_that_closes_the_connection_is_answered_whatever_follows_it() -> None:
    first = b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n"
    closing = b"GET /b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    after = b"GET /c HTTP/1.1\r\nHost: t\r\n\r\n"

    def check(transport: LoopbackTransport, recorder: Recorder) -> None:
        assert [r.path for r in recorder.seen] == ["/a", "/b"]
        assert [r.status for r in read_responses(bytes(transport.received))[0]] == [200, 200]

    serve_once([first + closing + after], check)


def test_trailer_fields_do_not_change_the_request_headers() -> None:
    wire = (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nX-Pdgate-Tenant: alpha\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\nX-Pdgate-Tenant: beta\r\n\r\n"
    )

    def check(transport: LoopbackTransport, recorder: Recorder) -> None:
        assert recorder.seen[0].body == b"{}"
        assert recorder.seen[0].headers["x-pdgate-tenant"] == "alpha"

    serve_once([wire], check)


def test_a_streamed_response_to_http10_is_not_chunked() -> None:
    def check(transport: LoopbackTransport, recorder: Recorder) -> None:
        head = bytes(transport.received).split(b"\r\n\r\n", 1)[0].lower()
        assert b"transfer-encoding" not in head
        assert transport.is_closing()  # the end of the body is the end of the connection
        assert bytes(transport.received).endswith(b"\n")  # the whole reply, unframed

    serve_once([b"GET /s HTTP/1.0\r\nX-Reply: stream\r\n\r\n"], check)


def test_a_response_to_head_has_no_body() -> None:
    def check(transport: LoopbackTransport, recorder: Recorder) -> None:
        data = bytes(transport.received)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert b"content-length: " in head.lower()  # the length the GET would have had
        second = rest.partition(b"\r\n\r\n")[0]  # what a client reads as the next response
        assert second.startswith(b"HTTP/1.1 200 OK\r\n"), rest[:80]

    serve_once([b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\nGET /y HTTP/1.1\r\nHost: t\r\n\r\n"], check)
