#!/usr/bin/env python3
"""Throughput scaling with gateway workers: the most requests/s and relayed tokens/s that
``pdgate serve --workers 1`` and ``--workers 2`` carry on this host, measured in one run.

    python benchmarks/worker_scaling.py [--workers 1,2] [--repeat 5] [--seconds 4] [--warmup-s 1]
        [--concurrency 64] [--max-tokens 64] [--engine stub|sim] [--engines 1] [--time-scale 1000]
        [--client raw|aiohttp] [--burst] [--no-sharing] [--refit-interval-s 3600] [--wait-quiet S]
        [--out results.json]

**What**: a closed loop of ``--concurrency`` keep-alive connections sends, as fast as answers come
back, (a) non-streamed completions of a prompt of a few tokens with ``max_tokens`` 1 ("req/s")
and (b) streamed ones with ``max_tokens`` 64 and ``ignore_eos`` (64 SSE events + ``[DONE]``;
"tok/s" = tokens relayed to the client per second).

**How**:

* Gateways: ``pdgate serve --config ... --workers N``, a fresh one for every run, stopped after
  it, so nothing a run leaves behind (cost-model records still being published to the other
  workers, an idle gateway's background work) reaches the next. Production periods (scrape 1 s,
  health 2 s). Several workers share their state through the NATS server ``serve`` starts as a
  child (``--no-sharing``: ``sharing: {enabled: false}``). Every gateway process refits its cost
  model in a child process every ``refit_interval_s`` (production: 30 s; seconds of CPU over tens
  of thousands of records), which would land in some runs only: ``--refit-interval-s`` (default
  3600) keeps refits out of the runs; ``30`` puts them back (their CPU: the "refit" column).
* Engine: the sim engine costs about twice the gateway's CPU per request (~490 vs ~250 µs on this
  box, docs/gateway-benchmarks.md), so on two cores it, not the gateway, would set the ceiling.
  ``--engine stub`` (default): a replaying stub (:func:`serve_stub`, raw uvloop protocols) in front
  of a ``pdgate engine sim --role both`` at ``--time-scale``: the first request of each kind
  (GET path, or POST streamed or not) goes to the sim and its response is recorded; every later one
  gets the recorded bytes back, the SSE events written one per event-loop turn (as a paced engine
  sends them; ``--burst``: all at once). ``--engine sim``: the gateways talk to the sims.
* Client: this process, on uvloop. ``--client raw`` (default): raw protocols with httptools, one
  pre-built request per connection, ~5x cheaper than aiohttp; ``--client aiohttp``: one
  ClientSession. Every run opens fresh connections (the kernel spreads them over the workers by a
  hash of the address pair: the per-worker CPU split is printed).
* Runs: ``--repeat`` rounds; in each, for each kind, each worker count (the order alternates
  between rounds): ``--warmup-s`` unmeasured, then ``--seconds`` measured. The CPU of every process
  (gateway supervisor and workers, refit children, NATS, engines, client) comes from
  ``/proc/PID/stat``; "other" is what the host ran beside them (``/proc/stat``, so it includes
  processes in other containers; ``--wait-quiet S`` waits up to S s before each run for it to drop
  below 0.2 cores). Medians over the rounds; the ratio is N workers over 1 worker, also as the
  median over the rounds in which the host was quiet.

**Cost**: the default run takes about 3 minutes (more with ``--wait-quiet`` on a busy host).

**Caveats**: on a 2-core host the client, the engine and NATS run on the same two cores as the
workers: N workers get what they leave, so the ratio measures the host as much as the gateway
(the cores each took are printed). SO_REUSEPORT spreads connections, not load: with few
connections one worker may get more. The stub answers every request identically (same id, same
usage), which is all the gateway's relay sees of an engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]
for extra in (REPO_ROOT, REPO_ROOT / "tests", REPO_ROOT / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from _host import (
    Child,
    CpuWindow,
    cmdline,
    describe_host,
    machine,
    other_load,
    print_table,
    stop_all,
    stop_children_on_sigterm,
    wait_quiet,
)
from _raw_http import Load, run_aiohttp, run_raw
from support.fleet import MODEL, engine_flags, write_config

PROMPT = "Hello, my name is"  # a few tokens: below one KV block, so no prefix hashing work
GATEWAY_READY_RE = re.compile(r"pdgate gateway ready: (http://\S+)")
AIM = 1.7
QUIET = 0.2  # cores other processes may take during a run counted as quiet


def request_body(stream: bool, max_tokens: int) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens if stream else 1}
    if stream:
        body.update(stream=True, ignore_eos=True)
    return json.dumps(body).encode()


# ------------------------------------------------------------------------------- the fleet
class Fleet:
    """The engines (sims, stubs) and the gateway of the run under way; stops what it started."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.sims: list[Child] = []
        self.engines: list[Child] = []
        self.gateways: dict[int, Child] = {}
        sim_cmd = [sys.executable, "-m", "pdgate.cli", "engine", "sim", "--port", "0"]
        sim_cmd += ["--time-scale", str(args.time_scale), *engine_flags("both")]
        for i in range(args.engines if args.engine == "sim" else 1):
            self.sims.append(Child(sim_cmd, tmp / f"sim-{i}.log"))
            self.sims[-1].wait_ready()
        if args.engine == "stub":
            for i in range(args.engines):
                cmd = [sys.executable, str(Path(__file__).with_name("_raw_http.py")), "--serve-stub", self.sims[0].url]
                self.engines.append(Child(cmd + (["--burst"] if args.burst else []), tmp / f"stub-{i}.log"))
                self.engines[-1].wait_ready()
        else:
            self.engines = self.sims
        instances = [
            {"id": f"both-{n}", "url": e.url, "kind": "sim", "role": "both", "model": MODEL}
            for n, e in enumerate(self.engines)
        ]
        extra: dict[str, Any] = {"cost_model": {"refit_interval_s": args.refit_interval_s}}
        if args.no_sharing:
            extra["sharing"] = {"enabled": False}
        self.config = write_config(
            tmp / "gateway.yaml",
            instances,
            scrape_interval_s=1.0,
            health={"interval_s": 2.0, "timeout_s": 2.0, "failure_threshold": 3, "cooldown_s": 5.0},
            **extra,
        )
        self.tmp, self.runs = tmp, 0

    def start_gateway(self, n: int) -> Child:
        cmd = [sys.executable, "-m", "pdgate.cli", "serve", "--config", str(self.config), "--workers", str(n)]
        self.runs += 1
        log = self.tmp / f"gateway-{self.runs:02d}-workers{n}.log"
        self.gateways[n] = Child(cmd, log, env={"OTEL_SDK_DISABLED": "true"})
        self.gateways[n].wait_ready(GATEWAY_READY_RE)
        return self.gateways[n]

    def stop_gateway(self, n: int) -> None:
        self.gateways.pop(n).stop()

    def pids(self) -> dict[str, list[int]]:
        """Our processes by part: engines, and for each gateway ``serve-N`` (the processes that
        serve: the workers, or the one process), ``supervisor-N``, ``refit-N`` (the cost model's
        refit processes, multiprocessing children), ``nats-N``."""
        out: dict[str, list[int]] = {"engine": sorted({c.proc.pid for c in {*self.sims, *self.engines}})}
        for n, child in self.gateways.items():
            for part in ("serve", "supervisor", "refit", "nats"):
                out[f"{part}-{n}"] = []
            for pid, name in sorted(child.tree().items()):
                line = cmdline(pid)
                part = "nats" if "nats" in name else "refit" if "multiprocessing" in line else "serve"
                if part == "serve" and n > 1 and "--worker-of" not in line:
                    part = "supervisor"
                out[f"{part}-{n}"].append(pid)
        return out


