#!/usr/bin/env python3
"""How closely ``pdgate simulate`` (virtual time, in one process) reproduces a real-time run of
the same fleet (engines and gateway as processes, the load generator over HTTP).

    python benchmarks/simulate_fidelity.py [--fleets 2p2d,4x] [--rates 2,5,10,20]
        [--requests N] [--seed S] [--out results.json]

For every fleet and rate the same workload (synthetic prompts of ~1024 tokens, 128 output
tokens, ``ignore_eos``, Poisson arrivals; one seed) goes to:

* **real time**: the fleet of ``benchmarks/slo_goodput.py`` (each simulated engine a ``pdgate
  engine sim`` process at time scale 1, the gateway a ``pdgate serve`` process, KV events over
  ZMQ), the load generator in this process over HTTP;
* **virtual time**: :func:`pdgate.simulate.run.run_simulation` on the same gateway config.

It prints, per point, TTFT and TPOT p50/p90 from both and their relative difference, and the SLO
attainment of both (``--slo``). The issue's bar: within 10 % on each percentile and within 3
points of attainment. The real-time side needs a quiet host: the script reports the CPU other
processes took during each real-time run, and the engines' lag (simulated time lost because the
host could not keep up), which make a point unreliable when large.

Fleets: ``2p2d`` (configs/default.yaml's two prefill and two decode engines) and ``4x`` (four
colocated engines). Cost on the 2-core box: about 20 s of wall time per real-time point plus a
few seconds per virtual one.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import slo_goodput as fleets
from _host import other_load

from pdgate.common.runtime import run_async
from pdgate.common.tokenizer import load_tokenizer
from pdgate.gateway.config import GatewayConfig
from pdgate.loadgen import workloads
from pdgate.loadgen.client import Target
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.runner import LoadConfig, run_load
from pdgate.loadgen.slo import SloSpec
from pdgate.loadgen.stats import RunStats, summarize
from pdgate.loadgen.types import BenchRequest, RequestResult
from pdgate.simulate.run import HopCosts, run_simulation, simulation_config

FLEETS = ("2p2d", "4x")


def fleet_config(name: str) -> dict[str, Any]:
    """The gateway config of a fleet, on free ports (the real-time side binds them)."""
    ports, zmq_ports, (gateway_port,) = fleets.free_ports(4), fleets.free_ports(4), fleets.free_ports(1)
    config = fleets.base_config(ports, zmq_ports, gateway_port, 1.0)
    if name == "4x":
        for n, inst in enumerate(config["instances"]):
            inst.update(id=f"engine-{n}", role="both")
    elif name != "2p2d":
        raise ValueError(f"unknown fleet {name!r}; known: {', '.join(FLEETS)}")
    return config


def workload(args: argparse.Namespace) -> list[BenchRequest]:
    builder = PromptBuilder(load_tokenizer("builtin"), seed=args.seed)
    return workloads.synthetic(
        args.requests, args.input_len, args.output_len, builder, args.seed, "completions", ignore_eos=True
    )


async def real_time(
    config: dict[str, Any], requests: Sequence[BenchRequest], load: LoadConfig, workdir: Path
) -> dict[str, Any]:
    async with fleets.Fleet(copy.deepcopy(config), workdir) as fleet:
        await fleet.warm_up()
        fleet.mark_cpu()
        target = Target("real", fleet.url, fleets.MODEL)
        started = time.monotonic()
        results, overhead = await run_load(target, requests, load)
        wall = time.monotonic() - started
        states = await fleet.sim_states()
        lag = max((s.get("lag_total_seconds") or 0.0) for s in states.values() if isinstance(s, dict))
        return {
            "results": results,
            "wall_s": wall,
            "cpu": fleet.cpu_used(),
            "lag_s": lag,
            "client_cpu_s": overhead.cpu_s,
        }


def virtual_time(
    config: dict[str, Any], requests: Sequence[BenchRequest], load: LoadConfig, seed: int, costs: HopCosts
) -> dict[str, Any]:
    parsed = simulation_config(GatewayConfig.model_validate(config))
    result = run_simulation(parsed, requests, load, seed=seed, costs=costs)
    return {"results": result.results, "wall_s": result.wall_s, "simulated_s": result.simulated_s}


def figures(results: list[RequestResult], slo: SloSpec) -> RunStats:
    duration = max((r.scheduled_s for r in results), default=0.0) + 1e-9
    return summarize(results, slo, duration_s=max(duration, 1e-6))


def diff(real: float | None, virtual: float | None) -> float | None:
    if real is None or virtual is None or real == 0:
        return None
    return (virtual - real) / real


def point(name: str, rate: float, args: argparse.Namespace, slo: SloSpec, workdir: Path) -> dict[str, Any]:
    config = fleet_config(name)
    requests = workload(args)
    load = LoadConfig(rate=rate, seed=args.seed, timeout_s=120.0)
    virtual = virtual_time(
        config, requests, load, args.seed, HopCosts(args.hop_ms / 1e3, args.gateway_ms_per_kib / 1e3)
    )
    quiet_before = other_load(1.0)
    real = run_async(real_time(config, requests, load, workdir / f"{name}-{rate:g}"))
    quiet_after = other_load(1.0)
    rs, vs = figures(real["results"], slo), figures(virtual["results"], slo)
    row: dict[str, Any] = {"fleet": name, "rate": rate, "requests": len(requests)}
    for metric in ("ttft", "tpot"):
        for q in ("p50", "p90"):
            r, v = getattr(getattr(rs, metric), q), getattr(getattr(vs, metric), q)
            row[f"{metric}_{q}"] = {"real": r, "virtual": v, "diff": diff(r, v)}
    row["attainment"] = {"real": rs.attainment, "virtual": vs.attainment}
    row["failed"] = {"real": rs.failed, "virtual": vs.failed}
    row["real_wall_s"], row["virtual_wall_s"] = real["wall_s"], virtual["wall_s"]
    row["engine_lag_s"], row["fleet_cpu_s"] = real["lag_s"], real["cpu"]
    row["other_load"] = {"before": quiet_before, "after": quiet_after}
    return row


def ms(value: float | None) -> str:
    return "-" if value is None else f"{1e3 * value:.1f}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def table(rows: list[dict[str, Any]]) -> str:
    head = "| fleet | rate | TTFT p50 real/sim | Δ | TTFT p90 real/sim | Δ | TPOT p50 real/sim | Δ | TPOT p90 real/sim | Δ | attainment real/sim | lag s |"
    lines = [head, "|" + "---|" * 12]
    for row in rows:
        cells = [row["fleet"], f"{row['rate']:g}"]
        for key in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"):
            entry = row[key]
            cells += [f"{ms(entry['real'])} / {ms(entry['virtual'])}", pct(entry["diff"])]
        att = row["attainment"]
        cells.append(f"{100 * (att['real'] or 0):.1f} / {100 * (att['virtual'] or 0):.1f}")
        cells.append(f"{row['engine_lag_s']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fleets", default=",".join(FLEETS))
    parser.add_argument("--rates", default="2,5,10,20", help="requests/s, comma-separated")
    parser.add_argument("--requests", type=int, default=150, help="requests per point")
    parser.add_argument("--input-len", default="lognormal:1024:0.3:2048", help="as pdgate bench's --input-len")
    parser.add_argument("--output-len", default="fixed:128", help="as pdgate bench's --output-len")
    parser.add_argument("--slo", default="ttft=0.2,tpot=0.03", help="the SLO attainment is measured against")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hop-ms", type=float, default=0.0, help="as pdgate simulate's (0: the pure model)")
    parser.add_argument("--gateway-ms-per-kib", type=float, default=0.0, help="as pdgate simulate's")
    parser.add_argument("--out", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    slo = SloSpec.parse([args.slo])
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdgate-fidelity-") as tmp:
        for name in args.fleets.split(","):
            for rate in (float(r) for r in args.rates.split(",")):
                row = point(name, rate, args, slo, Path(tmp))
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    worst = max(
        (abs(row[k]["diff"] or 0) for row in rows for k in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")), default=0
    )
    worst_att = max(
        (abs((row["attainment"]["real"] or 0) - (row["attainment"]["virtual"] or 0)) for row in rows), default=0
    )
    print(
        f"\nlargest percentile difference {100 * worst:.1f} %, largest attainment difference {100 * worst_att:.1f} points"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    asyncio.get_event_loop_policy()  # the real-time side runs its own loops (run_async)
    sys.exit(main())
