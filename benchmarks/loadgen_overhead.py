"""Can the load generator, on one core, drive 500+ short streamed requests per second?

The load generator (``loadgen.runner.run_load``, the same code ``pdgate bench`` runs) is pinned to
core 0 and sends short streamed completions (16 output chunks + usage + ``[DONE]``) as a Poisson
process to a stub server pinned to core 1. The stub is a raw asyncio protocol that answers every
request with a fixed SSE stream, one event every ``--gap-ms`` (each a separate read, as from a
real engine), so the measurement is the load generator's, not an
engine's. For each offered rate it prints the achieved rate, the client's CPU per request and
its share of its core, and how late requests left compared with their schedule (p50/p99): when
the generator cannot keep up, lateness grows without bound.

    .venv/bin/python benchmarks/loadgen_overhead.py [--rates 250,500,750,1000] [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdgate.loadgen.client import Target
from pdgate.loadgen.runner import LoadConfig, run_load
from pdgate.loadgen.types import BenchRequest

CHUNKS = 16


def stub_response() -> list[bytes]:
    """The response as the pieces the stub writes one by one: head + first event, then each event."""
    events = [
        b"data: " + json.dumps({"choices": [{"index": 0, "text": " tok"}]}).encode() + b"\n\n" for _ in range(CHUNKS)
    ]
    events.append(
        b"data: "
        + json.dumps(
            {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": CHUNKS, "total_tokens": 8 + CHUNKS}}
        ).encode()
        + b"\n\n"
    )
    events.append(b"data: [DONE]\n\n")
    pieces = [b"%x\r\n%b\r\n" % (len(e), e) for e in events]
    pieces[-1] += b"0\r\n\r\n"
    pieces[0] = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: keep-alive\r\n\r\n" + pieces[0]
    )
    return pieces


def serve_stub(port: int, gap_s: float, ready: multiprocessing.synchronize.Event) -> None:
    """One core, raw protocol: answer each request (head + Content-Length body) with the stream,
    one event every ``gap_s`` (so that, as with a real engine, each event is a separate read)."""
    os.sched_setaffinity(0, {1})
    import uvloop

    pieces = stub_response()
    loop: asyncio.AbstractEventLoop

    class Stub(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while True:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buffer[:end].lower()
                i = head.find(b"content-length:")
                length = (
                    int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
                )
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length :]
                self.send(0)

        def send(self, i: int) -> None:
            if self.transport.is_closing():
                return
            self.transport.write(pieces[i])
            if i + 1 < len(pieces):
                loop.call_later(gap_s, self.send, i + 1)

    async def main() -> None:
        nonlocal loop
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Stub, "127.0.0.1", port)
        ready.set()
        async with server:
            await server.serve_forever()

    uvloop.run(main())


async def measure(url: str, rate: float, duration: float) -> dict[str, float]:
    n = int(rate * duration)
    requests = [BenchRequest(i, "completions", CHUNKS, prompt="hello world") for i in range(n)]
    results, overhead = await run_load(Target("stub", url, "m"), requests, LoadConfig(rate=rate, seed=1))
    ok = [r for r in results if r.ok]
    late = np.array([r.sent_s - r.scheduled_s for r in results]) * 1e3
    span = max(r.end_s for r in results) - min(r.sent_s for r in results)
    return {
        "offered": rate,
        "achieved": len(ok) / span,
        "ok": len(ok),
        "n": n,
        "cpu_us": overhead.cpu_per_request_us,
        "cpu_share": overhead.cpu_share,
        "late_p50_ms": float(np.percentile(late, 50)),
        "late_p99_ms": float(np.percentile(late, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="250,500,750,1000")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--gap-ms", type=float, default=2.0, help="time between the stub's SSE events")
    args = parser.parse_args()
    import socket

    import uvloop

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ready = multiprocessing.Event()
    stub = multiprocessing.Process(target=serve_stub, args=(port, args.gap_ms / 1e3, ready), daemon=True)
    stub.start()
    try:
        if not ready.wait(10):
            raise SystemExit("stub server did not start")
        os.sched_setaffinity(0, {0})
        print(
            f"load generator on core 0, stub server on core 1; {CHUNKS}-chunk streams, an event every "
            f"{args.gap_ms:g} ms, Poisson arrivals, {args.duration:g} s per rate"
        )
        print(
            f"{'offered/s':>9} {'achieved/s':>10} {'ok':>6} {'CPU µs/req':>10} {'core share':>10} "
            f"{'late p50 ms':>11} {'late p99 ms':>11}"
        )
        for rate in (float(r) for r in args.rates.split(",")):
            row = uvloop.run(measure(f"http://127.0.0.1:{port}", rate, args.duration))
            print(
                f"{row['offered']:>9.0f} {row['achieved']:>10.1f} {row['ok']:>6d} {row['cpu_us']:>10.0f} "
                f"{row['cpu_share']:>10.2f} {row['late_p50_ms']:>11.2f} {row['late_p99_ms']:>11.2f}"
            )
    finally:
        stub.terminate()
        stub.join(5)


if __name__ == "__main__":
    main()
