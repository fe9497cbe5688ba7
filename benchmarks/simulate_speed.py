#!/usr/bin/env python3
"""How fast ``pdgate simulate`` runs: simulated seconds per wall second, and CPU per request and
per output token, for a fleet at a given share of its capacity.

    python benchmarks/simulate_speed.py [--instances 16] [--load 0.8] [--seconds 30]
        [--stream-interval 16] [--trace azure-conv] [--seed S]

1. **Capacity**: the fleet (configs/default.yaml's 2P2D proportions, resized to ``--instances``)
   is sent ``--probe-requests`` requests at once; its capacity is the rate it completed them at.
2. **The run**: ``--seconds`` simulated seconds of Poisson arrivals at ``--load`` times that
   capacity (or, with ``--trace``, the trace's own arrival pattern scaled to that rate), with the
   workload of ``pdgate bench`` (prompts lognormal around 512 tokens, outputs around 128,
   ``ignore_eos``), every engine streaming ``--stream-interval`` tokens a chunk.

It prints the speed-up (simulated / wall seconds), the run's CPU, CPU per request and per output
token, and where the CPU went (the gateway's request path, the engines' step loops and streams,
the load generator, the rest) from a sampling of the profiler over the run. The wall figures
need a quiet host: the host's other load is printed before the run.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _host import describe_host, machine, other_load

from pdgate.common.tokenizer import load_tokenizer
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.launcher import default_config_path
from pdgate.loadgen import workloads
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.runner import LoadConfig
from pdgate.loadgen.types import BenchRequest
from pdgate.simulate.fleet import resized, role_counts
from pdgate.simulate.run import SimulationResult, run_simulation, simulation_config

PARTS = {  # where a profiled function's own time is counted, by its file
    "gateway": ("/gateway/", "/scheduler/", "/adapters/"),
    "engines": ("/engines/",),
    "load generator": ("/loadgen/",),
    "transport": ("/simulate/",),
}


def fleet(instances: int) -> GatewayConfig:
    return simulation_config(resized(GatewayConfig.load(str(default_config_path())), instances))


def workload(n: int, seed: int) -> list[BenchRequest]:
    builder = PromptBuilder(load_tokenizer("builtin"), seed=seed)
    return workloads.synthetic(
        n, "lognormal:512:0.5:4096", "lognormal:128:0.5:1024", builder, seed, "completions", ignore_eos=True
    )


def capacity(config: GatewayConfig, args: argparse.Namespace) -> float:
    """Requests per second the fleet completes when they all arrive at once."""
    requests = workload(args.probe_requests, args.seed + 1)
    result = run_simulation(
        config,
        requests,
        LoadConfig(arrivals="constant", rate=1e6, seed=args.seed),
        stream_interval=args.stream_interval,
    )
    done = [r for r in result.results if r.ok]
    return len(done) / max(r.end_s for r in done)


def profile_parts(profile: cProfile.Profile) -> dict[str, float]:
    parts = dict.fromkeys([*PARTS, "rest (asyncio, json, prometheus_client, ...)"], 0.0)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    for (filename, _, _), (_, _, tottime, _, _) in stats.items():
        part = next((name for name, marks in PARTS.items() if any(m in filename for m in marks)), None)
        parts[part or "rest (asyncio, json, prometheus_client, ...)"] += tottime
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--load", type=float, default=0.8, help="share of the fleet's capacity offered")
    ap.add_argument("--seconds", type=float, default=30.0, help="simulated seconds of arrivals")
    ap.add_argument("--stream-interval", type=int, default=16)
    ap.add_argument("--probe-requests", type=int, default=0, help="capacity probe size (default 64 per instance)")
    ap.add_argument("--no-profile", action="store_true", help="skip the CPU breakdown (a profiler costs ~20 %%)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.probe_requests = args.probe_requests or 64 * args.instances
    print(describe_host(machine(), other_load()), flush=True)
    config = fleet(args.instances)
    roles = role_counts(config.instances)
    cap = capacity(config, args)
    rate = args.load * cap
    n = max(1, round(rate * args.seconds))
    print(
        f"fleet {', '.join(f'{n} {r}' for r, n in roles.items() if n)}: capacity {cap:.0f} req/s; "
        f"running {n} requests at {rate:.0f} req/s ({100 * args.load:.0f} %), stream interval {args.stream_interval}",
        flush=True,
    )
    requests = workload(n, args.seed)
    load = LoadConfig(rate=rate, seed=args.seed)
    result: SimulationResult
    if args.no_profile:
        result = run_simulation(config, requests, load, stream_interval=args.stream_interval)
        parts = None
    else:
        profile = cProfile.Profile()
        profile.enable()
        result = run_simulation(config, requests, load, stream_interval=args.stream_interval)
        profile.disable()
        parts = profile_parts(profile)
    tokens = sum(r.output_tokens for r in result.results)
    ok = sum(1 for r in result.results if r.ok)
    print(
        f"simulated {result.simulated_s:.1f} s in {result.wall_s:.1f} s wall: {result.speedup:.2f}x real time; "
        f"{result.cpu_s:.1f} s CPU: {1e3 * result.cpu_s / n:.2f} ms per request, "
        f"{1e6 * result.cpu_s / max(tokens, 1):.1f} µs per output token ({ok}/{n} requests ok, {tokens} tokens, "
        f"{result.steps} engine steps)"
    )
    if parts is not None:
        total = sum(parts.values()) or 1.0
        print(
            "CPU by part (profiled, own time): " + ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in parts.items())
        )
        print("per request: " + ", ".join(f"{k} {1e3 * v / n * result.cpu_s / total:.2f} ms" for k, v in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
