"""The pooled keep-alive HTTP/1.1 client (pdgate/common/http_client.py) against real loopback servers.

Well-behaved engines are played by aiohttp.web; misbehaving ones (closing kept-alive connections,
malformed responses, stalls) by raw asyncio servers whose every connection is recorded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from support.waiting import wait_until_async

from pdgate.common.http_client import UpstreamError, UpstreamPool, UpstreamResponse

pytestmark = pytest.mark.unit

TIMEOUT = 5.0  # a request's deadline where the test is not about deadlines


# ---------------------------------------------------------------------------- helpers
class Peer:
    """One connection accepted by a :class:`RawServer`, seen from the server's side."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.requests: list[tuple[str, str, bytes]] = []  # (method, path, body)
        self.eof = asyncio.Event()  # the client closed its side

    async def read_request(self) -> tuple[str, str, dict[str, str], bytes] | None:
        """The next request, or None once the client closes the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((method, path, body))
        return method, path, headers, body

    def respond(self, body: bytes = b"ok", status: int = 200, extra: str = "") -> None:
        self.writer.write(f"HTTP/1.1 {status} OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body)

    async def until_eof(self) -> None:
        """Read (and drop) whatever comes until the client closes the connection."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.eof.set()


class RawServer:
    """An asyncio server on 127.0.0.1:0 running ``behaviour(peer)`` for each connection."""

    def __init__(self, behaviour: Callable[[Peer], Awaitable[None]]) -> None:
        self.behaviour = behaviour
        self.peers: list[Peer] = []
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def origin(self) -> tuple[str, int, bool]:
        return ("127.0.0.1", self.port, False)

    @property
    def requests(self) -> list[tuple[int, str]]:
        return sorted((p.index, path) for p in self.peers for _, path, _ in p.requests)

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        peer = Peer(len(self.peers), reader, writer)
        self.peers.append(peer)
        try:
            await self.behaviour(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            peer.eof.set()
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for peer in self.peers:
            peer.writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def keep_alive(peer: Peer) -> None:
    """A well-behaved keep-alive engine: answers every request; ``/hold`` sends a head and part of
    a chunked body, then waits for the client to go away."""
    while (request := await peer.read_request()) is not None:
        _, path, _, _ = request
        if path == "/hold":
            peer.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await peer.until_eof()
            return
        peer.respond(path.encode())


@pytest.fixture
async def raw_server():
    servers: list[RawServer] = []

    async def start(behaviour: Callable[[Peer], Awaitable[None]]) -> RawServer:
        server = await RawServer(behaviour).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def make_pool():
    pools: list[UpstreamPool] = []

    def make(**kw) -> UpstreamPool:
        pool = UpstreamPool(**kw)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


class WebEngine:
    """A real aiohttp.web engine; ``peers`` is every client address it served from."""

    def __init__(self) -> None:
        self.peers: set[tuple] = set()
        self.port = 0
        self.runner: web.AppRunner | None = None

    @property
    def origin(self) -> tuple[str, int, bool]:
        return ("127.0.0.1", self.port, False)

    async def start(self) -> WebEngine:
        app = web.Application(middlewares=[self._record])
        app.router.add_post("/echo", self._echo)
        app.router.add_get("/stream", self._stream)
        app.router.add_get("/empty", self._empty)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    @web.middleware
    async def _record(self, request: web.Request, handler):
        self.peers.add(request.transport.get_extra_info("peername"))
        return await handler(request)

    async def _echo(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "body": (await request.read()).decode(),
                "x_test": request.headers.get("X-Test"),
                "content_length": request.headers.get("Content-Length"),
            }
        )

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(20):
            await resp.write(f"data: {i}\n\n".encode())
            if i % 5 == 4:
                await asyncio.sleep(0.01)  # pacing the fake engine: the body arrives in several socket reads
        await resp.write_eof()
        return resp

    async def _empty(self, request: web.Request) -> web.Response:
        return web.Response(status=204)


STREAM_BODY = b"".join(f"data: {i}\n\n".encode() for i in range(20))


@pytest.fixture
async def engine():
    server = await WebEngine().start()
    yield server
    await server.runner.cleanup()


