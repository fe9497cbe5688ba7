#!/usr/bin/env python3
"""Goodput with gateway replicas: 3 replicas sharing their state vs 1, and 3 sharing nothing,
on the same 2P2D simulated fleet and Mooncake-style trace.

    python benchmarks/replica_goodput.py [--replicas 3] [--policy slo-aware] [--requests-per-probe N]
        [--max-probes K] [--tolerance T] [--start-rate R] [--time-scale X] [--seed S] [--wait-quiet S]
        [--out results.json] [--keep-logs] [--quick]

**What**: goodput (the highest request rate at which >= 90 % of the requests meet their TTFT and
TPOT SLOs; a rejected or failed request is a miss) of three gateway set-ups over the same fleet:

* ``1 replica``: ``pdgate serve --workers 1``, the single-process gateway;
* ``N replicas``: ``pdgate serve --workers N`` (``--replicas``, default 3): N processes on one port
  (SO_REUSEPORT), sharing fleet state and in-flight load through the NATS server ``serve`` starts;
* ``N replicas, no sharing``: the same with ``sharing: {enabled: false}``: each replica sees only
  the requests it serves itself, about 1/N of the load, and the engines' scraped load.

**How**: the machinery of ``benchmarks/slo_goodput.py`` (imported): its ``mooncake`` trace window
(the trace's last records, 512-token blocks shrunk to 64 so prefix sharing is kept, SLO TTFT 400 ms,
TPOT 20 ms), its 2P2D fleet of ``h100-llama-3-8b`` sim engines (fresh per probe, so no cache or
load state carries over), its scheduling policies (``--policy``, default ``slo-aware``: the
gateway's default scheduling with admission control) and its rate search (double until a probe
misses, then bisect; the set-ups interleaved round by round, each given the identical request list
at a rate). One difference: the engines bind their KV-event publishers and every replica connects
(``kv_events.endpoint: tcp://*:PORT``), the form several replicas need, used for all set-ups.

Each probe also records the requests finished per engine (``vllm:request_success_total``; max/min
per role, the "spread": a pile-up shows as a high one), the prefill prefix hit rate, the CPU of
engines, gateway processes (refits and NATS apart) and client, and what other processes took of
the host (``*``: over 0.5 cores, engines lagging or the client sending late).

**Cost**: the default (3 set-ups x up to 6 probes, 200 requests each) takes ~5 minutes on the
project's 2-core box (~9 with ``--wait-quiet 20`` on a busy host); ``--quick`` (60 requests,
3 probes each) ~1.5 minutes.

**Caveats**: on 2 cores the replicas, NATS, four engines and the client share the CPU; goodput
differences under ~10 % are within the search's resolution (``--tolerance``) and run-to-run noise.
SO_REUSEPORT spreads connections, not requests: the load generator keeps its connections alive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
for extra in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import slo_goodput as sg
from _host import TreeCpu, describe_host, machine, other_load, wait_quiet

from pdgate.common.runtime import run_async
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.launcher import launch_command, wait_http_ok
from pdgate.loadgen.client import Target
from pdgate.loadgen.runner import LoadConfig, run_load
from pdgate.loadgen.slo import Slo, SloSpec
from pdgate.loadgen.stats import summarize
from pdgate.loadgen.sweep import SweepConfig, SweepResult, sweep
from pdgate.loadgen.types import BenchRequest, RequestResult

TRACE = "mooncake"
AIM_SHARED = 0.95


def variants(replicas: int) -> dict[str, tuple[int, dict[str, Any]]]:
    """Set-up name -> (workers, config added to the policy's)."""
    return {
        "1 replica": (1, {}),
        f"{replicas} replicas": (replicas, {}),
        f"{replicas} replicas, no sharing": (replicas, {"sharing": {"enabled": False}}),
    }


def engine_binds(config: dict[str, Any]) -> dict[str, Any]:
    """The config with every KV-event endpoint in the engine-binds form (``tcp://*:PORT``)."""
    for inst in config["instances"]:
        inst["kv_events"]["endpoint"] = "tcp://*:" + inst["kv_events"]["endpoint"].rsplit(":", 1)[1]
    return config


class ReplicaFleet(sg.Fleet):
    """slo_goodput's fleet with ``serve --workers N``: the gateway's CPU is its process tree's
    (supervisor, workers; NATS apart), and every descendant is stopped with it."""

    def __init__(self, config: dict[str, Any], workdir: Path, workers: int) -> None:
        super().__init__(config, workdir)
        self.workers = workers
        self.tree: TreeCpu | None = None

    async def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        for inst in GatewayConfig.model_validate(self.config).instances:
            spec = inst.spec()
            self.engines.append((spec.id, inst.url, sg._spawn(launch_command(inst), self.workdir / f"{spec.id}.log")))
        log = self.workdir / "gateway.log"
        cmd = [sys.executable, "-m", "pdgate.cli", "serve", "--config", str(config_path)]
        async with aiohttp.ClientSession() as session:
            for name, url, proc in self.engines:  # the replicas connect to the engines' KV publishers
                await wait_http_ok(session, url + "/health", proc, self.workdir / f"{name}.log", f"engine {name}", 60)
            self.gateway = sg._spawn([*cmd, "--workers", str(self.workers)], log)
            deadline = time.monotonic() + 60
            while "pdgate gateway ready:" not in log.read_text(errors="replace"):  # every worker serves
                if self.gateway.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gateway did not start:\n{log.read_text(errors='replace')[-3000:]}")
                await asyncio.sleep(0.05)
            await wait_http_ok(session, self.url + "/ready", self.gateway, log, "gateway", 60, 0.05)
        self.mark_cpu()

    def mark_cpu(self) -> None:
        super().mark_cpu()
        if self.gateway is not None:
            self.tree = self.tree or TreeCpu(self.gateway.pid)
            self.tree.mark()

    def cpu_used(self) -> dict[str, float | None]:
        return {**super().cpu_used(), **(self.tree.used() if self.tree else {})}

    def stop(self) -> None:
        if self.gateway is not None:  # also when the start failed
            self.tree = self.tree or TreeCpu(self.gateway.pid)
            self.tree.sample()
        super().stop()
        if self.tree:  # workers and NATS run in sessions of their own
            self.tree.kill_leftovers()

    async def warm_up(self, n: int = 4, model: str = sg.MODEL) -> None:
        """slo_goodput's warm-up, a new connection per request, so that it reaches every worker."""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for i in range(n * self.workers):
                body = {"model": model, "prompt": f"warm up {i} " * 8, "max_tokens": 2, "ignore_eos": True}
                async with session.post(self.url + "/v1/completions", json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"warm-up request: HTTP {resp.status}: {(await resp.text())[:300]}")

    async def spread(self) -> dict[str, Any]:
        """Requests finished per engine (``vllm:request_success_total``) and max/min per role."""
        done: dict[str, float] = {}
        async with aiohttp.ClientSession() as session:
            for name, url, _ in self.engines:
                try:
                    async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        text = await resp.text()
                except (aiohttp.ClientError, TimeoutError, OSError):
                    continue
                lines = [x for x in text.splitlines() if x.startswith("vllm:request_success_total")]
                done[name] = sum(float(x.rsplit(" ", 1)[1]) for x in lines)
        out: dict[str, Any] = {"finished": done}
        for role in ("prefill", "decode"):
            counts = [v for k, v in done.items() if k.startswith(role)]
            out[f"{role}_spread"] = round(max(counts) / min(counts), 2) if counts and min(counts) > 0 else None
        return out


async def run_probe(
    setup: str, rate: float, requests: Sequence[BenchRequest], args: argparse.Namespace, workdir: Path
) -> sg.Probe:
    """One probe on a fresh fleet (as slo_goodput's ``_run_probe``, with the set-up's gateway);
    a fleet that fails to start (a port taken meanwhile) is started again once on other ports."""
    try:
        return await _run_probe(setup, rate, requests, args, workdir / "try0")
    except RuntimeError as exc:
        print(f"  (probe {setup} at {rate:g} req/s: {str(exc).splitlines()[0]}; trying again)", flush=True)
        return await _run_probe(setup, rate, requests, args, workdir / "try1")


async def _run_probe(
    setup: str, rate: float, requests: Sequence[BenchRequest], args: argparse.Namespace, workdir: Path
) -> sg.Probe:
    workers, extra = variants(args.replicas)[setup]
    time_scale, slo = args.time_scale_used, args.slo
    ports = sg.free_ports(9)
    base = engine_binds(sg.base_config(ports[:4], ports[4:8], ports[8], time_scale))
    config = sg.deep_merge(sg.policy_config(args.policy, base, slo.default, time_scale), extra)
    GatewayConfig.model_validate(config)
    if args.wait_quiet > 0:  # up to S s for other processes to take < 0.2 cores
        await asyncio.to_thread(wait_quiet, args.wait_quiet, 0.2, 1.0, False)
    started = time.monotonic()
    async with ReplicaFleet(config, workdir, workers) as fleet:
        await fleet.warm_up()
        fleet.mark_cpu()
        span_sim = requests[-1].arrival_s or 0.0
        span = span_sim / time_scale  # as slo_goodput: stragglers after 3x the span are misses anyway
        load = LoadConfig(arrivals="trace", speedup=time_scale, duration_s=span + 1, drain_s=max(60.0, 3 * span))
        cpu_client0, host0, wall0 = time.process_time(), sg.host_cpu(), time.monotonic()
        results, _ = await run_load(Target(setup, fleet.url, sg.MODEL), requests, load)
        load_wall = time.monotonic() - wall0
        cpu_client, host1 = time.process_time() - cpu_client0, sg.host_cpu()
        states, spread, cpu = await fleet.sim_states(), await fleet.spread(), fleet.cpu_used()
    stats = summarize([sg.to_sim(r, time_scale) for r in results], slo, duration_s=max(span_sim, 1e-6) + 1e-9)
    lag = sg.lag_summary(states, max(span_sim, load_wall * time_scale))
    lateness = [1e3 * (r.sent_s - r.scheduled_s) for r in results]
    lag["client_late_p99_ms_wall"] = round(float(np.percentile(lateness, 99)), 2) if lateness else None
    lag.update(spread)
    info: dict[str, Any] = {k: None if v is None else round(v, 2) for k, v in cpu.items()}
    info.update(client=round(cpu_client, 2), load_wall_s=round(load_wall, 2))
    ours = sum(v for v in cpu.values() if v is not None) + cpu_client
    info["cores_busy"] = round(ours / load_wall, 2) if load_wall > 0 else None
    info["gateway_us_per_req"] = round(1e6 * (cpu.get("gateway") or 0.0) / len(requests))
    if host0 is not None and host1 is not None and host1[1] > host0[1] and load_wall > 0:
        host_cores = (host1[0] - host0[0]) / (host1[1] - host0[1]) * (os.cpu_count() or 1)
        info["host_cores_busy"] = round(host_cores, 2)
        info["other_cores_busy"] = round(max(0.0, host_cores - ours / load_wall), 2)
    errors = sorted({(r.error or f"HTTP {r.status}")[:160] for r in results if not r.ok})
    rejected = sum(1 for r in results if r.status == 429)
    return sg.Probe(setup, rate, len(requests), stats, time.monotonic() - started, lag, info, rejected, errors)


# --------------------------------------------------------------------------------- search
async def search(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, SweepResult], dict[str, dict]]:
    spec = args.spec
    workload = sg.TraceWorkload(spec, args.seed)
    info = workload.describe(args.requests_per_probe)
    args.workload = info
    print(
        f"trace {spec.name}: {spec.note}; {info['requests']} requests per probe, prompt tokens mean "
        f"{info['input_mean']:.0f} (p90 {info['input_p90']:.0f}), output mean {info['output_mean']:.0f}, "
        f"prompt blocks repeated in the window {100 * info.get('block_hit_rate', 0):.0f} %; SLO TTFT <= "
        f"{1e3 * spec.ttft_s:.0f} ms, TPOT <= {1e3 * spec.tpot_s:.0f} ms, {sg.TARGET_PCT:.0f} % must meet both; "
        f"policy {args.policy}; time scale {args.time_scale_used:g}",
        flush=True,
    )
    names = list(variants(args.replicas))
    probes: dict[str, dict[float, sg.Probe]] = {n: {} for n in names}
    counter = iter(range(1_000_000))
    last: dict[str, sg.Probe] = {}

    async def probe(name: str, rate: float, requests: Sequence[BenchRequest]) -> list[RequestResult]:
        p = await run_probe(name, rate, requests, args, workdir / f"{next(counter)}")
        probes[name][rate] = last["value"] = p
        s, lag, cpu = p.stats, p.lag, p.cpu
        print(
            f"  {name:<26} {sg.fmt_rate(rate):>5} req/s n={p.requests:<4} attained {100 * p.attainment:5.1f} %  "
            f"TTFT p50/p99 {sg._ms(s.ttft.p50)}/{sg._ms(s.ttft.p99)} ms  TPOT p99 {sg._ms(s.tpot.p99)} ms  "
            f"failed {s.failed} (429: {p.rejected})  spread P/D {lag['prefill_spread']}/{lag['decode_spread']}  "
            f"hit {lag['prefill_prefix_hit']}  gateway {cpu['gateway_us_per_req']} µs/req  refit {cpu.get('refit')} s  "
            f"nats {cpu.get('nats')} s  "
            f"cores {cpu['cores_busy']} (+{cpu.get('other_cores_busy', '?')} others)  {p.wall_s:.0f} s"
            + ("  [distorted?]" if sg.distorted(p) else ""),
            flush=True,
        )
        for err in p.errors[:2]:
            print(f"      error: {err}", flush=True)
        return []

    config = SweepConfig(
        target_pct=sg.TARGET_PCT,
        start_rate=args.start_rate or spec.start_rate,
        min_rate=0.25,
        max_rate=1000.0,
        point_duration_s=0.0,
        min_requests=args.requests_per_probe,
        tolerance=args.tolerance,
        max_probes=args.max_probes,
    )
    build = lambda n, rate: workload.requests(min(n, spec.max_requests), rate)
    sweeps = await sweep(names, build, probe, lambda _r, _rate: last["value"].attainment, config)
    return sweeps, probes


