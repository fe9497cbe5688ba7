#!/usr/bin/env python3
"""TTFT/TPOT-vs-load curve of the simulated engine for one performance profile.

    python benchmarks/sim_load_curve.py [--profile h100-llama-3-8b] [--rates 1,2,4,...]
        [--input-len 1024] [--output-len 128] [--duration 120] [--seed 0] [--shared-prefix 0]
        [--realtime-check [--check-rate 8] [--check-duration 60] [--time-scale 10]]

Drives :class:`engines.sim.core.EngineCore` in *virtual* time with a small discrete-event
loop: Poisson arrivals at each offered rate, prompts of random token ids (distinct per request,
so no prefix-cache hits unless ``--shared-prefix N`` makes all prompts share their first N
tokens), ``ignore_eos`` greedy outputs of exactly ``--output-len`` tokens. The clock jumps
from step end to step end, and to the next arrival when the engine is idle; requests that
arrive during a step join at its end (as they would in the real engine). Each point simulates
``--duration`` seconds of arrivals and then drains the backlog. Latencies are taken over the
requests that arrived after a 10% warm-up; throughput is what completed inside the window
[warm-up, duration]. Prints one markdown table row per offered rate; a row where fewer than
95% as many requests completed in the window as arrived in it, or whose waiting queue is still
long when arrivals stop, is past saturation (marked ``*``).

``--realtime-check`` replays the workload of one moderate rate against a real
``pdgate engine sim`` process over HTTP (aiohttp streaming client, ``--time-scale`` times
faster than real time; wall timings are multiplied by the time scale to get simulated seconds)
and prints the HTTP-measured TTFT/TPOT next to the virtual-time ones for the very same
arrivals and prompts, plus the engine's own counters from ``/sim/state`` (lag: simulated time
lost because the host fell behind; jitter and late steps: how late tokens went out). The engine
process is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pdgate.engines.sim.build import build_state
from pdgate.engines.sim.config import SimEngineConfig
from pdgate.engines.sim.request import SamplingParams, SimRequest

WARMUP_FRACTION = 0.1
SATURATION_RATIO = 0.95  # completions / arrivals in the window below this: saturated


# ------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Workload:
    rate: float  # offered requests per simulated second
    duration: float  # simulated seconds of arrivals
    input_len: int
    output_len: int
    seed: int
    shared_prefix: int = 0

    def arrivals(self, vocab_size: int) -> list[tuple[float, list[int]]]:
        """Poisson arrival times and prompts; the same workload always gives the same list."""
        rng = np.random.default_rng([self.seed, round(self.rate * 1000)])
        prefix = rng.integers(0, vocab_size, self.shared_prefix).tolist()
        out: list[tuple[float, list[int]]] = []
        t = rng.exponential(1.0 / self.rate)
        while t < self.duration:
            tail = rng.integers(0, vocab_size, self.input_len - self.shared_prefix).tolist()
            out.append((float(t), prefix + tail))
            t += rng.exponential(1.0 / self.rate)
        return out


@dataclass
class Latencies:
    """Per-request latencies in simulated seconds."""

    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)

    def add(self, ttft: float, e2e: float, tokens: int) -> None:
        self.ttft.append(ttft)
        if tokens > 1:
            self.tpot.append((e2e - ttft) / (tokens - 1))

    def pct_ms(self, which: str, q: float) -> float:
        values = getattr(self, which)
        return float(np.percentile(values, q)) * 1e3 if values else float("nan")


@dataclass
class Point:
    """One row of the curve."""

    rate: float
    requests: int = 0
    arrived_in_window: int = 0
    done_in_window: int = 0
    tokens_in_window: int = 0
    window: float = 0.0
    running_area: float = 0.0  # integral of num_running over the window
    kv_peak: float = 0.0
    preemptions: int = 0
    waiting_at_end: int = 0  # queue length when arrivals stop
    drain_time: float = 0.0  # simulated seconds after the last arrival until the backlog is gone
    steps: int = 0
    busy: float = 0.0  # modelled seconds of all steps
    end_time: float = 0.0  # simulated time when the last request finished
    cpu_seconds: float = 0.0
    lat: Latencies = field(default_factory=Latencies)

    @property
    def req_per_s(self) -> float:
        return self.done_in_window / self.window

    @property
    def tok_per_s(self) -> float:
        return self.tokens_in_window / self.window

    @property
    def saturated(self) -> bool:
        behind = self.done_in_window < SATURATION_RATIO * self.arrived_in_window
        return behind or self.waiting_at_end > max(8.0, 0.5 * self.rate)


# --------------------------------------------------------- virtual-time loop
def simulate(profile: str, work: Workload) -> Point:
    """Run ``work`` through a fresh engine core in virtual time."""
    state = build_state(SimEngineConfig(profile=profile))
    core = state.core
    arrivals = work.arrivals(state.tokenizer.vocab_size)
    sampling = SamplingParams(max_tokens=work.output_len, ignore_eos=True, temperature=0.0)
    start, end = WARMUP_FRACTION * work.duration, work.duration
    point = Point(work.rate, requests=len(arrivals), window=end - start)
    measured: set[str] = set()
    queue_recorded = False
    cpu0 = time.process_time()
    now, i = 0.0, 0
    while i < len(arrivals) or core.has_unfinished():
        while i < len(arrivals) and arrivals[i][0] <= now:
            t, prompt = arrivals[i]
            rid = f"r{i}"
            core.add_request(SimRequest(rid, prompt, sampling, arrival_time=t))
            if t >= start:
                measured.add(rid)
                point.arrived_in_window += 1
            i += 1
        if now >= end and not queue_recorded:
            point.waiting_at_end, queue_recorded = core.num_waiting, True
        step = core.schedule(now) if core.has_unfinished() else None
        if step is None or step.empty:
            if i >= len(arrivals):
                raise RuntimeError("the engine has unfinished requests but schedules nothing")
            now = arrivals[i][0]  # idle: jump to the next arrival
            continue
        dt = core.step_time(step)
        point.kv_peak = max(point.kv_peak, core.kv.usage)
        overlap = max(0.0, min(now + dt, end) - max(now, start))
        point.running_area += overlap * core.num_running
        point.steps += 1
        point.busy += dt
        now += dt
        for out in core.update(step, now):
            in_window = start <= now <= end
            if in_window:
                point.tokens_in_window += len(out.new_token_ids)
            if out.finished:
                req = out.request
                point.done_in_window += in_window
                if req.request_id in measured:
                    assert req.first_token_time is not None
                    point.lat.add(
                        req.first_token_time - req.arrival_time, now - req.arrival_time, req.num_output_tokens
                    )
    point.drain_time = max(0.0, now - max(end, arrivals[-1][0] if arrivals else 0.0))
    point.end_time = now
    point.preemptions = core.num_preemptions
    point.cpu_seconds = time.process_time() - cpu0
    return point


# ------------------------------------------------------------------ printing
HEADER = [
    "offered req/s",
    "achieved req/s",
    "output tok/s",
    "TTFT p50",
    "TTFT p90",
    "TTFT p99",
    "TPOT p50",
    "TPOT p90",
    "TPOT p99",
    "mean running",
    "KV peak %",
    "preempt",
    "queue@end",
    "drain s",
]


def row(p: Point) -> list[str]:
    lat = p.lat
    mark = "*" if p.saturated else ""
    return [
        f"{p.rate:g}{mark}",
        f"{p.req_per_s:.2f}",
        f"{p.tok_per_s:.0f}",
        *(f"{lat.pct_ms('ttft', q):.1f}" for q in (50, 90, 99)),
        *(f"{lat.pct_ms('tpot', q):.2f}" for q in (50, 90, 99)),
        f"{p.running_area / p.window:.1f}",
        f"{100 * p.kv_peak:.1f}",
        str(p.preemptions),
        str(p.waiting_at_end),
        f"{p.drain_time:.1f}",
    ]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def print_saturation(points: list[Point]) -> None:
    best = max(points, key=lambda p: p.tok_per_s)
    first_sat = next((p for p in points if p.saturated), None)
    last_ok = max(
        (p for p in points if not p.saturated and (first_sat is None or p.rate < first_sat.rate)),
        key=lambda p: p.rate,
        default=None,
    )
    print(
        f"\npeak throughput: {best.req_per_s:.2f} req/s = {best.tok_per_s:.0f} output tok/s (offered {best.rate:g} req/s)"
    )
    if first_sat is None:
        print("saturation: not reached on this ladder")
    else:
        ok = f"{last_ok.rate:g}" if last_ok else "-"
        print(
            f"saturation: between {ok} and {first_sat.rate:g} req/s offered "
            f"(at {first_sat.rate:g} req/s {first_sat.waiting_at_end} requests still wait when arrivals stop, "
            f"backlog drains {first_sat.drain_time:.0f} s later)"
        )


# -------------------------------------------------------- real-time HTTP check
async def _one_request(
    session: aiohttp.ClientSession, url: str, prompt: list[int], output_len: int, send_at: float
) -> tuple[float, float, int]:
    """Stream one completion; returns (ttft, e2e, tokens) in wall seconds."""
    await asyncio.sleep(max(0.0, send_at - time.monotonic()))
    body = {"prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0, "stream": True}
    t0 = time.monotonic()
    first = last = 0.0
    tokens = 0
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: {"):  # one SSE chunk per engine output, i.e. per token
                last = time.monotonic()
                if tokens == 0:
                    first = last
                tokens += 1
    return first - t0, last - t0, tokens


async def _http_run(
    url: str, arrivals: list[tuple[float, list[int]]], output_len: int, time_scale: float, start: float
) -> tuple[Latencies, dict[str, Any]]:
    lat = Latencies()
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        t0 = time.monotonic() + 0.2
        results = await asyncio.gather(
            *(_one_request(session, url, prompt, output_len, t0 + t / time_scale) for t, prompt in arrivals)
        )
        async with session.get(f"{url}/sim/state") as resp:
            sim_state = await resp.json()
    for (t, _), (ttft, e2e, tokens) in zip(arrivals, results, strict=True):
        if t >= start:
            lat.add(ttft * time_scale, e2e * time_scale, tokens)
    return lat, sim_state


def realtime_check(args: argparse.Namespace) -> None:
    from tests.support.procs import start_sim

    work = Workload(
        args.check_rate, args.check_duration, args.input_len, args.output_len, args.seed, args.shared_prefix
    )
    virtual = simulate(args.profile, work)
    vocab = build_state(SimEngineConfig(profile=args.profile)).tokenizer.vocab_size
    arrivals = work.arrivals(vocab)
    print(
        f"\n### Real-time check: {work.rate:g} req/s for {work.duration:g} simulated s "
        f"({len(arrivals)} requests) over HTTP, time scale {args.time_scale:g}\n"
    )
    engine = start_sim("--profile", args.profile, time_scale=args.time_scale)
    try:
        wall0, cpu0 = time.monotonic(), time.process_time()
        lat, st = asyncio.run(
            _http_run(engine.url, arrivals, args.output_len, args.time_scale, WARMUP_FRACTION * work.duration)
        )
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    finally:
        engine.stop()
    header = ["driver", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99"]
    rows = [
        ["virtual time (EngineCore)", *(f"{virtual.lat.pct_ms(w, q):.2f}" for w in ("ttft", "tpot") for q in (50, 99))],
        [
            f"HTTP, real time x{args.time_scale:g}",
            *(f"{lat.pct_ms(w, q):.2f}" for w in ("ttft", "tpot") for q in (50, 99)),
        ],
    ]
    print_table(header, rows)
    steps = max(1, st["steps"])
    print(
        f"\nvirtual run: {virtual.steps} steps, {virtual.busy:.1f} s modelled busy, "
        f"last request done at {virtual.end_time:.1f} s"
    )
    print(
        f"real engine (/sim/state): {st['steps']} steps, {st['busy_seconds']:.1f} s modelled busy, sim_time "
        f"{st['sim_time']:.1f} s at the end; lag total {st['lag_total_seconds']:.2f} s "
        f"({100 * st['lag_total_seconds'] / st['sim_time']:.1f}% of sim_time), lag max {1e3 * st['lag_max_seconds']:.1f} ms, "
        f"delivery jitter max {1e3 * st.get('delivery_jitter_max_seconds', float('nan')):.1f} ms, "
        f"late steps {100 * st['late_steps'] / steps:.1f}%"
    )
    print(
        f"client: {wall:.1f} s wall, {cpu:.1f} s CPU ({100 * cpu / wall:.0f}% of one core); latencies in simulated ms"
    )


# ---------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="h100-llama-3-8b")
    ap.add_argument(
        "--rates", default="1,2,4,8,12,16,20,22,24,26,30", help="comma-separated offered request rates (req/s)"
    )
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--duration", type=float, default=120.0, help="simulated seconds of arrivals per rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt shares (prefix-cache hits)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="rates simulated in parallel")
    ap.add_argument(
        "--realtime-check", action="store_true", help="also replay one rate against a real engine over HTTP"
    )
    ap.add_argument("--check-rate", type=float, default=8.0)
    ap.add_argument("--check-duration", type=float, default=60.0, help="simulated seconds of the real-time check")
    ap.add_argument("--time-scale", type=float, default=10.0, help="time scale of the real-time engine")
    args = ap.parse_args()
    if not 0 <= args.shared_prefix < args.input_len or args.output_len < 2:
        ap.error("need 0 <= --shared-prefix < --input-len and --output-len >= 2")
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM also runs the cleanup below
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    print(
        f"## {args.profile}: input {args.input_len} tokens (shared prefix {args.shared_prefix}), output "
        f"{args.output_len} tokens, Poisson arrivals for {args.duration:g} simulated s per rate, seed {args.seed}\n"
    )
    print("latencies in simulated ms; `*` = past saturation\n")
    wall0 = time.monotonic()
    works = [Workload(r, args.duration, args.input_len, args.output_len, args.seed, args.shared_prefix) for r in rates]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:  # points are independent: one per core
        points = list(pool.map(simulate, [args.profile] * len(works), works))
    cpu = sum(p.cpu_seconds for p in points)
    print_table(HEADER, [row(p) for p in points])
    print_saturation(points)
    print(
        f"\n({sum(p.requests for p in points)} requests, {sum(p.steps for p in points)} steps simulated in "
        f"{time.monotonic() - wall0:.1f} s wall, {cpu:.1f} s CPU, {args.jobs} jobs)"
    )
    if args.realtime_check:
        realtime_check(args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