async def fetch(
    pool: UpstreamPool, origin, path: str = "/", method: str = "GET", body: bytes = b"", timeout_s: float = TIMEOUT
) -> tuple[UpstreamResponse, bytes]:
    response = await pool.request(origin, method, path, body, headers={}, timeout_s=timeout_s)
    try:
        return response, await response.read()
    finally:
        response.close()


# ----------------------------------------------------------------------------- bodies
async def test_non_streamed_response_is_read_whole(engine, make_pool):
    pool = make_pool()
    response = await pool.request(
        engine.origin,
        "POST",
        "/echo?a=1",
        b'{"prompt": "hi"}',
        headers={"X-Test": "yes", "Content-Type": "application/json"},
        timeout_s=TIMEOUT,
    )
    try:
        assert response.status == 200
        assert response.headers["content-type"] == "application/json; charset=utf-8"  # names lower-cased
        assert response.keep_alive is True
        data = json.loads(await response.read())
        assert response.complete
    finally:
        response.close()
    assert data == {
        "method": "POST",
        "path": "/echo?a=1",
        "body": '{"prompt": "hi"}',
        "x_test": "yes",
        "content_length": "16",
    }
    assert pool.idle_connections() == 1  # read to its end: parked for reuse


async def test_chunked_response_relayed_in_order(engine, make_pool):
    pool = make_pool()
    response = await pool.request(engine.origin, "GET", "/stream", b"", headers={}, timeout_s=TIMEOUT)
    try:
        assert response.status == 200 and response.headers["transfer-encoding"] == "chunked"
        first = await response.first_chunk()
        assert first.startswith(b"data: 0\n\n")
        pieces: list[bytes] = []
        await response.relay(pieces.append)
        assert response.complete
    finally:
        response.close()
    assert first + b"".join(pieces) == STREAM_BODY  # every byte, in order, framing removed
    assert len(pieces) >= 2 and all(pieces)  # delivered as it arrived, never an empty piece
    assert pool.idle_connections() == 1


async def test_empty_body_first_chunk_is_empty_and_relay_returns(engine, make_pool):
    pool = make_pool()
    response = await pool.request(engine.origin, "GET", "/empty", b"", headers={}, timeout_s=TIMEOUT)
    try:
        assert response.status == 204
        assert await response.first_chunk() == b""
        pieces: list[bytes] = []
        await asyncio.wait_for(response.relay(pieces.append), 1)
        assert pieces == []
    finally:
        response.close()


# -------------------------------------------------------------------------- keep-alive
async def test_connection_reused_for_sequential_requests(engine, make_pool):
    pool = make_pool()
    for i in range(3):
        response, body = await fetch(pool, engine.origin, f"/echo?i={i}", "POST", b"x")
        assert response.status == 200 and json.loads(body)["path"] == f"/echo?i={i}"
    response = await pool.request(engine.origin, "GET", "/stream", b"", headers={}, timeout_s=TIMEOUT)
    await response.first_chunk()
    await response.relay(lambda data: None)
    response.close()
    _, body = await fetch(pool, engine.origin, "/echo", "POST")
    assert json.loads(body)["path"] == "/echo"
    assert pool.connections_opened == 1
    assert len(engine.peers) == 1  # the engine saw one connection for all five requests


async def test_connection_close_response_is_not_reused(raw_server, make_pool):
    async def closing(peer: Peer) -> None:
        if await peer.read_request() is not None:
            peer.respond(b"bye", extra="Connection: close\r\n")
            await peer.until_eof()

    server = await raw_server(closing)
    pool = make_pool()
    for _ in range(2):
        response, body = await fetch(pool, server.origin)
        assert body == b"bye" and response.keep_alive is False
        assert pool.idle_connections() == 0
    assert pool.connections_opened == 2
    await wait_until_async(lambda: server.peers[0].eof.is_set(), timeout=2)  # the pool closed its side


