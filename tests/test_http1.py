"""The gateway's own HTTP/1.1 server (pdgate/common/http_server.py), over real loopback sockets.

Each test starts an :class:`HttpServer` with a small handler on port 0 and talks to it with
aiohttp's client or with raw asyncio streams (for pipelined, partial or malformed requests).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest
from support.waiting import wait_until_async

from pdgate.common.http_server import HttpRequest, HttpServer, Responder

pytestmark = pytest.mark.unit

Response = tuple[int, dict[str, str], bytes]


# ---------------------------------------------------------------------------- helpers
@pytest.fixture
async def start_server():
    """Start HttpServers on 127.0.0.1:0; every one is closed at teardown."""
    servers: list[HttpServer] = []

    async def start(handler, **kw) -> HttpServer:
        kw.setdefault("max_body_bytes", 1 << 20)
        server = HttpServer(handler, **kw)
        await server.start("127.0.0.1", 0)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close(grace_s=0)


@pytest.fixture
async def connect():
    """Open raw stream connections; every one is closed at teardown."""
    writers: list[asyncio.StreamWriter] = []

    async def open_(port: int, sock: socket.socket | None = None):
        if sock is not None:
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return reader, writer

    yield open_
    for writer in writers:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def counting_session() -> tuple[aiohttp.ClientSession, list[int]]:
    """An aiohttp session that counts the TCP connections it creates."""
    created: list[int] = []

    async def on_create(session, ctx, params) -> None:
        created.append(1)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    return aiohttp.ClientSession(trace_configs=[trace]), created


async def read_response(reader: asyncio.StreamReader, timeout: float = 2.0) -> Response:
    """One HTTP/1.1 response: status, lower-cased headers, body (chunked bodies decoded)."""

    async def read() -> Response:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            return status, headers, await reader.readexactly(int(headers["content-length"]))
        assert headers.get("transfer-encoding") == "chunked", headers
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            data = await reader.readexactly(size + 2)
            assert data.endswith(b"\r\n")
            if size == 0:
                return status, headers, b"".join(parts)
            parts.append(data[:-2])

    return await asyncio.wait_for(read(), timeout)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    """True if the server closes the connection (EOF or reset) within ``timeout``, sending nothing more."""
    try:
        data = await asyncio.wait_for(reader.read(1), timeout)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    assert data == b"", f"unexpected bytes after the response: {data!r}"
    return True


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


async def echo(request: HttpRequest, responder: Responder) -> None:
    responder.send_json(
        200,
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "body": request.body.decode(),
            "x_test": request.headers.get("x-test"),
            "keep_alive": request.keep_alive,
        },
    )


def assert_error_json(body: bytes, err_type: str) -> dict:
    data = json.loads(body)
    assert set(data) == {"error"}
    error = data["error"]
    assert error["type"] == err_type and error["param"] is None and error["code"] is None
    assert isinstance(error["message"], str) and error["message"]
    return error


# ------------------------------------------------------------------------- requests
async def test_keep_alive_serves_two_requests_on_one_connection(start_server, connect):
    server = await start_server(echo)
    reader, writer = await connect(server.port)

    writer.write(
        b"POST /v1/echo?x=1&y=2 HTTP/1.1\r\nHost: test\r\nX-Test: a\r\nX-TEST: b\r\nContent-Length: 5\r\n\r\nhello"
    )
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["connection"] == "keep-alive"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "method": "POST",
        "path": "/v1/echo",
        "query": "x=1&y=2",
        "body": "hello",
        "x_test": "b",
        "keep_alive": True,
    }  # a repeated header keeps its last value

    writer.write(get("/second"))  # the same socket: the connection was kept alive
    status, headers, body = await read_response(reader)
    assert status == 200 and json.loads(body)["path"] == "/second"


async def test_aiohttp_client_reuses_one_connection(start_server):
    server = await start_server(echo)
    session, created = counting_session()
    async with session:
        for i in range(3):
            async with session.post(f"http://127.0.0.1:{server.port}/n?i={i}", data=b"body") as resp:
                assert resp.status == 200
                assert (await resp.json())["query"] == f"i={i}"
    assert len(created) == 1


async def test_http10_request_is_answered_then_closed(start_server, connect):
    server = await start_server(echo)
    reader, writer = await connect(server.port)
    writer.write(b"GET /old HTTP/1.0\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["connection"] == "close"
    assert json.loads(body)["keep_alive"] is False
    assert await closed_by_server(reader)


async def test_pipelined_requests_are_answered_in_order_one_at_a_time(start_server, connect):
    running = 0
    most_running = 0

    async def handler(request: HttpRequest, responder: Responder) -> None:
        nonlocal running, most_running
        running += 1
        most_running = max(most_running, running)
        try:
            # handlers of different lengths: served concurrently, they would finish out of order
            await asyncio.sleep({"/a": 0.15, "/b": 0.0, "/c": 0.05}[request.path])
            responder.send(200, request.path.encode(), content_type="text/plain")
        finally:
            running -= 1

    server = await start_server(handler)
    reader, writer = await connect(server.port)
    writer.write(get("/a") + get("/b") + get("/c"))  # all three in one write
    bodies = [(await read_response(reader))[2] for _ in range(3)]
    assert bodies == [b"/a", b"/b", b"/c"]
    assert most_running == 1  # served one at a time, not concurrently

    writer.write(get("/b"))  # reading resumed after the pipeline drained
    assert (await read_response(reader))[2] == b"/b"


# ------------------------------------------------------------------ Expect: 100-continue
async def read_interim(reader: asyncio.StreamReader, timeout: float = 2.0) -> bytes:
    """The next response head (an interim 1xx, or a final one's head) as it arrived, within ``timeout``."""
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)


