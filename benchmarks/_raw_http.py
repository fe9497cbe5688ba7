"""Raw HTTP/1.1 on uvloop protocols with httptools, for the throughput benchmarks: an engine stub
that replays recorded responses, and a closed-loop client. Both cost a small fraction of what
aiohttp does per request, so that on a small host the gateway, not they, is what is measured.

    python benchmarks/_raw_http.py --serve-stub UPSTREAM [--burst]   # prints "stub engine ready: URL"
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from typing import Any

import aiohttp

STREAM_RE = re.compile(rb'"stream"\s*:\s*true')


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def render(status: int, ctype: str, body: bytes, stream: bool) -> list[bytes]:
    """A recorded response as the byte strings to write: one, or (streamed) the head with the
    first SSE event, then one chunk per event, the last one with the chunked terminator."""
    head = f"HTTP/1.1 {status} OK\r\nContent-Type: {ctype}\r\n"
    if not stream or status != 200:
        return [f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body]
    events = [e + b"\n\n" for e in body.split(b"\n\n") if e.strip()]
    pieces = [chunk(e) for e in events] or [b""]
    pieces[0] = f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + pieces[0]
    pieces[-1] += b"0\r\n\r\n"
    return pieces


def serve_stub(upstream: str, burst: bool) -> None:
    """An engine stub: replays the response ``upstream`` gave to the first request of each kind."""
    import httptools
    import uvloop

    cache: dict[tuple[bytes, bytes, bool], list[bytes]] = {}
    session: list[aiohttp.ClientSession] = []

    class Conn(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: Any = transport
            self.parser = httptools.HttpRequestParser(self)
            self.url, self.body = b"", b""

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.t.close()

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            method, path, body = self.parser.get_method(), self.url.split(b"?")[0], self.body
            self.url, self.body = b"", b""
            key = (method, path, method == b"POST" and bool(STREAM_RE.search(body)))
            if key in cache:
                self.send(cache[key])
            elif method == b"POST" and path != b"/v1/completions":  # e.g. /sim/migrate: not here
                self.send(render(404, "application/json", b'{"error": "not in the stub"}', False))
            else:
                asyncio.ensure_future(self.record(key, body))

        async def record(self, key: tuple[bytes, bytes, bool], body: bytes) -> None:
            if not session:
                session.append(aiohttp.ClientSession())
            url = upstream + key[1].decode()
            headers = {"Content-Type": "application/json"} if body else {}
            async with session[0].request(key[0].decode(), url, data=body or None, headers=headers) as resp:
                data, status = await resp.read(), resp.status
                ctype = resp.headers.get("Content-Type", "application/json")
            pieces = render(status, ctype, data, key[2])
            if status == 200:
                cache[key] = pieces
            self.send(pieces)

        def send(self, pieces: list[bytes]) -> None:
            if burst or len(pieces) == 1:
                self.t.write(b"".join(pieces))
                return
            it = iter(pieces)
            loop = asyncio.get_running_loop()

            def next_piece() -> None:  # one SSE event per event-loop turn
                piece = next(it, None)
                if piece is not None and not self.t.is_closing():
                    self.t.write(piece)
                    loop.call_soon(next_piece)

            next_piece()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Conn, "127.0.0.1", 0)
        print(f"stub engine ready: http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        if session:
            await session[0].close()

    uvloop.run(main())


# -------------------------------------------------------------------------------- the client
class Load:
    """One closed-loop run: counts what completes while :attr:`measuring`."""

    def __init__(self, url: str, body: bytes, concurrency: int) -> None:
        self.url, self.body, self.concurrency = url, body, concurrency
        host = url.split("//", 1)[1]
        self.request = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        ).encode() + self.body
        self.measuring = self.stopping = False
        self.done = self.errors = self.events = self.reads = 0
        self.first_error = ""

    def finished(self, status: int, events: int, error: str = "") -> None:
        if self.measuring:
            if status == 200:
                self.done += 1
                self.events += events
            else:
                self.errors += 1
                self.first_error = self.first_error or error or f"HTTP {status}"


async def run_raw(load: Load, until: asyncio.Future[None]) -> None:
    import httptools

    loop = asyncio.get_running_loop()
    closed = asyncio.Event()
    open_conns = [0]

    class Conn(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: Any = transport
            self.parser = httptools.HttpResponseParser(self)
            self.events, self.carry, self.error = 0, b"", ""
            open_conns[0] += 1
            transport.write(load.request)  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            if load.measuring:
                load.reads += 1
            self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            self.events += (self.carry + body).count(b"data: ")  # "data: " split over two reads counts once
            self.carry = body[-5:]
            if self.parser.get_status_code() != 200 and not load.first_error:
                self.error = body[:200].decode(errors="replace")

        def on_message_complete(self) -> None:
            status = self.parser.get_status_code()
            load.finished(status, self.events, f"HTTP {status}: {self.error}" if status != 200 else "")
            self.events, self.carry = 0, b""
            if load.stopping:
                self.t.close()
            else:
                self.t.write(load.request)

        def connection_lost(self, exc: Exception | None) -> None:
            if not load.stopping:
                load.finished(0, 0, f"connection lost: {exc!r}")
            open_conns[0] -= 1
            if open_conns[0] == 0:
                closed.set()

    host, port = load.url.split("//", 1)[1].rsplit(":", 1)
    await asyncio.gather(*(loop.create_connection(Conn, host, int(port)) for _ in range(load.concurrency)))
    await until
    await asyncio.wait_for(closed.wait(), 60)


async def run_aiohttp(load: Load, until: asyncio.Future[None]) -> None:
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def worker() -> None:
            while not load.stopping:
                async with session.post(load.url + "/v1/completions", data=load.body, headers=headers) as resp:
                    events, carry = 0, b""
                    async for data in resp.content.iter_any():
                        load.reads += load.measuring
                        events += (carry + data).count(b"data: ")
                        carry = data[-5:]
                    load.finished(resp.status, events)

        tasks = [asyncio.ensure_future(worker()) for _ in range(load.concurrency)]
        await until
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--serve-stub"] or len(sys.argv) < 3:
        sys.exit(__doc__)
    serve_stub(sys.argv[2], "--burst" in sys.argv[3:])
