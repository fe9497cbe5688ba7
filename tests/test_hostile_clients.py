"""A real gateway over a simulated engine against hostile or broken clients: slow-loris heads,
bodies that never end, huge headers, thousands of idle connections, a stream reader that stops
reading. Each gets the documented answer, is counted by its limit, and leaves the gateway (and
the engine behind it) serving others with nothing held for it."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import pytest
from support.fleet import MODEL, call, engine_flags, get_json, instance_entry, metric, start_gateway, write_config
from support.procs import PdgateProcess, start_sim
from support.waiting import wait_until

LIMITS = {
    "max_header_bytes": 8192,
    "max_connections": 2100,
    "request_timeout_s": 1.0,
    "slow_reader_timeout_s": 1.0,
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[tuple[PdgateProcess, PdgateProcess]]:
    engine = start_sim(*engine_flags("both"), time_scale=50.0)
    try:
        config = write_config(
            tmp_path_factory.mktemp("hostile") / "fleet.yaml",
            [instance_entry(engine, "both", "sim")],
            max_body_bytes=4096,
            limits=LIMITS,
        )
        gateway = start_gateway(config)
        try:
            yield gateway, engine
        finally:
            gateway.stop()
    finally:
        engine.stop()


def raw(gateway: PdgateProcess, rcvbuf: int | None = None) -> socket.socket:
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """A whole Content-Length answer: status, lower-case headers, JSON body."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"closed before an answer: {data!r}"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, json.loads(body)


def openai_error(body: dict) -> str:
    assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "param", "code"}
    return body["error"]["message"]


def hits(gateway: PdgateProcess, limit: str) -> float:
    return metric(gateway.url, "pdgate_http_limit_hits_total", limit=limit)


def still_serves(gateway: PdgateProcess) -> None:
    status, body = call(f"{gateway.url}/v1/completions", {"model": MODEL, "prompt": "still there?", "max_tokens": 2})
    assert status == 200, body


def test_a_slow_loris_head_gets_408_and_costs_nothing_after(fleet):
    gateway, _ = fleet
    before = hits(gateway, "request_timeout")
    sock = raw(gateway)
    started = time.monotonic()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n"
    try:
        for byte in head:  # one byte every 20 ms: 2.5 s for the head, the limit is 1 s
            sock.send(bytes([byte]))
            time.sleep(0.02)  # the client's pace (this is what is tested), not a wait for the gateway
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, headers, body = answer(sock)
    assert status == 408 and headers["connection"] == "close"
    assert "in time" in openai_error(body)
    assert time.monotonic() - started < 2.0
    sock.close()
    assert hits(gateway, "request_timeout") == before + 1
    still_serves(gateway)


def test_a_body_that_never_ends_is_refused_at_the_limit(fleet):
    gateway, _ = fleet
    before = hits(gateway, "body")
    sock = raw(gateway)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    sock.sendall(b"Transfer-Encoding: chunked\r\n\r\n")
    try:
        for _ in range(64):  # 64 KiB of chunks, never the last one; the limit is 4 KiB
            sock.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused while still sending
    wait_until(lambda: hits(gateway, "body") == before + 1, timeout=5, message="the 413 to be counted")
    sock.close()
    still_serves(gateway)


def test_huge_headers_get_431(fleet):
    gateway, _ = fleet
    before = hits(gateway, "header")
    sock = raw(gateway)
    cookie = "c" * 10_000
    sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n".encode())
    status, _, body = answer(sock)
    assert status == 431 and "8192" in openai_error(body)
    sock.close()
    assert hits(gateway, "header") == before + 1


def test_thousands_of_idle_connections_then_more_than_the_limit(fleet):
    gateway, _ = fleet
    before = hits(gateway, "connections")
    idle = [raw(gateway) for _ in range(LIMITS["max_connections"] - 10)]
    try:
        wait_until(
            lambda: metric(gateway.url, "pdgate_http_connections") >= len(idle),
            timeout=10,
            message="the gateway to hold every idle connection",
        )
        still_serves(gateway)  # the idle ones cost it nothing
        extra = [raw(gateway) for _ in range(20)]  # the limit is reached (the scrape above used one)
        refused = []
        for sock in extra:
            try:
                sock.settimeout(0.5)
                status, headers, body = answer(sock)
                refused.append((status, headers.get("retry-after")))
            except TimeoutError:
                pass  # within the limit: accepted and waiting for a request
        assert refused and all(r == (503, "1") for r in refused)
        for sock in extra:
            sock.close()
    finally:
        for sock in idle:
            sock.close()
    assert hits(gateway, "connections") == before + len(refused)
    wait_until(lambda: metric(gateway.url, "pdgate_http_connections") <= 2, timeout=10, message="idle ones to go")
    still_serves(gateway)


def test_a_stream_reader_that_stops_reading_is_dropped_and_its_engine_work_aborted(tmp_path):
    """An answer larger than the sockets' buffers (~8 MB) to a client that reads only its head:
    the gateway pauses the engine leg, drops the client after slow_reader_timeout_s, aborts the
    request on the engine, and its memory does not hold the answer."""
    engine = start_sim(*engine_flags("both", extra=("--max-model-len", "65536")), time_scale=400.0)
    config = write_config(
        tmp_path / "fleet.yaml",
        [instance_entry(engine, "both", "sim")],
        models=[{"name": MODEL, "max_model_len": 65536}],
        limits={"slow_reader_timeout_s": 1.0},
    )
    gateway = start_gateway(config)
    try:
        rss_before = metric(gateway.url, "process_resident_memory_bytes")
        sock = raw(gateway, rcvbuf=4096)
        body = json.dumps(
            {"model": MODEL, "prompt": "a very long story", "max_tokens": 60000, "stream": True, "ignore_eos": True}
        ).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # streaming; this client reads nothing more
        wait_until(lambda: hits(gateway, "slow_reader") == 1, timeout=30, message="the gateway to drop the slow reader")
        wait_until(
            lambda: get_json(f"{engine.url}/sim/state")["num_running"] == 0,
            timeout=5,
            message="the engine to abort the dropped request",
        )
        assert metric(gateway.url, "pdgate_instance_inflight_requests") == 0
        assert metric(gateway.url, "pdgate_requests_total", status="499") == 1
        assert metric(gateway.url, "process_resident_memory_bytes") - rss_before < 20e6
        sock.close()
        still_serves(gateway)
    finally:
        gateway.stop()
        engine.stop()


def test_a_thousand_requests_at_once_all_get_a_documented_answer(fleet):
    """The peers' trackers have a router that falls over above ~1k concurrent requests: here each
    gets an answer (served, or refused with Retry-After), none a 5xx, and the gateway serves on."""
    gateway, _ = fleet
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": MODEL, "prompt": "one of many", "max_tokens": 4, "ignore_eos": True}).encode()
    wire = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    wire += b"Content-Length: %d\r\n\r\n%b" % (len(body), body)

    async def one() -> tuple[int, str | None]:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(wire)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            await reader.readexactly(int(headers["content-length"]))
            return int(lines[0].split()[1]), headers.get("retry-after")
        finally:
            writer.close()

    async def all_at_once() -> list[tuple[int, str | None]]:
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(1000))), 60)

    answers = asyncio.run(all_at_once())
    statuses = {status for status, _ in answers}
    assert statuses <= {200, 429, 503}, statuses
    assert all(retry is not None for status, retry in answers if status != 200)
    assert sum(1 for status, _ in answers if status == 200) > 0
    still_serves(gateway)
