#!/usr/bin/env python3
"""The gateway's own cost: CPU per request and added latency, against a direct connection to the
engine and against a minimal aiohttp+uvloop reverse proxy.

    python benchmarks/gateway_overhead.py [--requests 2000] [--streams 500] [--concurrency 16]
        [--rate 50] [--duration 10] [--time-scale 1000] [--repeat 2] [--paths direct,minimal,gateway]
        [--skip-cpu] [--skip-latency] [--hold]

One simulated engine (``pdgate engine sim --role both``, time scale ``--time-scale`` so that
engine time is negligible) is the backend of three paths, measured in one run:

* ``direct``: the client talks to the engine;
* ``minimal``: a ~40-line aiohttp+uvloop reverse proxy (in this file, run as its own process:
  it forwards the POST body and relays the response bytes, streamed chunks as they come, over one
  shared ClientSession) -- the floor for a Python proxy;
* ``gateway``: ``pdgate serve`` over that one ``both`` instance (kind ``sim``, no KV events,
  default scrape and health periods).

Measured, from this aiohttp client process:

1. CPU: utime + stime of the proxy process (``/proc/PID/stat``) over ``--requests`` non-streamed
   completions (a prompt of a few tokens, ``max_tokens`` 1) and over ``--streams`` streamed ones
   (``max_tokens`` 64, ``ignore_eos``: 64 SSE chunks + ``[DONE]``), ``--concurrency`` in flight,
   after a warm-up. The gateway's idle CPU (its periodic /metrics scrape and /health check),
   measured before the load, is subtracted. The engine's and the client's CPU per request are
   printed too: on this host they compete with the proxy for the same cores. With ``--repeat``
   > 1 each path is measured that many times, interleaved, and the median is reported.
2. Latency at a fixed offered load: streamed requests (64 chunks) arriving as a Poisson process at
   ``--rate`` per second for ``--duration`` seconds, per path: end-to-end latency and TTFT
   percentiles; "added" is a path's percentile minus the direct path's.
3. Stalls: the gaps between consecutive reads of one stream at the client (after the first
   byte), max and p99.9, in the rate phase. A ~40 ms gap is the signature of Nagle + delayed ACK
   (TCP_NODELAY missing somewhere on the path); sglang-router showed such stalls.

Every process started here is stopped at the end, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

REPO_ROOT = Path(__file__).resolve().parents[1]
for extra in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from support.fleet import MODEL, engine_flags, instance_entry, start_gateway, write_config  # noqa: E402
from support.procs import PdgateProcess, start_sim  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_RE = re.compile(r"ready: (http://\S+)")
STALL_MS = 30.0  # a gap this long is a Nagle / delayed-ACK stall, not scheduling noise

# Measured on this kind of 2-core machine (/work/shared/REAL_ENGINES.md, "Peer routers"):
# CPU µs per non-streamed request, per 64-chunk stream.
REFERENCE = [
    ("sglang-router 0.3.2 (Rust)", "~71-84", "~600-690", "~40 ms stalls (p90/p99)"),
    ("vllm-router 0.1.17 (Rust)", "~71-84", "~600-690", ""),
    ("36-line aiohttp+uvloop proxy", "170", "529", ""),
]
RUST_NONSTREAM_US = (71.0, 84.0)
TARGET_STREAM_US = 600.0  # beat the Rust routers on streams
TARGET_NONSTREAM_US = 1.4 * RUST_NONSTREAM_US[0] + 10  # ~1.4x of them: < ~110 µs


# ------------------------------------------------------------------ the minimal reverse proxy
def serve_minimal_proxy(upstream: str) -> None:
    """A minimal aiohttp+uvloop reverse proxy: POST body in, response bytes out, streamed as they come."""
    import uvloop
    from aiohttp import web

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
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(f"minimal proxy ready: http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
        await session.close()

    uvloop.run(main())


def start_minimal_proxy(upstream: str, timeout: float = 30.0) -> PdgateProcess:
    """This file, run as ``--serve-minimal-proxy URL``, until its ``ready: URL`` line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-minimal-proxy", upstream]
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
                threading.Thread(target=lambda: [child.output.append(x) for x in proc.stdout], daemon=True).start()
                return child
    finally:
        selector.close()
    child.stop()
    raise RuntimeError(f"minimal proxy did not become ready:\n{child.log}")


# ------------------------------------------------------------------------------ measurement
def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def host_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole host, all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


