"""The ``pdgate bench`` commands: ``run``, ``sweep`` and ``report`` (their arguments: :mod:`loadgen.cli`).

Heavy modules are imported where used, so that ``pdgate --help`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from pdgate.loadgen.options import build_slo, build_targets, build_workload, load_config, run_meta, run_stats


async def _run_one(target: Any, requests: Sequence[Any], load: Any, progress: Progress | None) -> tuple[list[Any], Any]:
    from pdgate.loadgen.runner import run_load

    on_result: Callable[[Any], None] | None = None
    if progress is not None:
        task = progress.add_task(target.name, total=len(requests))
        on_result = lambda _r: progress.advance(task)
    return await run_load(target, requests, load, on_result=on_result)


def run_bench(args: argparse.Namespace) -> int:
    """``bench run``: the workload against every target in turn; tables, run files, plots. Exit 1 when a
    request failed, 2 for bad arguments."""
    from pdgate.common.runtime import run_async
    from pdgate.loadgen.plots import plot_cdfs, plot_timeseries
    from pdgate.loadgen.runfile import write_run
    from pdgate.loadgen.tables import print_summary

    console = Console()
    try:
        targets, slo, requests = build_targets(args), build_slo(args), build_workload(args)
        load = load_config(args, args.rate)
    except (ValueError, OSError) as exc:
        console.print(f"[red]pdgate bench run: {exc}[/red]")
        return 2
    out = Path(args.out)
    runs, all_results = [], {}
    for target in targets:
        with _progress(console) as progress:
            started = time.time()
            results, overhead = run_async(_run_one(target, requests, load, progress))
        stats = run_stats(args, results, slo)
        meta = run_meta(
            args,
            target,
            {
                "started": started,
                "client_overhead": {
                    "cpu_s": overhead.cpu_s,
                    "wall_s": overhead.wall_s,
                    "cpu_per_request_us": overhead.cpu_per_request_us,
                    "cpu_share": overhead.cpu_share,
                },
            },
        )
        paths = write_run(out, meta, results, stats)
        runs.append((target.name, stats))
        all_results[target.name] = [r for r in results if stats.is_measured(r)]
        console.print(
            f"{target.name}: {paths['json']}  {paths['csv']}  (client: {overhead.cpu_per_request_us:.0f} µs "
            f"CPU per request, {100 * overhead.cpu_share:.0f} % of a core)"
        )
        if not args.no_plots:
            plot_timeseries(results, out / f"timeseries_{target.name}.png")
    print_summary(console, runs)
    if not args.no_plots:
        console.print(f"plots: {plot_cdfs(all_results, out / 'cdf.png')}")
    return 0 if all(s.ok for _, s in runs) else 1


def run_sweep(args: argparse.Namespace) -> int:
    """``bench sweep``: every target's goodput rate (:mod:`loadgen.sweep`); run files and the attainment plot."""
    from pdgate.common.runtime import run_async
    from pdgate.loadgen.plots import plot_attainment_vs_rate
    from pdgate.loadgen.runfile import write_run
    from pdgate.loadgen.runner import run_load
    from pdgate.loadgen.stats import summarize
    from pdgate.loadgen.sweep import SweepConfig, sweep
    from pdgate.loadgen.tables import print_summary

    console = Console()
    try:
        targets, slo = build_targets(args), build_slo(args)
        pool = build_workload(
            args,
            max(args.num_requests, int(args.max_rate * args.point_duration) + 1) if args.workload == "trace" else None,
        )
        load_config(args, 1.0)
    except (ValueError, OSError) as exc:
        console.print(f"[red]pdgate bench sweep: {exc}[/red]")
        return 2
    by_name = {t.name: t for t in targets}
    config = SweepConfig(
        target_pct=args.target_pct,
        start_rate=args.start_rate,
        max_rate=args.max_rate,
        point_duration_s=args.point_duration,
        tolerance=args.tolerance,
        max_probes=args.max_probes,
    )
    cache: dict[tuple[int, float], list[Any]] = {}
    last_stats: dict[str, Any] = {}
    last_results: dict[str, list[Any]] = {}

    def workload(n: int, rate: float) -> list[Any]:
        """The same requests for every target at one rate; fresh prompts at each new rate, so that
        a probe does not hit the prefix cache the previous probe filled (traces: their own head)."""
        key = (n, rate)
        if key not in cache:
            if args.workload == "trace":
                cache[key] = pool[:n]
            else:
                cache[key] = build_workload(
                    argparse.Namespace(**{**vars(args), "seed": args.seed + round(rate * 1000)}), n
                )
        return cache[key]

    async def probe(name: str, rate: float, requests: Sequence[Any]) -> list[Any]:
        load = load_config(args, rate)
        load.arrivals = "poisson" if args.arrivals == "trace" else load.arrivals
        load.duration_s = args.point_duration
        results, _ = await run_load(by_name[name], requests, load)
        last_results[name] = results
        last_stats[name] = summarize(
            results, slo, duration_s=args.point_duration, warmup_s=args.warmup, cooldown_s=args.cooldown
        )
        return results

    def attainment(results: list[Any], rate: float) -> float:
        stats = summarize(results, slo, duration_s=args.point_duration, warmup_s=args.warmup, cooldown_s=args.cooldown)
        return stats.attainment or 0.0

    def on_point(name: str, rate: float, value: float) -> None:
        mark = "[green]good[/green]" if value * 100 >= args.target_pct else "[red]bad[/red]"
        console.print(f"  {name:<16} {rate:8.2f} req/s  attainment {100 * value:5.1f} %  {mark}")

    console.print(
        f"sweep: {len(targets)} target(s), {args.point_duration:g} s per probe, goal {args.target_pct:g} % "
        f"of requests within {slo.describe()}"
    )
    found = run_async(sweep(list(by_name), workload, probe, attainment, config, on_point))
    out = Path(args.out)
    curves = {name: result.points for name, result in found.items()}
    for name, result in found.items():
        console.print(
            f"[bold]{name}[/bold]: goodput rate {result.best_rate if result.best_rate is not None else 'none'}"
            f" req/s (lowest failing probe: {result.bad})"
        )
        if name in last_stats:
            write_run(
                out,
                run_meta(args, by_name[name], {"sweep": {name: curves[name]}, "best_rate": result.best_rate}),
                last_results[name],
                last_stats[name],
                stem=f"sweep_{name}",
            )
    print_summary(console, [(n, s) for n, s in last_stats.items()], target_pct=args.target_pct)
    if not args.no_plots:
        console.print(f"plot: {plot_attainment_vs_rate(curves, args.target_pct, out / 'attainment.png')}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """``bench report``: saved runs shown again (:func:`loadgen.report.render_report`)."""
    from pdgate.loadgen.report import render_report

    console = Console()
    try:
        paths = render_report([Path(p) for p in args.runs], Path(args.out), console, target_pct=args.target_pct)
    except (ValueError, OSError, KeyError) as exc:
        console.print(f"[red]pdgate bench report: {exc}[/red]")
        return 2
    for name, path in paths.items():
        console.print(f"{name}: {path}")
    return 0


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not sys.stdout.isatty(),
    )
