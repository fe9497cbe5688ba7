"""``pdgate bench run | sweep | report``: SLO load tests against any OpenAI-compatible endpoint.

* ``run``: one workload, one arrival process, against one or more targets (one after the other);
  a summary table, and per target a JSON (config, environment, stats, every request) and a CSV
  in ``--out``, plus TTFT/TPOT CDFs and latency/throughput time series.
* ``sweep``: the highest request rate at which ``--target-pct`` % of requests meet the SLOs
  (:mod:`loadgen.sweep`), for every target, probes interleaved; the attainment-vs-rate plot.
* ``report``: the tables and plots again from saved JSON files, several runs side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
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

BENCH_DESCRIPTION = __doc__


def add_bench_commands(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="SLO load generator (run, sweep, report)",
        description=BENCH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="one load test against one or more targets")
    _common(run)
    run.add_argument("--rate", type=float, help="requests/s (poisson, gamma, constant)")
    run.set_defaults(run=run_bench)
    sweep = sub.add_parser("sweep", help="find the highest rate meeting the SLOs, per target")
    _common(sweep)
    sweep.add_argument("--target-pct", type=float, default=90.0, help="%% of requests that must meet their SLOs")
    sweep.add_argument("--start-rate", type=float, default=1.0)
    sweep.add_argument("--max-rate", type=float, default=1000.0)
    sweep.add_argument("--point-duration", type=float, default=30.0, help="seconds per probe")
    sweep.add_argument("--max-probes", type=int, default=8)
    sweep.add_argument("--tolerance", type=float, default=0.1, help="stop when the bracket is this narrow (relative)")
    sweep.set_defaults(run=run_sweep)
    report = sub.add_parser("report", help="tables and plots from saved runs")
    report.add_argument("runs", nargs="+", help="run JSON files")
    report.add_argument("--out", default="results/report", help="directory for the plots")
    report.add_argument("--target-pct", type=float, default=90.0)
    report.set_defaults(run=run_report)


def _common(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("target")
    t.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="[NAME=]URL",
        help="an OpenAI-compatible base URL (pdgate, vLLM, SGLang, a router); repeat to compare",
    )
    t.add_argument("--model", required=True, help="the model name to request")
    t.add_argument("--api-key", help="bearer token for the targets")
    t.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=["synthetic", "shared-prefix", "multi-turn", "trace"], default="synthetic")
    w.add_argument(
        "--tokenizer", default="builtin", help="'builtin' (the sim's) or a local Hugging Face tokenizer directory"
    )
    w.add_argument("--api", choices=["completions", "chat"], default="completions")
    w.add_argument("--num-requests", type=int, default=200)
    w.add_argument(
        "--input-len",
        default="lognormal:512:0.5:4096",
        help="fixed:N, uniform:LO:HI, lognormal:MEAN:SIGMA[:MAX], file:PATH[:COL]",
    )
    w.add_argument("--output-len", default="lognormal:128:0.5:1024")
    w.add_argument("--tenants", type=int, default=8, help="shared-prefix: tenants (system prompts)")
    w.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: system prompt tokens")
    w.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    w.add_argument("--trace", help="trace or dataset file (Mooncake JSONL, Azure CSV, alpaca/ShareGPT/JSONL)")
    w.add_argument(
        "--trace-format", default="auto", choices=["auto", "mooncake", "azure", "alpaca", "sharegpt", "jsonl"]
    )
    w.add_argument("--trace-scale", type=float, default=1.0, help="Mooncake: scale every block (keeps the sharing)")
    w.add_argument("--truncate-input", type=int, help="cap prompts at this many tokens")
    w.add_argument("--offset", type=int, default=0, help="skip the trace's first N records")
    w.add_argument("--max-input", type=int, help="trace: skip records with longer prompts")
    w.add_argument("--max-output", type=int, help="trace: skip records with longer outputs")
    w.add_argument("--no-ignore-eos", action="store_true", help="let the model stop early")
    w.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("load")
    a.add_argument("--arrivals", choices=["poisson", "gamma", "constant", "trace"], default="poisson")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson, < 1 burstier)")
    a.add_argument("--speedup", type=float, default=1.0, help="trace arrivals: time compression")
    a.add_argument("--max-concurrency", type=int)
    a.add_argument("--duration", type=float, help="stop sending after this many seconds")
    a.add_argument("--warmup", type=float, default=0.0, help="seconds excluded from the statistics at the start")
    a.add_argument("--cooldown", type=float, default=0.0, help="seconds excluded at the end")
    s = p.add_argument_group("SLOs and output")
    s.add_argument(
        "--slo",
        action="append",
        default=[],
        metavar="SPEC",
        help="e.g. ttft=0.5,tpot=0.05[,e2e=10] or class=NAME:ttft=..; a YAML/JSON file also works",
    )
    s.add_argument("--out", default="results", help="directory for JSON, CSV and plots")
    s.add_argument("--no-plots", action="store_true")


def _targets(args: argparse.Namespace) -> list[Any]:
    from pdgate.loadgen.client import Target

    targets = []
    for i, spec in enumerate(args.target):
        name, _, url = spec.rpartition("=") if "=" in spec.split("://", 1)[0] else ("", "", spec)
        targets.append(
            Target(name or (f"target{i}" if len(args.target) > 1 else "target"), url, args.model, api_key=args.api_key)
        )
    return targets


def _slo(args: argparse.Namespace) -> Any:
    from pdgate.loadgen.slo import SloSpec

    if len(args.slo) == 1 and Path(args.slo[0]).is_file():
        return SloSpec.load(args.slo[0])
    return SloSpec.parse(args.slo or ["ttft=1,tpot=0.1"])


def build_workload(args: argparse.Namespace, n: int | None = None) -> list[Any]:
    """The workload's first ``n`` requests (all of ``--num-requests`` by default); seeded."""
    from pdgate.common.tokenizer import load_tokenizer
    from pdgate.loadgen import traces, workloads
    from pdgate.loadgen.prompts import PromptBuilder

    n = n or args.num_requests
    builder = PromptBuilder(load_tokenizer(args.tokenizer), seed=args.seed)
    ignore_eos = not args.no_ignore_eos
    if args.workload == "synthetic":
        return workloads.synthetic(
            n, args.input_len, args.output_len, builder, args.seed, args.api, ignore_eos=ignore_eos
        )
    if args.workload == "shared-prefix":
        per_tenant = -(-n // args.tenants)
        return workloads.shared_prefix(
            args.tenants,
            args.prefix_len,
            per_tenant,
            args.input_len,
            args.output_len,
            builder,
            args.seed,
            args.api,
            ignore_eos=ignore_eos,
        )[:n]
    if args.workload == "multi-turn":
        conversations = -(-n // args.turns)
        return workloads.multi_turn(
            conversations, args.turns, args.input_len, args.output_len, builder, args.seed, ignore_eos=ignore_eos
        )[:n]
    if not args.trace:
        raise ValueError("--workload trace needs --trace FILE")
    options: dict[str, Any] = {
        "limit": n,
        "offset": args.offset,
        "api": args.api,
        "ignore_eos": ignore_eos,
        "max_input_tokens": args.max_input,
        "max_output_tokens": args.max_output,
    }
    fmt = traces.detect_format(args.trace) if args.trace_format == "auto" else args.trace_format
    if fmt == "mooncake":
        options.update(scale=args.trace_scale, truncate_input_tokens=args.truncate_input)
    elif fmt == "azure":
        options.update(seed=args.seed, truncate_input_tokens=args.truncate_input)
    return traces.read_trace(args.trace, builder, fmt, **options)


def _load_config(args: argparse.Namespace, rate: float | None) -> Any:
    from pdgate.loadgen.runner import LoadConfig

    if args.arrivals != "trace" and not rate:
        raise ValueError(f"--arrivals {args.arrivals} needs --rate")
    return LoadConfig(
        arrivals=args.arrivals,
        rate=rate,
        burstiness=args.burstiness,
        speedup=args.speedup,
        max_concurrency=args.max_concurrency,
        duration_s=args.duration,
        timeout_s=args.timeout,
        seed=args.seed,
    )


def _meta(args: argparse.Namespace, target: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k not in ("run", "api_key")}
    return {"name": target.name, "target": target.name, "url": target.url, "config": config, **(extra or {})}


async def _run_one(target: Any, requests: Sequence[Any], load: Any, progress: Progress | None) -> tuple[list[Any], Any]:
    from pdgate.loadgen.runner import run_load

    task = progress.add_task(target.name, total=len(requests)) if progress else None
    results, overhead = await run_load(
        target, requests, load, on_result=(lambda _r: progress.advance(task)) if progress else None
    )  # type: ignore[arg-type]
    return results, overhead


def run_bench(args: argparse.Namespace) -> int:
    from pdgate.common.runtime import run_async
    from pdgate.loadgen.report import plot_cdfs, plot_timeseries, print_summary, write_run
    from pdgate.loadgen.slo import summarize

    console = Console()
    try:
        targets, slo, requests = _targets(args), _slo(args), build_workload(args)
        load = _load_config(args, args.rate)
    except (ValueError, OSError) as exc:
        console.print(f"[red]pdgate bench run: {exc}[/red]")
        return 2
    out = Path(args.out)
    runs, all_results = [], {}
    for target in targets:
        with _progress(console) as progress:
            started = time.time()
            results, overhead = run_async(_run_one(target, requests, load, progress))
        duration = args.duration or max((r.scheduled_s for r in results), default=0.0) + 1e-9
        stats = summarize(results, slo, duration_s=max(duration, 1e-6), warmup_s=args.warmup, cooldown_s=args.cooldown)
        meta = _meta(
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
    from pdgate.common.runtime import run_async
    from pdgate.loadgen.report import plot_attainment_vs_rate, print_summary, write_run
    from pdgate.loadgen.runner import run_load
    from pdgate.loadgen.slo import summarize
    from pdgate.loadgen.sweep import SweepConfig, sweep

    console = Console()
    try:
        targets, slo = _targets(args), _slo(args)
        pool = build_workload(
            args,
            max(args.num_requests, int(args.max_rate * args.point_duration) + 1) if args.workload == "trace" else None,
        )
        _load_config(args, 1.0)
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
        load = _load_config(args, rate)
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
                _meta(args, by_name[name], {"sweep": {name: curves[name]}, "best_rate": result.best_rate}),
                last_results[name],
                last_stats[name],
                stem=f"sweep_{name}",
            )
    print_summary(console, [(n, s) for n, s in last_stats.items()], target_pct=args.target_pct)
    if not args.no_plots:
        console.print(f"plot: {plot_attainment_vs_rate(curves, args.target_pct, out / 'attainment.png')}")
    return 0


def run_report(args: argparse.Namespace) -> int:
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