@dataclass
class Path_:
    name: str
    url: str
    proxy_pid: int | None  # None for direct
    idle_cpu_s_per_s: float = 0.0


@dataclass
class CpuRun:
    requests: int
    wall_s: float
    proxy_us: float | None  # per request, idle-corrected
    engine_us: float
    client_us: float
    events_per_req: float = 0.0
    reads_per_req: float = 0.0
    foreign_cores: float = 0.0  # CPU used by processes not started here, in cores, during the run
    steal_cores: float = 0.0


@dataclass
class StreamSample:
    latency_s: float
    ttft_s: float
    gaps_s: list[float] = field(default_factory=list)
    ok: bool = True


def bodies(stream: bool, n: int) -> list[bytes]:
    if stream:
        one = {"model": MODEL, "prompt": "Hello, my name is", "max_tokens": 64, "ignore_eos": True, "stream": True}
    else:
        one = {"model": MODEL, "prompt": "Hello, my name is", "max_tokens": 1}
    data = json.dumps(one).encode()
    return [data] * n


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes, stats: list[int]) -> None:
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        reads = events = 0
        async for chunk in resp.content.iter_any():
            reads += 1
            events += chunk.count(b"data: ")
        stats[0] += reads
        stats[1] += events


async def closed_loop(url: str, payloads: list[bytes], concurrency: int) -> tuple[float, list[int]]:
    """Send every payload, ``concurrency`` at a time; wall seconds and [reads, SSE events]."""
    stats = [0, 0]
    pending = iter(payloads)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        endpoint = url + "/v1/completions"

        async def worker() -> None:
            for body in pending:
                await one_request(session, endpoint, body, stats)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, stats


async def measure_cpu(path: Path_, engine_pid: int, all_pids: list[int], stream: bool, n: int, concurrency: int,
                      warmup: int) -> CpuRun:
    await closed_loop(path.url, bodies(stream, warmup), concurrency)
    pids = sorted({*all_pids, os.getpid()})
    before = {p: proc_cpu_s(p) for p in pids}
    host0, steal0 = host_cpu_s()
    wall, (reads, events) = await closed_loop(path.url, bodies(stream, n), concurrency)
    host1, steal1 = host_cpu_s()
    used = {p: proc_cpu_s(p) - before[p] for p in pids}
    proxy_us = None
    if path.proxy_pid is not None:
        proxy_us = 1e6 * max(0.0, used[path.proxy_pid] - path.idle_cpu_s_per_s * wall) / n
    foreign = max(0.0, (host1 - host0) - sum(used.values())) / wall
    return CpuRun(n, wall, proxy_us, 1e6 * used[engine_pid] / n, 1e6 * used[os.getpid()] / n, events / n, reads / n,
                  foreign, (steal1 - steal0) / wall)


async def rate_phase(url: str, rate: float, duration: float, seed: int) -> list[StreamSample]:
    """Poisson arrivals of 64-chunk streams at ``rate``/s for ``duration`` s (open loop)."""
    rng = random.Random(seed)
    body = bodies(True, 1)[0]
    samples: list[StreamSample] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        endpoint = url + "/v1/completions"

        async def one() -> None:
            t0 = time.perf_counter()
            sample = StreamSample(0.0, 0.0)
            try:
                async with session.post(endpoint, data=body, headers={"Content-Type": "application/json"}) as resp:
                    last = None
                    async for _chunk in resp.content.iter_any():
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
            samples.append(sample)

        # a few requests to open connections before the clock starts
        await asyncio.gather(*(one() for _ in range(8)))
        samples.clear()
        tasks = []
        start = time.perf_counter()
        t = 0.0
        while True:
            t += rng.expovariate(rate)
            if t >= duration:
                break
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return samples


