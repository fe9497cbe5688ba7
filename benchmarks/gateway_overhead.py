#!/usr/bin/env python3
"""The gateway's own cost: CPU per request and added latency, against a direct connection to the
engine and against a minimal aiohttp+uvloop reverse proxy.

    python benchmarks/gateway_overhead.py [--requests 2000] [--streams 500] [--concurrency 16]
        [--repeat 3] [--rate 50] [--duration 10] [--rounds 5] [--time-scale 1000]
        [--paced-time-scale 5] [--paced-streams 300] [--paths direct,minimal,gateway]
        [--skip-cpu] [--skip-latency] [--wait-quiet S] [--py-spy DIR] [--hold]

One simulated engine (``pdgate engine sim --role both``) is the backend of each path:

* ``direct``: the client talks to the engine;
* ``minimal``: a ~40-line aiohttp+uvloop reverse proxy (:func:`serve_minimal_proxy`, run as its
  own process: it forwards the POST body and relays the response bytes, streamed chunks as they
  come, over one shared ClientSession): the floor for an aiohttp proxy;
* ``gateway``: ``pdgate serve`` over that one ``both`` instance (kind ``sim``, no KV events,
  default scrape and health periods: /metrics every 1 s, /health every 2 s);
* ``raw`` (only with ``--paths ...,raw``): :func:`serve_raw_relay`, a byte-level relay on raw
  uvloop Protocols, not a usable proxy: the floor of what a Python proxy can cost.
* ``traced`` (only with ``--paths ...,traced``): the same gateway with OpenTelemetry tracing on,
  every request sampled, its spans exported over OTLP/HTTP to :func:`serve_otlp_sink` (a process
  that accepts and discards them). The gateway's CPU includes its exporter thread.
* ``baseline`` (only with ``--baseline-tree DIR``): the gateway of another checkout (e.g. a
  ``git worktree`` of an older commit) over the same engine: a same-run comparison across
  versions, e.g. the cost of tracing code with tracing off.

Measured from this aiohttp (uvloop) client process:

1. CPU: utime + stime of the proxy process (``/proc/PID/stat``, ticks of 1/SC_CLK_TCK s) over
   ``--requests`` non-streamed completions (a prompt of a few tokens, ``max_tokens`` 1) and over
   ``--streams`` streamed ones (``max_tokens`` 64, ``ignore_eos``: 64 SSE chunks + ``[DONE]``),
   ``--concurrency`` in flight, after a warm-up; divided by the number of requests. The gateway's
   idle CPU (its periodic scrape and health check; measured first, from schedstat) is subtracted.
   Each path is measured ``--repeat`` times, interleaved, and the median run is reported. The
   engine's and the client's CPU per request are printed too: on this host they compete with
   the proxy for the same cores, and so does anything else running (printed as "other procs").
   Streams are measured twice:

   * "burst", on an engine at ``--time-scale`` (default 1000: engine time negligible). The engine
     emits its tokens faster than a proxy relays them, so a proxy reads several SSE events per
     ``recv`` and writes them as one: fewer, larger chunks (the "client reads" column says how
     many reached the client). The cheapest case.
   * "paced", on a second engine started afterwards at ``--paced-time-scale`` (default 5: a
     decode step every ~2 ms at batch 16), so (nearly) every SSE event arrives on its own and costs one
     read and one write: what a proxy pays with real engines, whose tokens are ms apart.

2. Latency at a fixed offered load (burst engine): streamed requests (64 chunks) arriving as a
   Poisson process at ``--rate`` per second for ``--duration`` seconds per path, in
   ``--rounds`` interleaved rounds (so a burst of foreign load hits every path alike).
   End-to-end latency and TTFT percentiles; "added" is a path's percentile minus the direct
   path's percentile.
3. Stalls: the gap between consecutive reads of one stream at the client (after the first byte),
   max and p99.9, in the latency phase. A ~40 ms gap is the signature of Nagle's algorithm meeting
   a delayed ACK (TCP_NODELAY missing on some hop); sglang-router showed such stalls.

``--py-spy DIR`` adds uncounted runs of the gateway with ``py-spy record`` attached to its PID
(collapsed stacks and speedscope files in DIR, top functions printed). Every process started
here is stopped at the end, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web

REPO_ROOT = Path(__file__).resolve().parents[1]
for extra in (REPO_ROOT, REPO_ROOT / "tests", REPO_ROOT / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from _host import CpuWindow, print_table, proc_sched_s, wait_quiet
from support.fleet import (
    MODEL,
    engine_flags,
    instance_entry,
    start_gateway,
    write_config,
)
from support.layout import link_installed_layout
from support.procs import PdgateProcess, start_pdgate, start_sim

READY_RE = re.compile(r"ready: (http://\S+)")
STALL_MS = 30.0  # a gap this long is a Nagle / delayed-ACK stall, not scheduling noise
PROMPT = "Hello, my name is"  # a few tokens: below one KV block, so no prefix hashing work

# Measured on this kind of 2-core machine (/work/shared/REAL_ENGINES.md, "Peer routers"):
# CPU µs per non-streamed request, per 64-chunk stream.
REFERENCE = [
    ("sglang-router 0.3.2 (Rust)", "~71-84", "~600-690", "~40 ms stalls in streams (p90/p99)"),
    ("vllm-router 0.1.17 (Rust)", "~71-84", "~600-690", ""),
    ("36-line aiohttp+uvloop proxy", "170", "529", ""),
]
RUST_NONSTREAM_US = (71.0, 84.0)
RUST_STREAM_US = (600.0, 690.0)
REF_MINIMAL_US = (170.0, 529.0)
TARGET_STREAM_US = 600.0  # beat the Rust routers on streams
TARGET_NONSTREAM_US = 110.0  # within ~1.4x of them on non-streamed requests

STARTED: list[PdgateProcess] = []  # every child process, stopped again in main() whatever happens


# ------------------------------------------------------------------ the minimal reverse proxy
async def serve_app_until_signalled(app: web.Application, label: str) -> None:
    """Serve ``app`` on a free loopback port, print ``LABEL ready: URL``, run until SIGINT/SIGTERM."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"{label} ready: http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve_minimal_proxy(upstream: str) -> None:
    """A minimal aiohttp+uvloop reverse proxy: POST body in, response bytes out, streamed as they come."""
    import uvloop

    async def main() -> None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

        async def forward(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
            async with session.post(upstream + request.path, data=body, headers=headers) as up:
                ctype = up.headers.get("Content-Type", "application/json")
                if not ctype.startswith("text/event-stream"):
                    return web.Response(body=await up.read(), status=up.status, headers={"Content-Type": ctype})
                resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp

        app = web.Application()
        app.router.add_post("/{tail:.*}", forward)
        try:
            await serve_app_until_signalled(app, "minimal proxy")
        finally:
            await session.close()

    uvloop.run(main())


def serve_raw_relay(upstream: str) -> None:
    """Not a usable proxy: the floor of a Python one. A byte-level HTTP/1.1 relay on raw uvloop
    Protocols (no aiohttp, no task per request): the request bytes go upstream unchanged, the
    response bytes (the engine's own chunked framing) come back as they arrive, upstream
    connections are kept alive. It tracks framing only to know when a response ends (Content-Length,
    or the ``0\\r\\n\\r\\n`` chunked terminator, a heuristic that holds for SSE), and has no
    backpressure, timeouts or error handling."""
    from urllib.parse import urlsplit

    import uvloop

    up = urlsplit(upstream)
    pool: list[Upstream] = []

    def content_length(head: bytes) -> int:
        i = head.find(b"content-length:")
        if i < 0:
            return 0
        j = head.find(b"\r\n", i)
        return int(head[i + 15 : j if j > 0 else None])

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.client: Client | None = None

        def start(self, client: Client, raw: bytes) -> None:
            self.client, self.head, self.left, self.chunked, self.tail = client, b"", None, False, b""
            self.t.write(raw)

        def data_received(self, data: bytes) -> None:
            self.client.t.write(data)
            if self.left is None and not self.chunked:  # still in the response head
                self.head += data
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, data = self.head[:end].lower(), self.head[end + 4 :]
                self.chunked = b"transfer-encoding: chunked" in head
                self.left = None if self.chunked else content_length(head)
            if self.chunked:
                self.tail = (self.tail + data)[-5:]
                done = self.tail == b"0\r\n\r\n"
            else:
                self.left -= len(data)
                done = self.left <= 0
            if done:
                self.client = None
                pool.append(self)

        def connection_lost(self, exc: Exception | None) -> None:
            if self in pool:
                pool.remove(self)
            if self.client is not None:
                self.client.t.close()

    class Client(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            size = end + 4 + content_length(self.buf[:end].lower())
            if len(self.buf) < size:
                return
            raw, self.buf = self.buf[:size], self.buf[size:]
            if pool:
                pool.pop().start(self, raw)
            else:
                asyncio.ensure_future(self.connect(raw))

        async def connect(self, raw: bytes) -> None:
            _, conn = await asyncio.get_running_loop().create_connection(Upstream, up.hostname, up.port)
            conn.start(self, raw)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", 0)
        print(f"raw relay ready: http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    uvloop.run(main())


def serve_otlp_sink(_: str) -> None:
    """An OTLP/HTTP trace receiver that accepts every export and keeps nothing (the ``traced`` path's collector)."""
    import uvloop

    async def main() -> None:
        received = {"exports": 0, "bytes": 0}

        async def export(request: web.Request) -> web.Response:
            received["exports"] += 1
            received["bytes"] += len(await request.read())
            return web.Response(body=b"", content_type="application/x-protobuf")

        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/traces", export)
        await serve_app_until_signalled(app, "otlp sink")
        print(f"otlp sink: {received['exports']} exports, {received['bytes']} bytes", flush=True)

    uvloop.run(main())


HELPERS = {
    "minimal": ("--serve-minimal-proxy", serve_minimal_proxy),
    "raw": ("--serve-raw-relay", serve_raw_relay),
    "otlp-sink": ("--serve-otlp-sink", serve_otlp_sink),
}


def start_helper(name: str, upstream: str, timeout: float = 30.0) -> PdgateProcess:
    """This file, run as ``--serve-minimal-proxy URL`` (or ``--serve-raw-relay``), until its ``ready: URL`` line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), HELPERS[name][0], upstream]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    child = PdgateProcess(cmd, proc)
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if not selector.select(timeout=0.2):
                continue
            line = proc.stdout.readline()
            child.output.append(line)
            match = READY_RE.search(line)
            if match:
                child.url = match.group(1)
                threading.Thread(target=lambda: child.output.extend(proc.stdout), daemon=True).start()
                return child
    finally:
        selector.close()
    child.stop()
    raise RuntimeError(f"{name} proxy did not become ready:\n{child.log}")


# ------------------------------------------------------------------------------------ data
@dataclass
class ProxyPath:
    name: str  # direct | minimal | gateway
    url: str
    proxy_pid: int | None  # None for direct
    idle_cpu_s_per_s: float = 0.0


@dataclass
class CpuRun:
    requests: int
    wall_s: float
    proxy_us: float | None  # per request, idle-corrected; None for direct
    engine_us: float
    client_us: float
    events_per_req: float
    reads_per_req: float
    foreign_cores: float
    steal_cores: float


@dataclass
class StreamSample:
    latency_s: float = 0.0
    ttft_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    ok: bool = True


KINDS = {  # kind -> (label, streamed)
    "nonstream": ("non-stream", False),
    "stream": ("stream64 burst", True),
    "paced": ("stream64 paced", True),
}


def body(stream: bool) -> bytes:
    if stream:
        return json.dumps(
            {"model": MODEL, "prompt": PROMPT, "max_tokens": 64, "ignore_eos": True, "stream": True}
        ).encode()
    return json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 1}).encode()


# ------------------------------------------------------------------------------------ load
async def closed_loop(url: str, stream: bool, n: int, concurrency: int) -> tuple[float, int, int]:
    """Send ``n`` requests, ``concurrency`` at a time: (wall seconds, client reads, SSE events)."""
    payload = body(stream)
    headers = {"Content-Type": "application/json"}
    endpoint = url + "/v1/completions"
    left = n
    reads = events = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False) as session:

        async def worker() -> None:
            nonlocal left, reads, events
            while left > 0:
                left -= 1
                async with session.post(endpoint, data=payload, headers=headers) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{endpoint}: HTTP {resp.status}: {(await resp.text())[:300]}")
                    async for chunk in resp.content.iter_any():
                        reads += 1
                        events += chunk.count(b"data: ")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, reads, events


async def measure_cpu(
    path: ProxyPath, engine_pid: int, all_pids: list[int], kind: str, n: int, args: argparse.Namespace
) -> CpuRun:
    stream = KINDS[kind][1]
    await closed_loop(path.url, stream, args.warmup, args.concurrency)
    with CpuWindow(all_pids) as w:
        _, reads, events = await closed_loop(path.url, stream, n, args.concurrency)
    proxy_us = None
    if path.proxy_pid is not None:
        proxy_us = 1e6 * max(0.0, w.used[path.proxy_pid] - path.idle_cpu_s_per_s * w.wall) / n
    return CpuRun(
        n,
        w.wall,
        proxy_us,
        1e6 * w.used[engine_pid] / n,
        1e6 * w.used[os.getpid()] / n,
        events / n,
        reads / n,
        w.foreign_cores,
        w.steal_cores,
    )


async def poisson_streams(url: str, rate: float, duration: float, rng: random.Random) -> list[StreamSample]:
    """Open loop: 64-chunk streams arriving as a Poisson process at ``rate``/s for ``duration`` s."""
    payload = body(True)
    headers = {"Content-Type": "application/json"}
    endpoint = url + "/v1/completions"
    samples: list[StreamSample] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False) as session:

        async def one(keep: bool) -> None:
            sample = StreamSample()
            t0 = time.perf_counter()
            try:
                async with session.post(endpoint, data=payload, headers=headers) as resp:
                    last = None
                    async for _ in resp.content.iter_any():
                        now = time.perf_counter()
                        if last is None:
                            sample.ttft_s = now - t0
                        else:
                            sample.gaps_s.append(now - last)
                        last = now
                    sample.ok = resp.status == 200
            except aiohttp.ClientError:
                sample.ok = False
            sample.latency_s = time.perf_counter() - t0
            if keep:
                samples.append(sample)

        await asyncio.gather(*(one(False) for _ in range(8)))  # open connections first
        tasks = []
        start = time.perf_counter()
        t = rng.expovariate(rate)
        while t < duration:
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(True)))
            t += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return samples


async def measure_idle(paths: list[ProxyPath], seconds: float, settle_s: float) -> None:
    """Idle CPU of each proxy (the gateway scrapes /metrics and checks /health periodically).

    Measured after ``settle_s``: a gateway may still be busy for a moment after its ready line
    (seen: the tree before the one import root used ~28 ms/s in its first 2 s, then ~1.7 ms/s
    like today's), and subtracting such a transient as idle would flatter it.
    """
    # schedstat, not /proc/PID/stat: an idle gateway uses about one 10 ms tick in several seconds
    proxies = [p for p in paths if p.proxy_pid is not None]
    await asyncio.sleep(settle_s)
    before = {p.name: proc_sched_s(p.proxy_pid) for p in proxies}
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - t0
    for p in proxies:
        p.idle_cpu_s_per_s = (proc_sched_s(p.proxy_pid) - before[p.name]) / elapsed


# ------------------------------------------------------------------------------- profiling
async def profile_gateway(args: argparse.Namespace, paths: list[ProxyPath], kinds: list[tuple[str, int]]) -> None:
    """Extra (uncounted) CPU runs of the gateway with ``py-spy record`` attached to its PID."""
    gateway = next((p for p in paths if p.name == "gateway"), None)
    if gateway is None:
        return
    out = Path(args.py_spy)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before profiling)
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    for kind, n in kinds:
        stream = KINDS[kind][1]
        await closed_loop(gateway.url, stream, args.warmup, args.concurrency)
        for fmt_, suffix in (("raw", "txt"), ("speedscope", "json")):
            target = out / f"gateway-{kind}.{suffix}"
            spy = await asyncio.create_subprocess_exec(
                py_spy,
                "record",
                "--pid",
                str(gateway.proxy_pid),
                "--rate",
                str(args.py_spy_rate),
                "--format",
                fmt_,
                "--output",
                str(target),
                "--nonblocking",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                await asyncio.sleep(1.0)  # py-spy attaches
                await closed_loop(gateway.url, stream, n * args.py_spy_scale, args.concurrency)
            finally:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                try:
                    _, err = await asyncio.wait_for(spy.communicate(), 60)
                except TimeoutError:
                    spy.kill()
                    _, err = await spy.communicate()
            status = "ok" if target.exists() else "FAILED: " + err.decode(errors="replace")[-300:]
            print(f"[py-spy] gateway {kind}: {target} ({status})", flush=True)
            if fmt_ == "raw" and target.exists():
                print_hotspots(target)


GATEWAY_FILES = ("gateway/", "scheduler/", "adapters/", "engines/sim/tokenizer")


def print_hotspots(collapsed: Path, top: int = 20) -> None:
    """Self and inclusive sample shares per function, from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = []
        for frame in stack.split(";"):  # "func (path/to/file.py:LINE)"
            name, _, where = frame.partition(" (")
            file = where.rsplit(":", 1)[0]
            short = "/".join(file.split("/")[-2:])
            frames.append(f"{name} ({short})")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        return
    print(f"  {total} samples; top self time:")
    for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * c / total:5.1f}%  {f}")
    print("  top inclusive time, gateway code:")
    ours = [(f, c) for f, c in incl.items() if any(m in f for m in GATEWAY_FILES)]
    for f, c in sorted(ours, key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * c / total:5.1f}%  {f}")


# -------------------------------------------------------------------------------- reporting
def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def median_run(runs: list[CpuRun]) -> CpuRun | None:
    if not runs:
        return None
    key = (lambda r: r.proxy_us) if runs[0].proxy_us is not None else (lambda r: r.engine_us)
    return sorted(runs, key=key)[len(runs) // 2]


def report(
    args: argparse.Namespace,
    names: list[str],
    cpu: dict[str, dict[str, list[CpuRun]]],
    idle: dict[str, dict[str, float]],
    lat: dict[str, list[StreamSample]],
    lat_foreign: list[float],
) -> None:
    med = {p: {k: median_run(cpu.get(p, {}).get(k, [])) for k in KINDS} for p in names}

    def proxy_us(p: str, k: str) -> float | None:
        r = med[p][k]
        return r.proxy_us if r else None

    print()
    print(
        f"== gateway overhead: 1 sim engine, {os.cpu_count()} cores, concurrency {args.concurrency} (CPU), "
        f"Poisson {args.rate:g} streams/s (latency) =="
    )
    header = [
        "path",
        "CPU µs/req",
        "µs/stream64 burst",
        "µs/stream64 paced",
        "x minimal (req/burst/paced)",
        "e2e p50/p99 ms",
        "added p50/p99 ms",
        "TTFT p50/p99 ms",
        "gap max/p99.9 ms",
    ]
    rows = []
    direct_ok = [x for x in lat.get("direct", []) if x.ok]
    for p in names:
        ratios = []
        for k in KINDS:
            a, b = proxy_us(p, k), proxy_us("minimal", k) if "minimal" in names else None
            ratios.append(f"{a / b:.2f}" if a is not None and b else "-")
        e2e = added = ttft = gaps = "-"
        ok = [x for x in lat.get(p, []) if x.ok]
        if ok:
            lats = [x.latency_s * 1e3 for x in ok]
            ttfts = [x.ttft_s * 1e3 for x in ok]
            all_gaps = [g * 1e3 for x in ok for g in x.gaps_s]
            e2e = f"{pct(lats, 50):.2f} / {pct(lats, 99):.2f}"
            ttft = f"{pct(ttfts, 50):.2f} / {pct(ttfts, 99):.2f}"
            gaps = f"{max(all_gaps):.1f} / {pct(all_gaps, 99.9):.1f}" if all_gaps else "-"
            if direct_ok and p != "direct":
                dl = [x.latency_s * 1e3 for x in direct_ok]
                added = f"{pct(lats, 50) - pct(dl, 50):+.2f} / {pct(lats, 99) - pct(dl, 99):+.2f}"
        rows.append(
            [
                p,
                fmt(proxy_us(p, "nonstream")),
                fmt(proxy_us(p, "stream")),
                fmt(proxy_us(p, "paced")),
                " / ".join(ratios) if p != "direct" else "-",
                e2e,
                added,
                ttft,
                gaps,
            ]
        )
    print_table(header, rows)

    if any(cpu.values()):
        print(
            f"\nCPU runs (median of {args.repeat}; µs per request; the engine and this client share the "
            f"{os.cpu_count()} cores with the proxy; 'other procs' = CPU of processes not started here):"
        )
        header = [
            "path",
            "kind",
            "n",
            "req/s",
            "proxy",
            "engine",
            "client",
            "SSE events",
            "client reads",
            "proxy idle µs/s",
            "other procs (cores)",
            "steal",
            "every run (proxy)",
        ]
        rows = []
        for p in names:
            for k, (label, _) in KINDS.items():
                r, runs = med[p][k], cpu.get(p, {}).get(k, [])
                if r is None:
                    continue
                backend = "paced" if k == "paced" else "burst"
                rows.append(
                    [
                        p,
                        label,
                        str(r.requests),
                        fmt(r.requests / r.wall_s),
                        fmt(r.proxy_us),
                        fmt(r.engine_us),
                        fmt(r.client_us),
                        fmt(r.events_per_req, 1),
                        fmt(r.reads_per_req, 1),
                        fmt(1e6 * idle[backend][p]) if p in idle[backend] else "-",
                        ", ".join(f"{x.foreign_cores:.2f}" for x in runs),
                        f"{max(x.steal_cores for x in runs):.2f}",
                        ", ".join(fmt(x.proxy_us) for x in runs) if r.proxy_us is not None else "-",
                    ]
                )
        print_table(header, rows)
        for p in names:
            n, s = proxy_us(p, "nonstream"), proxy_us(p, "paced")
            if n is not None and s is not None:
                print(f"  {p}: relaying one SSE chunk (paced stream - non-stream) / 64 = {(s - n) / 64:.1f} µs")
        worst = max((x.foreign_cores for t in cpu.values() for runs in t.values() for x in runs), default=0.0)
        if worst > 0.1:
            print(
                f"  WARNING: other processes used up to {worst:.2f} cores during a CPU run: the host was not "
                "quiet; the figures are inflated (rerun on a quiet host)"
            )

    if lat:
        print(
            f"\nlatency phase: Poisson {args.rate:g} streams/s of 64 chunks, {args.duration:g} s per path in "
            f"{args.rounds} interleaved rounds; other processes used {np.mean(lat_foreign):.2f} cores on average"
        )
        for p in names:
            ok = [x for x in lat.get(p, []) if x.ok]
            if not lat.get(p):
                continue
            all_gaps = [g * 1e3 for x in ok for g in x.gaps_s]
            stalls = sum(1 for g in all_gaps if g >= STALL_MS)
            reads = np.mean([len(x.gaps_s) + 1 for x in ok]) if ok else float("nan")
            verdict = "no ~40 ms Nagle/delayed-ACK stalls: TCP_NODELAY effective" if not stalls else "STALLS"
            print(
                f"  {p:8s} {len(ok)}/{len(lat[p])} ok, {fmt(reads, 1)} reads/stream, gap p99 {fmt(pct(all_gaps, 99), 2)} ms, "
                f"gaps >= {STALL_MS:g} ms: {stalls} ({verdict})"
            )

    print("\nreference, /work/shared/REAL_ENGINES.md (same kind of 2-core machine), CPU µs:")
    print_table(["router", "per request", "per 64-chunk stream", "note"], [list(r) for r in REFERENCE])
    mn, mb = (
        proxy_us("minimal", "nonstream") if "minimal" in names else None,
        proxy_us("minimal", "stream") if "minimal" in names else None,
    )
    if mn and mb:
        fn, fb = mn / REF_MINIMAL_US[0], mb / REF_MINIMAL_US[1]
        print(
            f"  scaled to this run by (minimal proxy here / 36-line proxy there): Rust ~{RUST_NONSTREAM_US[0] * fn:.0f}-"
            f"{RUST_NONSTREAM_US[1] * fn:.0f} µs/req (x{fn:.2f}), ~{RUST_STREAM_US[0] * fb:.0f}-{RUST_STREAM_US[1] * fb:.0f} "
            f"µs/burst stream (x{fb:.2f})"
        )
    for other, question in (
        ("traced", "tracing every request (OTLP export included)"),
        ("baseline", f"the baseline tree {args.baseline_tree}"),
    ):
        if other in names and "gateway" in names:
            cells = []
            for k, (label, _) in KINDS.items():
                a, b = proxy_us("gateway", k), proxy_us(other, k)
                if a and b:
                    cells.append(f"{label}: {b:.0f} vs {a:.0f} µs ({b / a:.3f}x, {b - a:+.0f} µs)")
            print(f"\n{other} vs gateway, {question}: " + "; ".join(cells))
    gn, gb, gp = proxy_us("gateway", "nonstream"), proxy_us("gateway", "stream"), proxy_us("gateway", "paced")
    if gn is not None:
        print(
            f"\ntargets (absolute, vs REAL_ENGINES.md figures): non-stream < {TARGET_NONSTREAM_US:.0f} µs (~1.4x Rust): "
            f"{gn:.0f} µs -> {'MET' if gn < TARGET_NONSTREAM_US else 'MISSED'} ({gn / np.mean(RUST_NONSTREAM_US):.1f}x "
            "the Rust routers)"
        )
        for label, v in (("burst", gb), ("paced", gp)):
            if v is not None:
                print(
                    f"  64-chunk stream ({label}) < {TARGET_STREAM_US:.0f} µs (beat Rust): {v:.0f} µs -> "
                    f"{'MET' if v < TARGET_STREAM_US else 'MISSED'}"
                )


# ------------------------------------------------------------------------------------ main


def _gateway_program(tree: str) -> list[str]:
    """How to start the gateway of another checkout: trees from before the one import root
    (``gateway/cli.py``) run as ``python -m gateway.cli`` from their root; later ones through a
    link tree of the installed layout, ahead of this checkout's editable install."""
    root = Path(tree).resolve()
    if (root / "gateway" / "cli.py").exists():
        return [sys.executable, "-m", "gateway.cli"]
    links = link_installed_layout(root, Path(tempfile.mkdtemp(prefix="pdgate-baseline-")))
    return ["env", f"PYTHONPATH={links}", "PYTHONSAFEPATH=1", sys.executable, "-m", "pdgate.cli"]


class Fleet:
    """One sim engine and the proxies in front of it; stops what it started."""

    def __init__(self, time_scale: float, wanted: list[str], tmp: Path, baseline_tree: str | None = None) -> None:
        self.children: list[PdgateProcess] = []
        self.paths: list[ProxyPath] = []
        self.time_scale = time_scale
        try:
            self.engine = self._keep(start_sim(*engine_flags("both"), time_scale=time_scale))
            paths = [ProxyPath("direct", self.engine.url, None)]
            for name in ("minimal", "raw"):
                if name in wanted:
                    helper = self._keep(start_helper(name, self.engine.url))
                    paths.append(ProxyPath(name, helper.url, helper.proc.pid))
            # production defaults for the background work (scrape every 1 s, /health every 2 s)
            config = write_config(
                tmp / f"gateway-{time_scale:g}.yaml",
                [instance_entry(self.engine, "both", "sim")],
                scrape_interval_s=1.0,
                health={"interval_s": 2.0, "timeout_s": 2.0, "failure_threshold": 3, "cooldown_s": 5.0},
            )
            no_tracing = {"OTEL_SDK_DISABLED": "true"}  # whatever this shell's OTEL_* say
            if "gateway" in wanted:
                gateway = self._keep(start_gateway(config, env=no_tracing))
                paths.append(ProxyPath("gateway", gateway.url, gateway.proc.pid))
            if "baseline" in wanted and baseline_tree:
                baseline = self._keep(
                    start_pdgate(
                        "serve",
                        "--config",
                        str(config),
                        env=no_tracing,
                        cwd=baseline_tree,
                        program=_gateway_program(baseline_tree),
                    )
                )
                paths.append(ProxyPath("baseline", baseline.url, baseline.proc.pid))
            if "traced" in wanted:
                sink = self._keep(start_helper("otlp-sink", ""))
                traced = self._keep(
                    start_gateway(
                        config, env={"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url, "OTEL_TRACES_SAMPLER": "always_on"}
                    )
                )
                paths.append(ProxyPath("traced", traced.url, traced.proc.pid))
            self.paths = sorted((p for p in paths if p.name in wanted), key=lambda p: wanted.index(p.name))
        except BaseException:
            self.stop()
            raise
        print(
            f"engine (time scale {time_scale:g}) pid {self.engine.proc.pid} {self.engine.url}; "
            + "; ".join(f"{p.name} pid {p.proxy_pid} {p.url}" for p in self.paths if p.proxy_pid),
            flush=True,
        )

    def _keep(self, child: PdgateProcess) -> PdgateProcess:
        self.children.append(child)
        STARTED.append(child)
        return child

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children]

    def stop(self) -> None:
        while self.children:
            self.children.pop().stop()


async def run_fleet(
    args: argparse.Namespace,
    fleet: Fleet,
    kinds: list[tuple[str, int]],
    latency: bool,
    cpu: dict[str, dict[str, list[CpuRun]]],
    idle: dict[str, float],
    lat: dict[str, list[StreamSample]],
    lat_foreign: list[float],
) -> None:
    paths, engine_pid = fleet.paths, fleet.engine.proc.pid
    kinds = [(k, n) for k, n in kinds if n > 0]
    if kinds and not args.skip_cpu:
        await measure_idle(paths, args.idle_s, args.idle_settle_s)
        idle.update({p.name: p.idle_cpu_s_per_s for p in paths if p.proxy_pid is not None})
        for rep in range(args.repeat):
            for p in paths:
                for kind, n in kinds:
                    r = await measure_cpu(p, engine_pid, fleet.pids, kind, n, args)
                    cpu.setdefault(p.name, {}).setdefault(kind, []).append(r)
                    print(
                        f"[cpu {rep + 1}/{args.repeat}] {p.name:8s} {KINDS[kind][0]:15s} n={n:<5d} {n / r.wall_s:5.0f} req/s  "
                        f"proxy {fmt(r.proxy_us):>5s} µs  engine {r.engine_us:5.0f} µs  client {r.client_us:5.0f} µs  "
                        f"reads {r.reads_per_req:4.1f}  other procs {r.foreign_cores:.2f} cores",
                        flush=True,
                    )
    if args.py_spy and kinds:
        await profile_gateway(args, paths, kinds)
    if latency and not args.skip_latency:
        rng = random.Random(args.seed)
        per_round = args.duration / args.rounds
        for rnd in range(args.rounds):
            for p in paths:
                with CpuWindow(fleet.pids) as w:
                    lat.setdefault(p.name, []).extend(await poisson_streams(p.url, args.rate, per_round, rng))
                lat_foreign.append(w.foreign_cores)
            print(f"[latency] round {rnd + 1}/{args.rounds} done", flush=True)


async def run(args: argparse.Namespace, wanted: list[str], tmp: Path) -> None:
    cpu: dict[str, dict[str, list[CpuRun]]] = {}
    idle: dict[str, dict[str, float]] = {"burst": {}, "paced": {}}
    lat: dict[str, list[StreamSample]] = {}
    lat_foreign: list[float] = []
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    fleet = Fleet(args.time_scale, wanted, tmp, args.baseline_tree)
    try:
        await run_fleet(
            args,
            fleet,
            [("nonstream", args.requests), ("stream", args.streams)],
            True,
            cpu,
            idle["burst"],
            lat,
            lat_foreign,
        )
    finally:
        fleet.stop()
    if args.paced_time_scale > 0 and args.paced_streams > 0 and not args.skip_cpu:
        fleet = Fleet(args.paced_time_scale, wanted, tmp, args.baseline_tree)
        try:
            await run_fleet(args, fleet, [("paced", args.paced_streams)], False, cpu, idle["paced"], lat, lat_foreign)
        finally:
            fleet.stop()
    report(args, wanted, cpu, idle, lat, lat_foreign)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="non-streamed requests per CPU run")
    ap.add_argument("--streams", type=int, default=500, help="64-chunk streams per CPU run (burst engine)")
    ap.add_argument("--paced-streams", type=int, default=300, help="64-chunk streams per CPU run (paced engine)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight in the CPU runs")
    ap.add_argument("--warmup", type=int, default=100, help="requests sent before each CPU run")
    ap.add_argument(
        "--repeat", type=int, default=3, help="CPU runs per path and kind (interleaved); the median is reported"
    )
    ap.add_argument(
        "--idle-s", type=float, default=2.0, help="seconds of idle proxy CPU measured (and subtracted) first"
    )
    ap.add_argument(
        "--idle-settle-s", type=float, default=5.0, help="seconds after start-up before idle CPU is measured"
    )
    ap.add_argument("--rate", type=float, default=50.0, help="offered streams per second in the latency phase")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of the latency phase per path")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds the latency phase is split into")
    ap.add_argument("--time-scale", type=float, default=1000.0, help="time scale of the burst engine")
    ap.add_argument(
        "--paced-time-scale", type=float, default=5.0, help="time scale of the paced engine (0: skip the paced streams)"
    )
    ap.add_argument(
        "--paths",
        default="direct,minimal,gateway",
        help="comma-separated, from direct,minimal,gateway,raw,traced,baseline (raw: the byte-level relay, the floor "
        "of a Python proxy; traced: the gateway tracing every request to an OTLP sink; baseline: see --baseline-tree)",
    )
    ap.add_argument(
        "--baseline-tree",
        metavar="DIR",
        help="a checkout (e.g. `git worktree add DIR COMMIT`) whose gateway is measured as path 'baseline'",
    )
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for other processes on the host to use < 0.1 cores",
    )
    ap.add_argument(
        "--py-spy",
        metavar="DIR",
        help="also profile the gateway (extra, uncounted runs) with py-spy "
        "attached to its PID; collapsed stacks and speedscope files go to DIR",
    )
    ap.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--py-spy-scale", type=int, default=3, help="profiled runs send this many times the requests")
    ap.add_argument(
        "--hold",
        action="store_true",
        help="start the burst engine and the proxies, print PIDs and URLs, wait for Ctrl-C",
    )
    args = ap.parse_args()
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if unknown := set(args.paths) - {"direct", "minimal", "gateway", "raw", "traced", "baseline"}:
        ap.error(f"--paths: unknown {sorted(unknown)}")
    if ("baseline" in args.paths) != bool(args.baseline_tree):
        ap.error("path 'baseline' and --baseline-tree go together")
    if args.repeat < 1 or args.rounds < 1:
        ap.error("--repeat and --rounds must be >= 1")
    return args


def main() -> None:
    for flag, serve in HELPERS.values():
        if len(sys.argv) == 3 and sys.argv[1] == flag:
            serve(sys.argv[2])
            return
    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM also stops the children
    with tempfile.TemporaryDirectory(prefix="pdgate-bench-") as tmp:
        try:
            if args.hold:
                fleet = Fleet(args.time_scale, args.paths, Path(tmp))
                try:
                    print("holding; Ctrl-C to stop", flush=True)
                    while True:
                        time.sleep(3600)
                finally:
                    fleet.stop()
            import uvloop

            t0 = time.perf_counter()
            uvloop.run(run(args, args.paths, Path(tmp)))
            print(f"\n(total {time.perf_counter() - t0:.0f} s)")
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)
        finally:
            for child in reversed(STARTED):
                child.stop()


if __name__ == "__main__":
    main()