async def test_stale_keepalive_connection_is_retried_on_a_fresh_one(raw_server, make_pool):
    async def one_answer_per_connection(peer: Peer) -> None:
        """Answers the first request as keep-alive, then closes when the next one comes (as an
        engine does when its idle timeout fires just as the request is on its way)."""
        if await peer.read_request() is not None:
            peer.respond(b"answer %d" % peer.index)
            await peer.read_request()  # closes without answering

    server = await raw_server(one_answer_per_connection)
    pool = make_pool()
    assert (await fetch(pool, server.origin, "/1"))[1] == b"answer 0"
    assert pool.idle_connections() == 1
    response, body = await fetch(pool, server.origin, "/2")  # sent on the parked connection, which dies
    assert (response.status, body) == (200, b"answer 1")  # ... and resent, transparently, on a new one
    assert pool.connections_opened == 2
    assert server.requests == [(0, "/1"), (0, "/2"), (1, "/2")]


async def test_keepalive_connection_closed_while_parked_is_not_used(raw_server, make_pool):
    async def answer_then_close(peer: Peer) -> None:
        if await peer.read_request() is not None:
            peer.respond(b"answer %d" % peer.index)  # says keep-alive, then closes anyway

    server = await raw_server(answer_then_close)
    pool = make_pool()
    assert (await fetch(pool, server.origin))[1] == b"answer 0"
    await wait_until_async(lambda: pool.idle_connections() == 0, timeout=2)  # the engine's close was noticed
    assert (await fetch(pool, server.origin))[1] == b"answer 1"
    assert pool.connections_opened == 2
    assert server.requests == [(0, "/"), (1, "/")]


async def test_fresh_connection_closed_without_answer_is_an_error_not_a_retry(raw_server, make_pool):
    async def hang_up(peer: Peer) -> None:
        await peer.read_request()

    server = await raw_server(hang_up)
    pool = make_pool()
    with pytest.raises(UpstreamError, match="closed the connection without answering"):
        await pool.request(server.origin, "POST", "/v1/completions", b"{}", headers={}, timeout_s=TIMEOUT)
    assert pool.connections_opened == 1 and len(server.peers) == 1  # not resent: it may have been acted on


async def test_stale_retry_uses_a_fresh_connection_even_with_more_parked(raw_server, make_pool):
    async def one_answer_per_connection(peer: Peer) -> None:
        if await peer.read_request() is not None:
            peer.respond(b"answer %d" % peer.index)
            await peer.read_request()  # closes without answering

    server = await raw_server(one_answer_per_connection)
    pool = make_pool()
    first = await asyncio.gather(fetch(pool, server.origin, "/a"), fetch(pool, server.origin, "/b"))
    assert sorted(body for _, body in first) == [b"answer 0", b"answer 1"]
    assert pool.idle_connections() == 2  # two parked connections, both about to be closed by the engine
    response, body = await fetch(pool, server.origin, "/c")
    assert (response.status, body) == (200, b"answer 2")
    assert pool.connections_opened == 3


# ------------------------------------------------------------------------------ errors
async def test_connection_refused_is_upstream_error(make_pool):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    pool = make_pool()
    with pytest.raises(UpstreamError, match=f"cannot connect to 127.0.0.1:{port}"):
        await pool.request(("127.0.0.1", port, False), "GET", "/", b"", headers={}, timeout_s=TIMEOUT)
    assert pool.connections_opened == 0


async def test_malformed_response_head_is_upstream_error(raw_server, make_pool):
    async def garbage(peer: Peer) -> None:
        if await peer.read_request() is not None:
            peer.writer.write(b"SPAM SPAM SPAM\r\n\r\n")
            await peer.until_eof()

    server = await raw_server(garbage)
    pool = make_pool()
    with pytest.raises(UpstreamError, match="malformed response"):
        await pool.request(server.origin, "GET", "/", b"", headers={}, timeout_s=TIMEOUT)
    await wait_until_async(lambda: server.peers[0].eof.is_set(), timeout=2)  # the connection was dropped
    assert pool.idle_connections() == 0