async def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/ready", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}/ready did not answer 200 within {timeout:g} s")
            await asyncio.sleep(0.1)


async def settle(fleet: Fleet, limit_s: float, threshold: float = QUIET, window_s: float = 1.0) -> float:
    """Wait (up to ``limit_s``) until the host runs < ``threshold`` cores besides our processes."""
    deadline = time.monotonic() + limit_s
    while True:
        with CpuWindow([p for pids in fleet.pids().values() for p in pids]) as w:
            await asyncio.sleep(window_s)
        if w.foreign_cores < threshold or time.monotonic() >= deadline:
            return w.foreign_cores


async def measure(fleet: Fleet, workers: int, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run on a fresh gateway (stopped after it), so nothing carries over from a run to the next."""
    gateway = await asyncio.to_thread(fleet.start_gateway, workers)
    try:
        await wait_ready(gateway.url)
        if args.wait_quiet > 0:
            await settle(fleet, args.wait_quiet)
        return await _measure(fleet, gateway, workers, kind, args)
    finally:
        await asyncio.to_thread(fleet.stop_gateway, workers)


async def _measure(fleet: Fleet, gateway: Child, workers: int, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """``--warmup-s`` unmeasured, ``--seconds`` measured, every process's CPU."""
    load = Load(gateway.url, request_body(kind == "stream", args.max_tokens), args.concurrency)
    until: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    driver = asyncio.ensure_future((run_raw if args.client == "raw" else run_aiohttp)(load, until))
    await asyncio.sleep(args.warmup_s)
    parts = fleet.pids()
    load.measuring = True
    with CpuWindow([p for pids in parts.values() for p in pids]) as w:
        await asyncio.sleep(args.seconds)
        load.measuring = False
    load.stopping = True
    until.set_result(None)
    await driver

    def cores(*names: str) -> float:
        return sum(w.used.get(p, 0.0) for n in names for p in parts.get(n, [])) / w.wall

    ok = max(load.done, 1)
    run: dict[str, Any] = {
        "workers": workers,
        "kind": kind,
        "wall_s": w.wall,
        "done": load.done,
        "errors": load.errors,
        "first_error": load.first_error,
        "req_s": load.done / w.wall,
        "tok_s": load.done * (args.max_tokens if kind == "stream" else 1) / w.wall,
        "events_per_req": load.events / ok,
        "reads_per_req": load.reads / ok,
        "cores": {
            "gateway": cores(f"serve-{workers}", f"supervisor-{workers}"),
            "per_worker": [round(w.used.get(p, 0.0) / w.wall, 2) for p in parts[f"serve-{workers}"]],
            "refit": cores(f"refit-{workers}"),
            "nats": cores(f"nats-{workers}"),
            "engine": cores("engine"),
            "client": w.used[os.getpid()] / w.wall,
            "other": w.foreign_cores,
            "steal": w.steal_cores,
        },
    }
    per_req = 1e6 * w.wall / ok
    run["us_per_req"] = {k: run["cores"][k] * per_req for k in ("gateway", "nats", "engine", "client")}
    return run


# ---------------------------------------------------------------------------------- report
KINDS = {"nonstream": "non-stream", "stream": "stream"}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["req_s"])[len(runs) // 2]


def summarize(runs: list[dict[str, Any]], workers: list[int]) -> dict[str, Any]:
    """Median run per (kind, workers) and the ratios of each worker count to the first one."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        by_n = {n: [r for r in runs if r["kind"] == kind and r["workers"] == n] for n in workers}
        if not all(by_n.values()):
            continue
        med = {n: median_run(rs) for n, rs in by_n.items()}
        base = workers[0]
        ratios = {}
        for n in workers[1:]:
            pairs = list(zip(by_n[base], by_n[n]))  # same round
            quiet = [
                b["req_s"] / a["req_s"]
                for a, b in pairs
                if a["req_s"] and max(a.get("cores", {}).get("other", 0), b.get("cores", {}).get("other", 0)) < QUIET
            ]
            ratios[n] = {
                "median": med[n]["req_s"] / med[base]["req_s"] if med[base]["req_s"] else None,
                "by_round": [b["req_s"] / a["req_s"] if a["req_s"] else None for a, b in pairs],
                "quiet_rounds": len(quiet),
                "quiet_median": statistics.median(quiet) if quiet else None,
            }
        out[kind] = {"median": med, "ratios": ratios}
    return out


def host_ceiling(run: dict[str, Any], workers: int, cores: int) -> float:
    """The most requests/s this host could serve with ``workers`` workers at the CPU per request
    every process used in ``run``: all cores busy with the gateway, NATS, the engine and the
    client, and no worker above one core."""
    u = run["us_per_req"]
    everyone = u["gateway"] + u["nats"] + u["engine"] + u["client"]
    if everyone <= 0 or u["gateway"] <= 0:
        return 0.0
    return min(cores * 1e6 / everyone, workers * 1e6 / u["gateway"])


def fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def report(args: argparse.Namespace, runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    cores = os.cpu_count() or 1
    engine = f"stub x{args.engines} over a sim" if args.engine == "stub" else f"sim x{args.engines}"
    print(
        f"\n== worker scaling: {cores} cores; engine {engine} (time scale {args.time_scale:g}); client "
        f"{args.client}, {args.concurrency} connections; median of {args.repeat} rounds of {args.seconds:g} s; "
        f"sharing {'off' if args.no_sharing else 'on'} =="
    )
    header = ["kind", "workers", "req/s", "tok/s", "every round (req/s)", "gateway cores (per worker)"]
    header += ["refit", "nats", "engine", "client", "other", "steal", "µs/req gw/client/engine"]
    header += ["reads/req"]
    rows = []
    for kind, label in KINDS.items():
        for n in args.workers:
            rs = [r for r in runs if r["kind"] == kind and r["workers"] == n]
            if not rs:
                continue
            m = median_run(rs)
            c, u = m["cores"], m["us_per_req"]
            share = f"{c['gateway']:.2f} ({', '.join(f'{x:.2f}' for x in c['per_worker'])})"
            tokens, every = fmt(m["tok_s"]) if kind == "stream" else "-", ", ".join(fmt(r["req_s"]) for r in rs)
            parts = [f"{c[k]:.2f}" for k in ("refit", "nats", "engine", "client", "other", "steal")]
            us = f"{u['gateway']:.0f} / {u['client']:.0f} / {u['engine']:.0f}"
            rows.append([label, str(n), fmt(m["req_s"]), tokens, every, share, *parts, us, f"{m['reads_per_req']:.1f}"])
    print_table(header, rows)
    busy = max(r["cores"]["other"] for r in runs)
    if busy > 0.2:
        print(f"  WARNING: other processes took up to {busy:.2f} cores during a run: the host was not quiet")
    errors = sum(r["errors"] for r in runs)
    if errors:
        first = next(r["first_error"] for r in runs if r["errors"])
        print(f"  WARNING: {errors} failed requests (first: {first})")
    for kind, s in summary.items():
        for n, ratio in s["ratios"].items():
            value = ratio["median"]
            verdict = "" if value is None else ("MET" if value >= AIM else "below")
            rounds = ", ".join(fmt(x, 2) for x in ratio["by_round"])
            print(
                f"{KINDS[kind]}: {n} workers / {args.workers[0]} = {fmt(value, 2)}x (medians; round by round "
                f"{rounds}; median over the {ratio['quiet_rounds']} rounds in which other processes took < {QUIET} "
                f"cores: {fmt(ratio['quiet_median'], 2)}x); aim >= {AIM}x: {verdict}"
            )
    for kind, s in summary.items():
        base = s["median"][args.workers[0]]
        for n, m in s["median"].items():
            if n == args.workers[0] or not base["req_s"]:
                continue
            ceiling = host_ceiling(m, n, cores)
            print(
                f"{KINDS[kind]}: this host's ceiling for {n} workers, from the CPU per request every process "
                f"used in that run: {fmt(ceiling)} req/s = {fmt(ceiling / base['req_s'], 2)}x the "
                f"{args.workers[0]}-worker rate"
            )
    print(
        f"\nOn this {cores}-core host the client, the engine and NATS run on the same cores as the "
        "gateway's workers; 'other' is what the host ran besides this benchmark (other containers "
        "included). Cores in use in the median runs:"
    )
    for kind, s in summary.items():
        for n, m in s["median"].items():
            c = m["cores"]
            used = c["gateway"] + c["refit"] + c["nats"] + c["engine"] + c["client"]
            print(
                f"  {KINDS[kind]:10s} {n} worker(s): gateway {c['gateway']:.2f} + refits {c['refit']:.2f} + NATS "
                f"{c['nats']:.2f} + engine "
                f"{c['engine']:.2f} + client {c['client']:.2f} = {used:.2f}"
                f", other {c['other']:.2f}, of {cores}"
                + ("  (host saturated)" if used + c["other"] > 0.9 * cores else "")
            )


# ------------------------------------------------------------------------------------ main
async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # a KeyboardInterrupt in a protocol callback would be lost
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    fleet = await asyncio.to_thread(Fleet, args, tmp)
    print(f"engines: {', '.join(e.url for e in fleet.engines)}; gateway config {fleet.config}", flush=True)
    runs: list[dict[str, Any]] = []
    for rnd in range(args.repeat):
        for kind in KINDS:
            for n in args.workers if rnd % 2 == 0 else args.workers[::-1]:
                r = await measure(fleet, n, kind, args)
                r["round"] = rnd
                runs.append(r)
                c = r["cores"]
                print(
                    f"[{rnd + 1}/{args.repeat}] {KINDS[kind]:10s} workers {n}: {r['req_s']:7.0f} req/s"
                    + (f" {r['tok_s']:8.0f} tok/s" if kind == "stream" else "")
                    + f"  cores: gateway {c['gateway']:.2f} {c['per_worker']} refit {c['refit']:.2f} nats {c['nats']:.2f} engine "
                    f"{c['engine']:.2f} client {c['client']:.2f} other {c['other']:.2f}  errors {r['errors']}",
                    flush=True,
                )
    runs.sort(key=lambda r: (r["round"], r["kind"], r["workers"]))
    summary = summarize(runs, args.workers)
    report(args, runs, summary)
    return {"runs": runs, "summary": summary}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts; ratios are to the first")
    ap.add_argument("--repeat", type=int, default=5, help="rounds (worker counts interleaved); medians reported")
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    ap.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured seconds before each run")
    ap.add_argument("--concurrency", type=int, default=64, help="client connections, each one request at a time")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per streamed request")
    ap.add_argument("--engine", choices=["stub", "sim"], default="stub", help="what the gateways talk to")
    ap.add_argument("--engines", type=int, default=1, help="engine instances (role both)")
    ap.add_argument("--time-scale", type=float, default=1000.0, help="the sim engines' time scale")
    ap.add_argument("--client", choices=["raw", "aiohttp"], default="raw")
    ap.add_argument("--burst", action="store_true", help="the stub writes a whole stream at once")
    ap.add_argument("--no-sharing", action="store_true", help="sharing: {enabled: false} in the gateway config")
    ap.add_argument(
        "--refit-interval-s",
        type=float,
        default=3600.0,
        help="cost_model.refit_interval_s of the gateways (production: 30; the default keeps refits out of the runs)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help=f"first wait up to S s for a quiet host, and up to S s before each run for < {QUIET} cores of others",
    )
    ap.add_argument("--keep-logs", action="store_true", help="keep the engines' and gateways' logs (path printed)")
    ap.add_argument("--out", help="write the runs and the summary as JSON here")
    args = ap.parse_args(argv)
    args.workers = [int(x) for x in args.workers.split(",") if x.strip()]
    if not args.workers or min(args.workers) < 1 or len(set(args.workers)) != len(args.workers):
        ap.error("--workers: distinct counts >= 1")
    if args.repeat < 1 or args.engines < 1 or args.concurrency < 1:
        ap.error("--repeat, --engines and --concurrency must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_children_on_sigterm()
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    info, load = machine(), other_load()
    print(describe_host(info, load), flush=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="pdgate-worker-scaling-"))
    result: dict[str, Any] = {}
    try:
        import uvloop

        result = uvloop.run(run(args, tmp))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted; every process started here is stopped", file=sys.stderr)
        return 130
    finally:
        stop_all()
        failed = any(r["errors"] for r in result.get("runs", []))
        if args.keep_logs or failed:  # a failed request: the gateways' logs say why
            print(f"logs: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"benchmark": "worker_scaling", "host": info, "other_load": load, "args": vars(args), **result},
                indent=1,
                default=str,
            )
        )
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
