"""The HTTP/1.1 server's limits against hostile or broken clients (pdgate.common.http_server):
oversized heads, too many connections, clients that do not read what they asked for."""

from __future__ import annotations

import asyncio
import socket

import pytest
import test_http1
from test_http1 import assert_error_json, closed_by_server, get, read_response

from pdgate.common.http_server import HttpRequest, Responder

pytestmark = pytest.mark.unit
start_server = test_http1.start_server  # the fixtures: servers and raw connections closed at teardown
connect = test_http1.connect


async def ok(request: HttpRequest, responder: Responder) -> None:
    responder.send_json(200, {"ok": True})


def limits_seen() -> tuple[list[str], dict[str, object]]:
    hits: list[str] = []
    return hits, {"on_limit": hits.append}


async def test_a_header_that_never_ends_is_cut_off_near_the_limit(start_server, connect):
    """The parser buffers a header until it is whole: a value that keeps coming is refused once
    what arrived exceeds the limit (give or take one read of the socket), not held until the
    request timeout."""
    hits, hook = limits_seen()
    server = await start_server(ok, max_header_bytes=4096, **hook)
    reader, writer = await connect(server.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: test\r\nX-Big: ")
    try:
        for _ in range(64):  # 1 MiB of one header value, never finished: more than one read of the socket
            writer.write(b"a" * 16384)
            await writer.drain()
    except ConnectionError:
        pass  # refused while still sending
    await asyncio.wait_for(_until(lambda: hits == ["header"]), 2)
    assert await closed_by_server_eventually(reader)
    assert server.open_connections() == 0


async def test_many_small_headers_over_the_limit_are_431_and_a_head_under_it_is_served(start_server, connect):
    hits, hook = limits_seen()
    server = await start_server(ok, max_header_bytes=4096, **hook)
    reader, writer = await connect(server.port)
    writer.write(get("/x", "".join(f"X-H{i}: {'v' * 20}\r\n" for i in range(100))))  # ~3 KiB
    assert (await read_response(reader))[0] == 200
    writer.write(get("/x", "".join(f"X-H{i}: {'v' * 20}\r\n" for i in range(300))))  # ~9 KiB, in one write
    status, headers, body = await read_response(reader)
    assert status == 431 and headers["connection"] == "close"
    assert "4096" in assert_error_json(body, "invalid_request_error")["message"]
    assert hits == ["header"]
    assert await closed_by_server(reader)


async def test_a_long_body_after_a_small_head_is_not_a_header_overflow(start_server, connect):
    async def size(request: HttpRequest, responder: Responder) -> None:
        responder.send_json(200, {"size": len(request.body)})

    server = await start_server(size, max_header_bytes=1024)
    reader, writer = await connect(server.port)
    body = b"b" * 200_000
    for _ in range(2):  # the second head begins in the chunk where the first body ends
        writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    for _ in range(2):
        status, _, data = await read_response(reader)
        assert status == 200 and data == b'{"size": 200000}'


async def test_connections_over_the_limit_get_503_with_retry_after(start_server, connect):
    hits, hook = limits_seen()
    server = await start_server(ok, max_connections=3, **hook)
    held = [await connect(server.port) for _ in range(3)]
    reader, writer = await connect(server.port)
    status, headers, body = await read_response(reader)
    assert status == 503 and headers["retry-after"] == "1"
    assert_error_json(body, "service_unavailable")
    assert hits == ["connections"] and server.open_connections() == 3
    held_reader, held_writer = held[0]
    held_writer.write(get("/x"))  # the connections within the limit are served
    assert (await read_response(held_reader))[0] == 200
    held_writer.close()
    await asyncio.wait_for(_until(lambda: server.open_connections() == 2), 2)
    reader, writer = await connect(server.port)  # room again
    writer.write(get("/x"))
    assert (await read_response(reader))[0] == 200


async def _until(predicate) -> None:
    while not predicate():  # polled with a deadline by the caller's wait_for
        await asyncio.sleep(0.01)


async def small_window_client(open_connection, port: int):
    """A client whose receive window is small and which reads nothing until told."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await open_connection(port, sock=sock)


async def test_a_client_that_stops_reading_is_dropped_after_the_slow_reader_timeout(start_server, connect):
    """A handler that honours backpressure stops writing; the client that reads nothing for
    slow_reader_timeout_s is dropped and the handler cancelled (its upstream work aborted)."""
    hits, hook = limits_seen()
    cancelled = asyncio.Event()
    written: list[int] = []

    async def stream(request: HttpRequest, responder: Responder) -> None:
        resumed = asyncio.Event()
        responder.on_flow(resumed.clear, resumed.set)
        resumed.set()
        responder.start(200, content_type="text/event-stream")
        try:
            while True:
                await resumed.wait()
                responder.write(b"x" * 8192)
                written.append(8192)
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await start_server(stream, slow_reader_timeout_s=0.5, **hook)
    reader, writer = await small_window_client(connect, server.port)
    writer.write(get("/stream"))
    await asyncio.wait_for(cancelled.wait(), 5)
    assert hits == ["slow_reader"]
    assert sum(written) < 16 << 20  # paused, not buffering without bound
    assert await closed_by_server_eventually(reader)


async def closed_by_server_eventually(reader: asyncio.StreamReader) -> bool:
    """Read whatever was sent before the server dropped the connection, then expect its end."""
    try:
        while await asyncio.wait_for(reader.read(1 << 20), 2):
            pass
    except ConnectionError:
        pass
    return True


async def test_a_reader_that_keeps_up_slowly_is_not_dropped(start_server, connect):
    hits, hook = limits_seen()

    async def stream(request: HttpRequest, responder: Responder) -> None:
        resumed = asyncio.Event()
        responder.on_flow(resumed.clear, resumed.set)
        resumed.set()
        responder.start(200, content_type="application/octet-stream")
        for _ in range(200):
            await resumed.wait()
            responder.write(b"y" * 8192)
            await asyncio.sleep(0)
        responder.end()

    server = await start_server(stream, slow_reader_timeout_s=0.3, **hook)
    reader, writer = await small_window_client(connect, server.port)
    writer.write(get("/stream"))
    received = 0
    tail = b""
    while not tail.endswith(b"\r\n0\r\n\r\n"):  # reads in small bites, pausing the server often
        data = await asyncio.wait_for(reader.read(4096), 2)
        assert data
        received += len(data)
        tail = (tail + data)[-16:]
        await asyncio.sleep(0.001)
    assert received > 200 * 8192 and hits == []


async def test_a_handler_ignoring_backpressure_is_stopped_at_the_write_buffer_limit(start_server, connect):
    hits, hook = limits_seen()
    cancelled = asyncio.Event()
    buffered: list[int] = []

    async def flood(request: HttpRequest, responder: Responder) -> None:
        responder.start(200, content_type="application/octet-stream")
        try:
            while True:
                responder.write(b"z" * 65536)
                buffered.append(responder._conn.transport.get_write_buffer_size())
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await start_server(flood, max_write_buffer_bytes=1 << 20, slow_reader_timeout_s=60, **hook)
    reader, writer = await small_window_client(connect, server.port)
    writer.write(get("/flood"))
    await asyncio.wait_for(cancelled.wait(), 5)
    assert hits == ["write_buffer"]
    assert max(buffered) < (1 << 20) + 2 * 65536  # bounded by the limit and one chunk


async def test_an_idle_connection_that_never_read_its_answer_is_aborted(start_server, connect):
    big = b"q" * (4 << 20)

    async def large(request: HttpRequest, responder: Responder) -> None:
        responder.send(200, big, content_type="application/octet-stream")

    server = await start_server(large, keepalive_timeout_s=0.3)
    reader, writer = await small_window_client(connect, server.port)
    writer.write(get("/large"))
    await asyncio.wait_for(_until(lambda: server.active_requests() == 0), 2)
    # the answer sits unread in the server's buffer; the idle timeout must not wait for it forever
    await asyncio.wait_for(_until(lambda: server.open_connections() == 0), 3)