async def test_malformed_chunk_mid_body_is_upstream_error(raw_server, make_pool):
    first_read = asyncio.Event()  # the garbage follows once the client has the first chunk

    async def bad_chunk(peer: Peer) -> None:
        if await peer.read_request() is not None:
            peer.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await first_read.wait()
            peer.writer.write(b"zz\r\nnot a chunk\r\n")
            await peer.until_eof()

    server = await raw_server(bad_chunk)
    pool = make_pool()
    response = await pool.request(server.origin, "GET", "/", b"", headers={}, timeout_s=TIMEOUT)
    try:
        assert response.status == 200
        assert await response.first_chunk() == b"hello"
        first_read.set()
        pieces: list[bytes] = []
        with pytest.raises(UpstreamError, match="malformed response"):
            await response.relay(pieces.append)
        assert pieces == []
    finally:
        response.close()
    await wait_until_async(lambda: server.peers[0].eof.is_set(), timeout=2)
    assert pool.idle_connections() == 0


async def test_timeout_waiting_for_the_head_is_upstream_error_and_closes(raw_server, make_pool):
    async def stall(peer: Peer) -> None:
        await peer.read_request()
        await peer.until_eof()

    server = await raw_server(stall)
    pool = make_pool()
    t0 = time.monotonic()
    with pytest.raises(UpstreamError, match=r"no complete answer within 0\.2 s"):
        await pool.request(server.origin, "GET", "/", b"", headers={}, timeout_s=0.2)
    assert 0.15 < time.monotonic() - t0 < 1.0
    await wait_until_async(lambda: server.peers[0].eof.is_set(), timeout=1.0)  # the connection was closed
    assert pool.idle_connections() == 0


async def test_timeout_mid_body_is_upstream_error_and_closes(raw_server, make_pool):
    async def stall_mid_body(peer: Peer) -> None:
        if await peer.read_request() is not None:
            peer.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            await peer.until_eof()

    server = await raw_server(stall_mid_body)
    pool = make_pool()
    t0 = time.monotonic()
    response = await pool.request(server.origin, "GET", "/", b"", headers={}, timeout_s=0.3)
    try:
        assert response.status == 200  # the head came in time; the deadline covers the whole body
        with pytest.raises(UpstreamError, match=r"no complete answer within 0\.3 s"):
            await response.read()
        assert 0.25 < time.monotonic() - t0 < 1.0
        # the deadline itself closed the connection, before the caller released the response
        await wait_until_async(lambda: server.peers[0].eof.is_set(), timeout=1.0)
    finally:
        response.close()
    assert pool.idle_connections() == 0