# --------------------------------------------------------------------------------- report
def goodput(sw: SweepResult) -> str:
    if sw.best_rate is None:
        return f"< {sg.fmt_rate(min(r for r, _ in sw.points))}" if sw.points else "-"
    return sg.fmt_rate(sw.best_rate) if sw.bad is not None else f">= {sg.fmt_rate(sw.best_rate)}"


def ratios(sweeps: dict[str, SweepResult], replicas: int) -> dict[str, float | None]:
    one, shared, alone = (sweeps[n].best_rate for n in variants(replicas))
    return {
        "shared_vs_one": shared / one if shared and one else None,
        "unshared_vs_shared": alone / shared if alone and shared else None,
        "unshared_vs_one": alone / one if alone and one else None,
    }


def report(args: argparse.Namespace, sweeps: dict[str, SweepResult], probes: dict[str, dict]) -> str:
    names = list(variants(args.replicas))
    lines = [
        f"### {args.spec.name}, 2P2D sim fleet, policy {args.policy}: goodput at {sg.TARGET_PCT:.0f} % attainment "
        f"(simulated req/s)",
        "",
        "| set-up | goodput | vs 1 replica | attainment % at probed rates | TTFT p50/p99 ms | TPOT p99 ms "
        "| spread P/D | prefix hit | gateway µs/req | refit / NATS CPU s | 429 |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    one = sweeps[names[0]].best_rate
    for name in names:
        sw, by_rate = sweeps[name], probes[name]
        points = " ".join(
            f"{sg.fmt_rate(r)}:{100 * a:.3g}" + ("*" if sg.distorted(by_rate[r]) else "") for r, a in sorted(sw.points)
        )
        p = by_rate.get(sw.best_rate) if sw.best_rate is not None else None
        cells = ["-"] * 7
        if p is not None:
            cells = [
                f"{sg._ms(p.stats.ttft.p50)} / {sg._ms(p.stats.ttft.p99)}",
                sg._ms(p.stats.tpot.p99),
                f"{p.lag['prefill_spread']} / {p.lag['decode_spread']}",
                str(p.lag["prefill_prefix_hit"]),
                str(p.cpu["gateway_us_per_req"]),
                f"{p.cpu.get('refit')} / {p.cpu.get('nats')}",
                str(p.rejected),
            ]
        ratio = f"{sw.best_rate / one:.2f}x" if sw.best_rate and one else "-"
        lines.append(f"| {name} | {goodput(sw)} | {ratio} | {points} | " + " | ".join(cells) + " |")
    common = sorted(set.intersection(*(set(probes[n]) for n in names)))
    if common:
        lines += ["", "Attainment % at the rates every set-up was probed at (same requests):", ""]
        lines += ["| rate | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for rate in common:
            lines.append(
                f"| {sg.fmt_rate(rate)} | "
                + " | ".join(
                    f"{100 * probes[n][rate].attainment:.1f} (P/D spread {probes[n][rate].lag['prefill_spread']}/"
                    f"{probes[n][rate].lag['decode_spread']})"
                    for n in names
                )
                + " |"
            )
    r = ratios(sweeps, args.replicas)
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"
    verdict = "" if r["shared_vs_one"] is None else ("MET" if r["shared_vs_one"] >= AIM_SHARED else "below")
    everything = [p for by_rate in probes.values() for p in by_rate.values()]
    lines += [
        "",
        f"{names[1]} / 1 replica: {fmt(r['shared_vs_one'])} (aim >= {AIM_SHARED}x: {verdict}); {names[2]} / "
        f"{names[1]}: {fmt(r['unshared_vs_shared'])} (what sharing buys); {names[2]} / 1 replica: "
        f"{fmt(r['unshared_vs_one'])}. Goodput resolution: the search stops when the bracket is within "
        f"{100 * args.tolerance:.0f} % or after {args.max_probes} probes.",
        f"{len(everything)} probes; {sum(sg.distorted(p) for p in everything)} flagged (*) as possibly distorted; "
        f"other processes took up to {max((p.cpu.get('other_cores_busy') or 0.0) for p in everything):.2f} cores "
        "during a probe."
        if everything
        else "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--replicas", type=int, default=3, help="gateway workers of the replicated set-ups")
    ap.add_argument("--policy", default="slo-aware", choices=list(sg.POLICIES), help="slo_goodput.py's policies")
    ap.add_argument("--requests-per-probe", type=int, default=200)
    ap.add_argument("--max-probes", type=int, default=6, help="probes per set-up")
    ap.add_argument("--tolerance", type=float, default=0.1, help="stop when the bracket is this narrow (relative)")
    ap.add_argument("--start-rate", type=float, help="first probed rate, req/s (default: the trace's)")
    ap.add_argument("--time-scale", type=float, help="simulated seconds per wall second (default: the trace's)")
    ap.add_argument("--seed", type=int, default=0, help="prompt texts (lengths and times come from the trace)")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S s for a quiet host first and before each probe",
    )
    ap.add_argument("--out", help="write every probe and the table as JSON here")
    ap.add_argument("--keep-logs", action="store_true", help="keep the engines' and gateways' logs (path printed)")
    ap.add_argument("--quick", action="store_true", help="60 requests per probe, 3 probes per set-up (~2 min)")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests_per_probe, args.max_probes = min(args.requests_per_probe, 60), min(args.max_probes, 3)
    if args.replicas < 2:
        ap.error("--replicas must be >= 2")
    args.spec = sg.TRACES[TRACE]
    args.time_scale_used = args.time_scale or args.spec.time_scale
    args.slo = SloSpec(default=Slo(ttft_s=args.spec.ttft_s, tpot_s=args.spec.tpot_s))
    if why := sg.policy_available(args.policy):
        ap.error(f"policy {args.policy}: {why}")
    return args


async def main_async(args: argparse.Namespace) -> tuple[dict[str, SweepResult], dict[str, dict]]:
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="pdgate-replica-goodput-"))
    try:
        return await search(args, workdir)
    finally:
        if args.keep_logs:
            print(f"logs: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (sg.DATA / args.spec.path).exists():
        print(f"missing trace file {sg.DATA / args.spec.path} (set PDGATE_DATA)", file=sys.stderr)
        return 2
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    host, load = machine(), other_load()
    print(describe_host(host, load), flush=True)
    started = time.monotonic()
    try:
        sweeps, probes = run_async(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every engine, gateway and NATS server stopped", file=sys.stderr)
        return 130
    finally:
        sg._stop_all()
    table = report(args, sweeps, probes)
    print("\n" + table + f"\n\ntotal {(time.monotonic() - started) / 60:.1f} min")
    if args.out:
        result = {
            "benchmark": "replica_goodput",
            "host": host,
            "other_load": load,
            "args": {k: v for k, v in vars(args).items() if k not in ("spec", "slo")},
            "trace": sg.dataclasses.asdict(args.spec),
            "code": sg.code_version(),
            "wall_s": time.monotonic() - started,
            "ratios": ratios(sweeps, args.replicas),
            "setups": {
                name: {
                    "goodput_rps": sw.best_rate,
                    "points": sw.points,
                    "probes": [{**p.summary(), "lag": p.lag} for _, p in sorted(probes[name].items())],
                }
                for name, sw in sweeps.items()
            },
            "markdown": table,
        }
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