# -------------------------------------------------------------------------------- reporting
def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, r in enumerate([header, *rows]):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def median_run(runs: list[CpuRun]) -> CpuRun:
    """The run with the median proxy CPU (engine CPU for direct)."""
    key = (lambda r: r.proxy_us) if runs[0].proxy_us is not None else (lambda r: r.engine_us)
    return sorted(runs, key=key)[len(runs) // 2]


def report(args: argparse.Namespace, paths: list[Path_], cpu: dict[str, dict[str, list[CpuRun]]],
           lat: dict[str, list[StreamSample]]) -> None:
    print()
    print("== gateway overhead: one sim engine (time scale "
          f"{args.time_scale:g}), {os.cpu_count()} cores, client concurrency {args.concurrency} ==")
    ns = {p: median_run(cpu[p]["nonstream"]) for p in cpu if cpu[p].get("nonstream")}
    st = {p: median_run(cpu[p]["stream"]) for p in cpu if cpu[p].get("stream")}
    direct = lat.get("direct")
    header = ["path", "CPU µs/req", "CPU µs/stream64", "x minimal (req/stream)", "e2e p50/p99 ms",
              "added p50/p99 ms", "TTFT p50/p99 ms", "gap max/p99.9 ms"]
    rows = []
    for p in paths:
        n, s = ns.get(p.name), st.get(p.name)
        mn, ms = ns.get("minimal"), st.get("minimal")
        ratio = "-"
        if p.proxy_pid is not None and n and s and mn and ms and mn.proxy_us and ms.proxy_us:
            ratio = f"{n.proxy_us / mn.proxy_us:.2f} / {s.proxy_us / ms.proxy_us:.2f}"
        e2e = added = ttft = gaps = "-"
        samples = [x for x in lat.get(p.name, []) if x.ok]
        if samples:
            lats = [x.latency_s * 1e3 for x in samples]
            ttfts = [x.ttft_s * 1e3 for x in samples]
            all_gaps = [g * 1e3 for x in samples for g in x.gaps_s]
            e2e = f"{pct(lats, 50):.2f} / {pct(lats, 99):.2f}"
            ttft = f"{pct(ttfts, 50):.2f} / {pct(ttfts, 99):.2f}"
            gaps = f"{max(all_gaps):.1f} / {pct(all_gaps, 99.9):.1f}" if all_gaps else "-"
            if direct and p.name != "direct":
                dl = [x.latency_s * 1e3 for x in direct if x.ok]
                added = f"{pct(lats, 50) - pct(dl, 50):+.2f} / {pct(lats, 99) - pct(dl, 99):+.2f}"
        rows.append([p.name, fmt(n.proxy_us if n else None), fmt(s.proxy_us if s else None), ratio, e2e, added, ttft, gaps])
    print_table(header, rows)

    if ns or st:
        print("\nper path, CPU phase details (median run of "
              f"{args.repeat}; engine and client share the {os.cpu_count()} cores with the proxy):")
        header = ["path", "kind", "n", "req/s", "proxy µs", "engine µs", "client µs", "SSE events", "client reads",
                  "proxy idle µs/s", "other procs (cores)", "all runs (proxy µs)"]
        rows = []
        for p in paths:
            for kind, table in (("non-stream", ns), ("stream64", st)):
                r = table.get(p.name)
                if r is None:
                    continue
                runs = cpu[p.name]["nonstream" if kind == "non-stream" else "stream"]
                every = ", ".join(fmt(x.proxy_us) for x in runs) if p.proxy_pid is not None else "-"
                rows.append([p.name, kind, str(r.requests), fmt(r.requests / r.wall_s), fmt(r.proxy_us), fmt(r.engine_us),
                             fmt(r.client_us), fmt(r.events_per_req, 1), fmt(r.reads_per_req, 1),
                             fmt(1e6 * p.idle_cpu_s_per_s) if p.proxy_pid is not None else "-",
                             ", ".join(f"{x.foreign_cores:.2f}" for x in runs), every])
        print_table(header, rows)
        worst = max((x.foreign_cores for t in cpu.values() for runs in t.values() for x in runs), default=0.0)
        if worst > 0.1:
            print(f"WARNING: processes not started here used up to {worst:.2f} cores during a CPU run: "
                  "the host was not quiet, figures are inflated; rerun on a quiet host")

    if lat:
        print(f"\nrate phase: Poisson {args.rate:g} streams/s (64 chunks each) for {args.duration:g} s per path")
        for p in paths:
            samples = lat.get(p.name)
            if not samples:
                continue
            ok = [x for x in samples if x.ok]
            all_gaps = [g * 1e3 for x in ok for g in x.gaps_s]
            stalls = sum(1 for g in all_gaps if g >= STALL_MS)
            reads = np.mean([len(x.gaps_s) + 1 for x in ok]) if ok else float("nan")
            print(f"  {p.name:8s} {len(ok)}/{len(samples)} ok, {fmt(reads, 1)} reads per stream, gaps p99 "
                  f"{fmt(pct(all_gaps, 99), 2)} ms, gaps >= {STALL_MS:g} ms: {stalls}"
                  f"{'  (no Nagle/delayed-ACK stalls: TCP_NODELAY effective)' if not stalls else '  <-- STALLS'}")

    print("\nreference (REAL_ENGINES.md, same kind of 2-core machine): CPU µs per request / per 64-chunk stream")
    print_table(["router", "µs/req", "µs/stream64", "note"], [list(r) for r in REFERENCE])
    gw_n, gw_s = ns.get("gateway"), st.get("gateway")
    if gw_n and gw_s:
        print(f"\ntargets: stream < {TARGET_STREAM_US:.0f} µs (beat the Rust routers): {gw_s.proxy_us:.0f} µs -> "
              f"{'MET' if gw_s.proxy_us < TARGET_STREAM_US else 'MISSED'}; non-stream < ~{TARGET_NONSTREAM_US:.0f} µs "
              f"(1.4x Rust): {gw_n.proxy_us:.0f} µs -> {'MET' if gw_n.proxy_us < TARGET_NONSTREAM_US else 'MISSED'} "
              f"({gw_n.proxy_us / np.mean(RUST_NONSTREAM_US):.2f}x the Rust midpoint)")


# ------------------------------------------------------------------------------- profiling
async def profile_gateway(args: argparse.Namespace, paths: list[Path_], engine_pid: int, all_pids: list[int]) -> None:
    """Extra (uncounted) CPU runs of the gateway with ``py-spy record`` attached to its PID."""
    gateway = next((p for p in paths if p.name == "gateway"), None)
    if gateway is None:
        return
    out = Path(args.py_spy)
    out.mkdir(parents=True, exist_ok=True)
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    for kind, stream, n in (("nonstream", False, args.requests), ("stream", True, args.streams)):
        # a warm-up, then enough requests for a few seconds of samples
        await closed_loop(gateway.url, bodies(stream, args.warmup), args.concurrency)
        for fmt_, suffix in (("raw", "txt"), ("speedscope", "json")):
            target = out / f"gateway-{kind}.{suffix}"
            spy = subprocess.Popen([py_spy, "record", "--pid", str(gateway.proxy_pid), "--rate", str(args.py_spy_rate),
                                    "--format", fmt_, "--output", str(target), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                await asyncio.sleep(1.0)  # py-spy attaches
                await closed_loop(gateway.url, bodies(stream, n * args.py_spy_scale), args.concurrency)
            finally:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                try:
                    _, err = spy.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    _, err = spy.communicate()
            print(f"[py-spy] gateway {kind}: {target} ({'ok' if target.exists() else 'FAILED: ' + err[-300:]})", flush=True)
            if fmt_ == "raw" and target.exists():
                print_hotspots(target)


def print_hotspots(collapsed: Path, top: int = 25) -> None:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (", 1)[0] + " (" + f.split(" (", 1)[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        return
    print(f"  {total} samples; top self:")
    for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * c / total:5.1f}%  {f}")
    print("  top inclusive (gateway code):")
    ours = [(f, c) for f, c in incl.items() if any(m in f for m in ("proxy.py", "app.py", "cluster.py", "requests.py",
                                                                     "framework.py", "metrics.py", "base.py", "plugins"))]
    for f, c in sorted(ours, key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * c / total:5.1f}%  {f}")


# ------------------------------------------------------------------------------------ main
async def run(args: argparse.Namespace, paths: list[Path_], engine_pid: int) -> None:
    all_pids = [engine_pid, *(p.proxy_pid for p in paths if p.proxy_pid is not None)]
    cpu: dict[str, dict[str, list[CpuRun]]] = {p.name: {"nonstream": [], "stream": []} for p in paths}
    lat: dict[str, list[StreamSample]] = {}
    # idle CPU of each proxy process (the gateway scrapes /metrics and checks /health periodically)
    if not args.skip_cpu and args.idle_s > 0:
        before = {p.name: proc_cpu_s(p.proxy_pid) for p in paths if p.proxy_pid is not None}
        t0 = time.perf_counter()
        await asyncio.sleep(args.idle_s)
        elapsed = time.perf_counter() - t0
        for p in paths:
            if p.proxy_pid is not None:
                p.idle_cpu_s_per_s = (proc_cpu_s(p.proxy_pid) - before[p.name]) / elapsed
    if not args.skip_cpu:
        for rep in range(args.repeat):
            for p in paths:
                for kind, stream, n in (("nonstream", False, args.requests), ("stream", True, args.streams)):
                    if n <= 0:
                        continue
                    r = await measure_cpu(p, engine_pid, all_pids, stream, n, args.concurrency, args.warmup)
                    cpu[p.name][kind].append(r)
                    print(f"[cpu {rep + 1}/{args.repeat}] {p.name:8s} {kind:9s} n={n} {n / r.wall_s:6.0f} req/s  "
                          f"proxy {fmt(r.proxy_us):>5s} µs  engine {r.engine_us:6.0f} µs  client {r.client_us:6.0f} µs  "
                          f"other processes {r.foreign_cores:.2f} cores, steal {r.steal_cores:.2f}", flush=True)
    if args.py_spy:
        await profile_gateway(args, paths, engine_pid, all_pids)
    if not args.skip_latency:
        for p in paths:
            lat[p.name] = await rate_phase(p.url, args.rate, args.duration, args.seed)
            ok = [x for x in lat[p.name] if x.ok]
            print(f"[latency] {p.name:8s} {len(ok)} streams, e2e p50 {pct([x.latency_s * 1e3 for x in ok], 50):.2f} ms",
                  flush=True)
    report(args, paths, cpu, lat)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="non-streamed requests per CPU run")
    ap.add_argument("--streams", type=int, default=500, help="64-chunk streamed requests per CPU run")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight in the CPU runs")
    ap.add_argument("--warmup", type=int, default=100, help="requests sent before each CPU run")
    ap.add_argument("--repeat", type=int, default=2, help="CPU runs per path (interleaved); the median is reported")
    ap.add_argument("--idle-s", type=float, default=3.0, help="seconds of idle CPU measured (and subtracted) first")
    ap.add_argument("--rate", type=float, default=50.0, help="offered streams per second in the latency phase")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of the latency phase per path")
    ap.add_argument("--time-scale", type=float, default=1000.0, help="sim engine time scale")
    ap.add_argument("--paths", default="direct,minimal,gateway", help="comma-separated subset of direct,minimal,gateway")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--py-spy", metavar="DIR", help="also profile the gateway (extra runs, not counted) with py-spy "
                    "attached to its PID; collapsed stacks and speedscope files go to DIR")
    ap.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--py-spy-scale", type=int, default=3, help="profiled runs send this many times --requests/--streams")
    ap.add_argument("--hold", action="store_true",
                    help="start everything, print the PIDs and URLs, and wait for Ctrl-C (to profile by hand)")
    return ap.parse_args()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-minimal-proxy":
        serve_minimal_proxy(sys.argv[2])
        return
    args = parse_args()
    wanted = [x.strip() for x in args.paths.split(",") if x.strip()]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM also stops the children
    children: list[PdgateProcess] = []
    tmp = tempfile.TemporaryDirectory(prefix="pdgate-bench-")
    try:
        engine = start_sim(*engine_flags("both"), time_scale=args.time_scale)
        children.append(engine)
        paths = [Path_("direct", engine.url, None)]
        if "minimal" in wanted:
            minimal = start_minimal_proxy(engine.url)
            children.append(minimal)
            paths.append(Path_("minimal", minimal.url, minimal.proc.pid))
        if "gateway" in wanted:
            # production defaults for the background work (scrape every 1 s, /health every 2 s)
            config = write_config(Path(tmp.name) / "gateway.yaml", [instance_entry(engine, "both", "sim")],
                                  scrape_interval_s=1.0,
                                  health={"interval_s": 2.0, "timeout_s": 2.0, "failure_threshold": 3, "cooldown_s": 5.0})
            gateway = start_gateway(config)
            children.append(gateway)
            paths.append(Path_("gateway", gateway.url, gateway.proc.pid))
        paths = [p for p in paths if p.name in wanted]
        print(f"engine pid {engine.proc.pid} {engine.url}; "
              + "; ".join(f"{p.name} pid {p.proxy_pid} {p.url}" for p in paths if p.proxy_pid), flush=True)
        if args.hold:
            print("holding; Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
        import uvloop

        uvloop.run(run(args, paths, engine.proc.pid))
    except KeyboardInterrupt:
        print("\ninterrupted; stopping children", file=sys.stderr)
    finally:
        for child in reversed(children):
            child.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()