async def test_each_request_on_a_reused_connection_has_its_own_deadline(raw_server, make_pool):
    """Requests on one keep-alive connection, each answered in time although together they take
    longer than one deadline, then one with a shorter deadline than the earlier ones that stalls:
    it times out on time (the connection's timer is moved earlier for it)."""

    async def answer_then_stall(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request[1] == "/stall":
                await peer.until_eof()
                return
            await asyncio.sleep(0.1)
            peer.respond(b"ok")

    server = await raw_server(answer_then_stall)
    pool = make_pool()
    t0 = time.monotonic()
    for _ in range(4):  # 0.4 s in all, each within its own 0.3 s
        response = await pool.request(server.origin, "GET", "/", b"", headers={}, timeout_s=0.3)
        assert await response.read() == b"ok"
        response.close()
    assert time.monotonic() - t0 > 0.35
    assert len(server.peers) == 1  # one connection served them all
    t1 = time.monotonic()
    with pytest.raises(UpstreamError, match=r"no complete answer within 0\.2 s"):
        await pool.request(server.origin, "GET", "/stall", b"", headers={}, timeout_s=0.2)
    assert 0.15 < time.monotonic() - t1 < 1.0
    await wait_until_async(lambda: server.peers[0].eof.is_set(), timeout=1.0)


async def test_closing_a_response_mid_body_closes_its_connection(raw_server, make_pool):
    server = await raw_server(keep_alive)
    pool = make_pool()
    response = await pool.request(server.origin, "GET", "/hold", b"", headers={}, timeout_s=TIMEOUT)
    assert await response.first_chunk() == b"first"
    response.close()  # how a request is aborted on the engine
    await wait_until_async(lambda: server.peers[0].eof.is_set(), timeout=1.0)  # the engine sees the disconnect
    assert pool.idle_connections() == 0

    assert (await fetch(pool, server.origin, "/next"))[1] == b"/next"
    assert pool.connections_opened == 2  # the aborted connection was not reused
    assert server.requests == [(0, "/hold"), (1, "/next")]


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_engine_closing_mid_body_fails_the_relay(raw_server, make_pool, framing):
    first_read = asyncio.Event()  # the rest follows once the client has the first piece

    async def die_mid_body(peer: Peer) -> None:
        if await peer.read_request() is not None:
            if framing == "chunked":
                peer.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
                await first_read.wait()
                peer.writer.write(b"1\r\nb\r\n")
            else:
                peer.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\na")
                await first_read.wait()
                peer.writer.write(b"b")
            await peer.writer.drain()
            # returning closes the connection, mid-body

    server = await raw_server(die_mid_body)
    pool = make_pool()
    response = await pool.request(server.origin, "GET", "/", b"", headers={}, timeout_s=TIMEOUT)
    try:
        first = await response.first_chunk()
        first_read.set()
        pieces: list[bytes] = []
        with pytest.raises(UpstreamError, match="closed the connection mid-response"):
            await asyncio.wait_for(response.relay(pieces.append), 2)
        assert first + b"".join(pieces) == b"ab"  # what did arrive was relayed
        assert not response.complete
    finally:
        response.close()
    assert pool.idle_connections() == 0


async def test_close_delimited_body_is_read_whole(raw_server, make_pool):
    async def close_delimited(peer: Peer) -> None:
        if await peer.read_request() is not None:
            peer.writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello, until EOF")
            await peer.writer.drain()

    server = await raw_server(close_delimited)
    pool = make_pool()
    _, body = await fetch(pool, server.origin)
    assert body == b"hello, until EOF"


# ------------------------------------------------------------------------ pool upkeep
async def test_idle_connection_past_idle_timeout_is_not_reused(raw_server, make_pool):
    server = await raw_server(keep_alive)
    pool = make_pool(idle_timeout_s=0.15)
    assert (await fetch(pool, server.origin, "/a"))[1] == b"/a"
    assert (await fetch(pool, server.origin, "/b"))[1] == b"/b"  # within the idle timeout: reused
    assert pool.connections_opened == 1
    await asyncio.sleep(0.3)  # the behaviour under test: the parked connection idles past idle_timeout_s
    assert (await fetch(pool, server.origin, "/c"))[1] == b"/c"
    assert pool.connections_opened == 2
    assert server.requests == [(0, "/a"), (0, "/b"), (1, "/c")]
    await wait_until_async(lambda: server.peers[0].eof.is_set(), timeout=1.0)  # the expired one was closed


async def test_pool_close_closes_every_connection(raw_server, make_pool):
    server = await raw_server(keep_alive)
    pool = make_pool()
    in_use = await pool.request(server.origin, "GET", "/hold", b"", headers={}, timeout_s=TIMEOUT)
    assert await in_use.first_chunk() == b"first"
    await asyncio.gather(fetch(pool, server.origin, "/a"), fetch(pool, server.origin, "/b"))
    assert pool.idle_connections() == 2
    assert len(server.peers) == 3  # one in use, two parked

    await pool.close()
    assert pool.idle_connections() == 0
    await wait_until_async(lambda: all(p.eof.is_set() for p in server.peers), timeout=1.0)  # parked and in use
    with pytest.raises(UpstreamError, match="mid-response"):
        await in_use.relay(lambda data: None)
    in_use.close()
    with pytest.raises(UpstreamError, match="closed"):
        await pool.request(server.origin, "GET", "/late", b"", headers={}, timeout_s=TIMEOUT)
    assert len(server.peers) == 3


async def test_pool_close_fails_a_request_waiting_on_a_reused_connection(raw_server, make_pool):
    async def answer_then_stall(peer: Peer) -> None:
        if await peer.read_request() is not None:
            peer.respond()
            await peer.read_request()
            await peer.until_eof()

    server = await raw_server(answer_then_stall)
    pool = make_pool()
    await fetch(pool, server.origin, "/a")
    waiting = asyncio.create_task(fetch(pool, server.origin, "/b", timeout_s=3))
    await wait_until_async(lambda: len(server.peers[0].requests) == 2, timeout=2)
    await pool.close()
    try:
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(asyncio.shield(waiting), 1.0)
        assert pool.connections_opened == 1 and len(server.peers) == 1
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