async def nothing_arrives(reader: asyncio.StreamReader, timeout: float = 0.2) -> bool:
    """True if the server sends nothing for ``timeout`` seconds (the connection stays open)."""
    try:
        data = await asyncio.wait_for(reader.read(1), timeout)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected bytes: {data!r}")


async def test_expect_100_continue_is_answered_before_the_body_is_sent(start_server, connect):
    server = await start_server(echo)
    reader, writer = await connect(server.port)
    for i in range(2):  # and again on the kept-alive connection
        writer.write(
            f"POST /upload?n={i} HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert await read_interim(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"  # the client waits for this
        writer.write(b"hello")
        status, headers, body = await read_response(reader)
        assert status == 200 and headers["connection"] == "keep-alive"
        assert json.loads(body)["body"] == "hello" and json.loads(body)["query"] == f"n={i}"


async def test_expect_100_continue_with_aiohttp_client(start_server):
    server = await start_server(echo)
    async with aiohttp.ClientSession() as session:
        # aiohttp holds the body back until the 100 arrives (it would hang here without one)
        response = session.post(f"http://127.0.0.1:{server.port}/up", data=b"x" * 50_000, expect100=True)
        async with await asyncio.wait_for(response, 5) as resp:
            assert resp.status == 200
            assert (await resp.json())["body"] == "x" * 50_000


async def test_expect_100_continue_for_a_body_over_the_limit_is_413_without_100(start_server, connect):
    calls = []

    async def handler(request: HttpRequest, responder: Responder) -> None:
        calls.append(request)
        responder.send(200, b"")

    server = await start_server(handler, max_body_bytes=100)
    reader, writer = await connect(server.port)
    writer.write(b"POST /big HTTP/1.1\r\nHost: test\r\nContent-Length: 101\r\nExpect: 100-continue\r\n\r\n")
    status, headers, body = await read_response(reader)  # the first thing back is the final answer
    assert status == 413 and headers["connection"] == "close"
    assert "too large" in assert_error_json(body, "invalid_request_error")["message"]
    assert await closed_by_server(reader)
    assert calls == []


async def test_other_expectations_are_417(start_server, connect):
    calls = []

    async def handler(request: HttpRequest, responder: Responder) -> None:
        calls.append(request)
        responder.send(200, b"")

    server = await start_server(handler)
    reader, writer = await connect(server.port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\nExpect: telepathy\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 417 and headers["connection"] == "close"
    assert "telepathy" in assert_error_json(body, "invalid_request_error")["message"]
    assert await closed_by_server(reader)
    assert calls == []


async def test_expect_100_continue_waits_for_the_response_in_progress(start_server, connect):
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(request: HttpRequest, responder: Responder) -> None:
        if request.path == "/slow":
            started.set()
            await release.wait()
        await echo(request, responder)

    server = await start_server(handler)
    reader, writer = await connect(server.port)
    writer.write(get("/slow"))
    await asyncio.wait_for(started.wait(), 2)
    writer.write(b"POST /next HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert await nothing_arrives(reader)  # no 100 in the middle of (or before) the first response
    release.set()
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["path"] == "/slow"
    assert await read_interim(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"  # now the second may send its body
    writer.write(b"abc")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["body"] == "abc"


async def test_expect_without_a_body_or_from_http10_gets_no_100(start_server, connect):
    server = await start_server(echo)
    reader, writer = await connect(server.port)
    writer.write(get("/nobody", "Expect: 100-continue\r\n"))  # nothing to wait for: just the answer
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["path"] == "/nobody"
    reader, writer = await connect(server.port)
    writer.write(b"POST /old HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhi")
    status, _, body = await read_response(reader)  # HTTP/1.0 knows no 100: the expectation is ignored
    assert status == 200 and json.loads(body)["body"] == "hi"


# --------------------------------------------------------------------------- limits
async def test_content_length_over_limit_is_413_before_the_body_is_read(start_server, connect):
    calls = []

    async def handler(request: HttpRequest, responder: Responder) -> None:
        calls.append(request)
        responder.send(200, b"")

    server = await start_server(handler, max_body_bytes=100)
    reader, writer = await connect(server.port)
    writer.write(b"POST /big HTTP/1.1\r\nHost: test\r\nContent-Length: 101\r\n\r\n")  # head only
    status, headers, body = await read_response(reader)
    assert status == 413 and headers["connection"] == "close"
    assert "too large" in assert_error_json(body, "invalid_request_error")["message"]
    assert await closed_by_server(reader)
    assert calls == []


async def test_chunked_body_growing_past_limit_is_413(start_server, connect):
    calls = []

    async def handler(request: HttpRequest, responder: Responder) -> None:
        calls.append(request.body)
        responder.send(200, b"ok", content_type="text/plain")

    server = await start_server(handler, max_body_bytes=100)

    # under the limit, a chunked body is reassembled and served
    reader, writer = await connect(server.port)
    writer.write(
        b"POST /c HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"28\r\n" + b"a" * 40 + b"\r\n28\r\n" + b"b" * 40 + b"\r\n0\r\n\r\n"
    )
    assert (await read_response(reader))[0] == 200
    assert calls == [b"a" * 40 + b"b" * 40]

    # past it (no Content-Length to judge by), the growing body is refused
    reader, writer = await connect(server.port)
    writer.write(
        b"POST /c HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3c\r\n" + b"a" * 60 + b"\r\n3c\r\n" + b"b" * 60 + b"\r\n"
    )
    status, headers, body = await read_response(reader)
    assert status == 413 and headers["connection"] == "close"
    assert "too large" in assert_error_json(body, "invalid_request_error")["message"]
    assert await closed_by_server(reader)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT A REQUEST\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: test\r\nNo colon here\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n",
    ],
    ids=["bad-request-line", "bad-header", "bad-content-length"],
)
async def test_malformed_request_is_400_json_and_closed(start_server, connect, raw):
    calls = []

    async def handler(request: HttpRequest, responder: Responder) -> None:
        calls.append(request)
        responder.send(200, b"")

    server = await start_server(handler)
    reader, writer = await connect(server.port)
    writer.write(raw)
    status, headers, body = await read_response(reader)
    assert status == 400 and headers["connection"] == "close"
    assert assert_error_json(body, "invalid_request_error")["message"].startswith("malformed HTTP request")
    assert await closed_by_server(reader)
    assert calls == []


# ------------------------------------------------------------------------- handlers
async def test_handler_exception_is_500_openai_json_and_server_keeps_serving(start_server, connect, caplog):
    async def handler(request: HttpRequest, responder: Responder) -> None:
        if request.path == "/boom":
            raise ValueError("handler bug")
        responder.send(200, b"fine", content_type="text/plain")

    server = await start_server(handler)
    session, created = counting_session()
    async with session:
        async with session.get(f"http://127.0.0.1:{server.port}/boom") as resp:
            assert resp.status == 500
            assert resp.content_type == "application/json"
            assert_error_json(await resp.read(), "server_error")
        async with session.get(f"http://127.0.0.1:{server.port}/ok") as resp:
            assert resp.status == 200 and await resp.read() == b"fine"
    assert len(created) == 1  # the 500 kept the connection alive
    assert "unhandled error serving GET /boom" in caplog.text and "handler bug" in caplog.text

    reader, writer = await connect(server.port)  # and new connections are still served
    writer.write(get("/ok"))
    assert (await read_response(reader))[:1] == (200,)


async def test_chunked_stream_start_write_end_read_by_aiohttp(start_server):
    async def handler(request: HttpRequest, responder: Responder) -> None:
        responder.start(200, content_type="text/event-stream", headers={"X-Stream": "yes"}, first=b"data: 0\n\n")
        for i in range(1, 4):
            await asyncio.sleep(0.01)  # pacing: each chunk goes out in its own write, as tokens do
            responder.write(f"data: {i}\n\n".encode())
        responder.write(b"")  # skipped: an empty chunk would end the stream
        responder.end(b"data: [DONE]\n\n")
        responder.end()  # a second end is a no-op

    server = await start_server(handler)
    expected = b"".join(f"data: {i}\n\n".encode() for i in range(4)) + b"data: [DONE]\n\n"
    session, created = counting_session()
    async with session:
        for _ in range(2):
            async with session.get(f"http://127.0.0.1:{server.port}/stream") as resp:
                assert resp.status == 200
                assert resp.headers["Transfer-Encoding"] == "chunked"
                assert resp.headers["Content-Type"] == "text/event-stream"
                assert resp.headers["X-Stream"] == "yes"
                assert await resp.read() == expected
    assert len(created) == 1  # a properly ended stream keeps the connection alive


async def test_client_disconnect_mid_stream_cancels_the_handler(start_server, connect):
    cancelled = asyncio.Event()

    async def handler(request: HttpRequest, responder: Responder) -> None:
        responder.start(200, content_type="text/event-stream", first=b"data: 1\n\n")
        try:
            await asyncio.sleep(30)  # a stream that never ends by itself: only the disconnect stops it
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await start_server(handler)
    reader, writer = await connect(server.port)
    writer.write(get("/stream"))
    head = await asyncio.wait_for(reader.readuntil(b"data: 1\n\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert server.active_requests() == 1
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 2)
    await wait_until_async(lambda: server.active_requests() == 0, timeout=2)


# --------------------------------------------------------------------------- timers
async def test_idle_keepalive_connection_is_closed_after_timeout(start_server, connect):
    server = await start_server(echo, keepalive_timeout_s=0.2, request_timeout_s=5)

    reader, writer = await connect(server.port)
    writer.write(get("/one"))
    assert (await read_response(reader))[0] == 200
    t0 = time.monotonic()
    assert await closed_by_server(reader, timeout=2)
    assert 0.1 < time.monotonic() - t0 < 1.5

    reader, writer = await connect(server.port)  # a connection that never sends anything
    t0 = time.monotonic()
    assert await closed_by_server(reader, timeout=2)
    assert 0.1 < time.monotonic() - t0 < 1.5


async def test_keepalive_deadline_moves_with_each_request(start_server, connect):
    """The idle timer counts from the last response, not from when the connection opened (the
    timer scheduled first fires early and waits on for the deadline in force)."""
    server = await start_server(echo, keepalive_timeout_s=0.4, request_timeout_s=5)
    reader, writer = await connect(server.port)
    t0 = time.monotonic()
    for _ in range(3):  # requests 0.25 s apart, each before the idle timeout since the last one
        writer.write(get("/one"))
        assert (await read_response(reader))[0] == 200
        await asyncio.sleep(0.25)
    assert time.monotonic() - t0 > 0.7  # past the first deadline (0.4 s after the connection opened)
    writer.write(get("/two"))
    assert (await read_response(reader))[0] == 200  # still open
    t1 = time.monotonic()
    assert await closed_by_server(reader, timeout=2)
    assert 0.3 < time.monotonic() - t1 < 1.5  # closed once idle for the timeout


async def test_request_deadline_earlier_than_the_idle_one_still_applies(start_server, connect):
    """A request started on a connection whose (lazy) idle timer is set later than the request's
    own deadline still gets its 408 on time."""
    server = await start_server(echo, keepalive_timeout_s=30, request_timeout_s=0.3)
    reader, writer = await connect(server.port)
    writer.write(get("/one"))
    assert (await read_response(reader))[0] == 200
    t0 = time.monotonic()
    writer.write(b"GET /two HTTP/1.1\r\nHost: te")  # never completes
    status, _, body = await read_response(reader)
    assert status == 408
    assert 0.2 < time.monotonic() - t0 < 1.5
    assert_error_json(body, "invalid_request_error")


@pytest.mark.parametrize(
    "partial",
    [
        b"GET /slow HTTP/1.1\r\nHost: te",
        b"POST /slow HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nabc",
    ],
    ids=["partial-head", "partial-body"],
)
async def test_partial_request_times_out_with_408(start_server, connect, partial):
    calls = []

    async def handler(request: HttpRequest, responder: Responder) -> None:
        calls.append(request)
        responder.send(200, b"")

    server = await start_server(handler, request_timeout_s=0.3, keepalive_timeout_s=5)
    reader, writer = await connect(server.port)
    t0 = time.monotonic()
    writer.write(partial)
    status, headers, body = await read_response(reader)
    assert status == 408 and headers["connection"] == "close"
    assert 0.2 < time.monotonic() - t0 < 1.5
    assert "did not arrive in time" in assert_error_json(body, "invalid_request_error")["message"]
    assert await closed_by_server(reader)
    assert calls == []


async def test_partial_pipelined_request_times_out_with_408(start_server, connect):
    async def handler(request: HttpRequest, responder: Responder) -> None:
        await asyncio.sleep(0.05)  # the first request is still being served when the second's head stalls
        responder.send(200, b"first", content_type="text/plain")

    server = await start_server(handler, request_timeout_s=0.3, keepalive_timeout_s=0.3)
    reader, writer = await connect(server.port)
    writer.write(get("/first") + b"GET /second HTTP/1.1\r\nHost: te")  # the second never completes
    assert (await read_response(reader))[2] == b"first"
    status, _, body = await read_response(reader, timeout=1.5)
    assert status == 408
    assert_error_json(body, "invalid_request_error")


# ------------------------------------------------------------------------- shutdown
async def test_close_lets_in_flight_request_finish_then_refuses_connections(start_server, connect):
    started = asyncio.Event()

    async def handler(request: HttpRequest, responder: Responder) -> None:
        if request.path == "/slow":
            started.set()
            await asyncio.sleep(0.3)  # in flight when the server is closed: close must wait for it
        responder.send(200, request.path.encode(), content_type="text/plain")

    server = await start_server(handler)
    idle_reader, idle_writer = await connect(server.port)  # a kept-alive connection between requests
    idle_writer.write(get("/idle"))
    assert (await read_response(idle_reader))[2] == b"/idle"

    reader, writer = await connect(server.port)
    writer.write(get("/slow"))
    await asyncio.wait_for(started.wait(), 2)
    t0 = time.monotonic()
    closing = asyncio.create_task(server.close(grace_s=5))
    status, headers, body = await read_response(reader)
    assert (status, body) == (200, b"/slow")  # the in-flight request finished
    assert headers["connection"] == "close"  # ... and was told the connection ends
    assert await closed_by_server(reader)
    await asyncio.wait_for(closing, 2)
    assert time.monotonic() - t0 < 2  # close returned once nothing was in flight, not after the grace
    assert await closed_by_server(idle_reader, timeout=0.5)  # idle connections were closed at once
    with pytest.raises(ConnectionRefusedError):
        await connect(server.port)


async def test_close_cancels_requests_still_running_after_grace(start_server, connect):
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(request: HttpRequest, responder: Responder) -> None:
        started.set()
        try:
            await asyncio.sleep(30)  # outlives the grace period: close must cancel it
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await start_server(handler)
    reader, writer = await connect(server.port)
    writer.write(get("/forever"))
    await asyncio.wait_for(started.wait(), 2)
    t0 = time.monotonic()
    await asyncio.wait_for(server.close(grace_s=0.2), 3)
    assert 0.15 < time.monotonic() - t0 < 1.5
    assert cancelled.is_set()
    assert await closed_by_server(reader)
    assert server.active_requests() == 0


# ---------------------------------------------------------------------- backpressure
async def test_backpressure_pause_hook_fires_when_client_does_not_read(start_server, connect):
    paused = asyncio.Event()
    resumed = asyncio.Event()
    flow: list[str] = []
    state: dict[str, object] = {}
    chunk = b"x" * 65536

    async def handler(request: HttpRequest, responder: Responder) -> None:
        responder.on_flow(lambda: (flow.append("pause"), paused.set()), lambda: (flow.append("resume"), resumed.set()))
        responder.start(200, content_type="application/octet-stream")
        written = 0
        while not responder.paused and written < 64 << 20:  # at most 64 MiB
            responder.write(chunk)
            written += len(chunk)
            await asyncio.sleep(0)  # yield to the loop so the transport can report the full buffer
        state["written"] = written
        state["paused_flag"] = responder.paused
        await resumed.wait()
        responder.end()

    server = await start_server(handler)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # a small window: the server fills up quickly
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await connect(server.port, sock=sock)
    writer.write(get("/big"))

    await asyncio.wait_for(paused.wait(), 5)  # nobody reads: the server's buffer fills
    assert flow == ["pause"]
    assert state["paused_flag"] is True and state["written"] < 64 << 20

    received = 0
    tail = b""
    while not tail.endswith(b"\r\n0\r\n\r\n"):  # now read it all: writing resumes and the stream ends
        data = await asyncio.wait_for(reader.read(1 << 20), 5)
        assert data
        received += len(data)
        tail = (tail + data)[-16:]
    assert resumed.is_set() and flow == ["pause", "resume"]
    assert received > state["written"]  # every chunk arrived (plus heads and chunk framing)
