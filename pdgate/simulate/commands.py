"""``pdgate simulate``'s run and report (its arguments: :mod:`pdgate.simulate.cli`).

Heavy modules are imported where used, so that ``pdgate --help`` stays quick.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from pdgate.gateway.config import GatewayConfig
    from pdgate.loadgen.runner import LoadConfig
    from pdgate.loadgen.types import BenchRequest
    from pdgate.simulate.run import FleetSample, SimulationResult

FLEET_COLUMNS = (
    "t",
    "instance",
    "role",
    "running",
    "waiting",
    "kv_usage",
    "inflight",
    "draining",
    "busy_s",
    "migrations_in",
)


def fleet_config(args: argparse.Namespace) -> GatewayConfig:
    """The config file (or the embedded default) with the fleet resized as the flags say."""
    from pdgate.gateway.config import GatewayConfig
    from pdgate.gateway.launcher import default_config_path
    from pdgate.simulate.fleet import resized
    from pdgate.simulate.run import simulation_config

    config = GatewayConfig.load(args.config or str(default_config_path()))
    counts = {
        role: n for role in ("prefill", "decode", "both", "flex") if (n := getattr(args, f"count_{role}")) is not None
    }
    return simulation_config(resized(config, args.instances, counts), args.cost_model_dir)


def run_simulate(args: argparse.Namespace) -> int:
    """``pdgate simulate``: one run; tables, run files, plots. Exit 1 when a request failed, 2 for
    bad arguments."""
    from pydantic import ValidationError

    from pdgate.gateway.config import ConfigError
    from pdgate.loadgen.options import build_slo, build_workload, load_config, run_stats
    from pdgate.loadgen.plots import plot_cdfs, plot_timeseries
    from pdgate.loadgen.runfile import write_run
    from pdgate.loadgen.tables import print_summary
    from pdgate.simulate.run import TARGET_NAME

    console = Console()
    try:
        config = fleet_config(args)
        if args.model is None:
            args.model = config.models[0].name
        slo, requests = build_slo(args), build_workload(args)
        load = load_config(args, args.rate)
    except (ConfigError, ValidationError, ValueError, OSError) as exc:
        console.print(f"[red]pdgate simulate: {exc}[/red]")
        return 2
    started = time.time()
    result = simulate_as_asked(args, config, requests, load)
    results = result.results
    stats = run_stats(args, results, slo)
    meta = {
        "name": "simulate",
        "target": TARGET_NAME,
        "url": "memory",
        "config": {k: v for k, v in vars(args).items() if k != "run"},
        "started": started,
        "simulation": simulation_meta(result, config),
    }
    out = Path(args.out)
    paths = write_run(out, meta, results, stats)
    fleet_csv = write_fleet_series(out / f"fleet_{paths['json'].stem}.csv", result.samples)
    console.print(f"simulate: {paths['json']}  {paths['csv']}  {fleet_csv}")
    if not args.no_plots:
        plot_timeseries(results, out / "timeseries_simulate.png")
        console.print(
            f"plots: {plot_cdfs({'simulate': results}, out / 'cdf.png')}  {plot_fleet(result.samples, out / 'fleet.png')}"
        )
    print_summary(console, [("simulate", stats)])
    console.print(describe(result))
    return 0 if stats.ok else 1


def simulate_as_asked(
    args: argparse.Namespace, config: GatewayConfig, requests: Sequence[BenchRequest], load: LoadConfig
) -> SimulationResult:
    """One simulation with the run options of ``simulate`` and ``simulate plan`` (seed, sampling,
    stream interval, hop costs)."""
    from pdgate.simulate.run import HopCosts, run_simulation

    return run_simulation(
        config,
        requests,
        load,
        seed=args.seed,
        sample_interval_s=args.sample_interval,
        stream_interval=args.stream_interval,
        costs=HopCosts(args.hop_ms / 1e3, args.gateway_ms_per_kib / 1e3),
    )


def simulation_meta(result: SimulationResult, config: GatewayConfig) -> dict[str, Any]:
    from pdgate.simulate.fleet import role_counts

    return {
        "instances": result.instances,
        "roles": role_counts(config.instances),
        "simulated_s": result.simulated_s,
        "wall_s": result.wall_s,
        "cpu_s": result.cpu_s,
        "speedup": result.speedup,
        "steps": result.steps,
        "migrations": result.migrations,
        "migrations_failed": result.migrations_failed,
    }


def describe(result: SimulationResult) -> str:
    tokens = sum(r.output_tokens for r in result.results)
    per_token = 1e6 * result.cpu_s / tokens if tokens else 0.0
    return (
        f"simulated {result.simulated_s:.1f} s of {result.instances} instances in {result.wall_s:.1f} s wall "
        f"({result.speedup:.1f}x real time; {result.cpu_s:.1f} s CPU, {per_token:.1f} µs CPU per output token, "
        f"{result.steps} engine steps); migrations: {result.migrations} done, {result.migrations_failed} failed"
    )


def write_fleet_series(path: Path, samples: list[FleetSample]) -> Path:
    """The fleet's samples as CSV (:data:`FLEET_COLUMNS`, one row per instance and sample)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FLEET_COLUMNS)
        writer.writeheader()
        for sample in samples:
            writer.writerow(sample.to_dict())
    return path


def plot_fleet(samples: list[FleetSample], out_png: Path) -> Path:
    """Per role over time: running and waiting requests per instance, the mean utilisation (the
    share of each interval the engines were busy, from their modelled busy time) and the
    highest KV usage; and each instance's role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    by_role: dict[str, dict[float, list[FleetSample]]] = {}
    for s in samples:
        by_role.setdefault(s.role, {}).setdefault(s.t, []).append(s)
    previous: dict[str, tuple[float, float]] = {}  # instance -> (t, busy_s) of its last sample
    utilisation: dict[str, dict[float, list[float]]] = {}
    for s in samples:
        last = previous.get(s.instance)
        if last is not None and s.t > last[0]:
            share = (s.busy_s - last[1]) / (s.t - last[0])
            utilisation.setdefault(s.role, {}).setdefault(s.t, []).append(share)
        previous[s.instance] = (s.t, s.busy_s)
    for role, moments in sorted(by_role.items()):
        times = sorted(moments)
        running = [sum(x.running for x in moments[t]) / len(moments[t]) for t in times]
        waiting = [sum(x.waiting for x in moments[t]) / len(moments[t]) for t in times]
        axes[0].plot(times, running, label=f"{role}: running")
        axes[0].plot(times, waiting, "--", label=f"{role}: waiting")
        kv = [max(x.kv_usage for x in moments[t]) for t in times]
        axes[1].plot(times, kv, ":", label=f"{role}: max KV usage")
        shares = utilisation.get(role, {})
        busy_times = sorted(shares)
        axes[1].plot(busy_times, [sum(shares[t]) / len(shares[t]) for t in busy_times], label=f"{role}: utilisation")
    instances = sorted({s.instance for s in samples})
    role_codes = {"prefill": 0, "both": 1, "decode": 2}
    for n, instance in enumerate(instances[:64]):
        points = [(s.t, role_codes.get(s.role, 1)) for s in samples if s.instance == instance]
        axes[2].plot([p[0] for p in points], [p[1] + 0.6 * n / max(1, len(instances)) for p in points], linewidth=0.8)
    axes[0].set_ylabel("requests per instance")
    axes[1].set_ylabel("share")
    axes[1].set_ylim(0, 1.05)
    axes[2].set_ylabel("role")
    axes[2].set_yticks([0.3, 1.3, 2.3], ["prefill", "both", "decode"])
    axes[2].set_xlabel("simulated seconds")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
