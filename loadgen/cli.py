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

from pdgate.loadgen.commands import run_bench, run_report, run_sweep

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
    _target(t)
    add_workload_args(p)


def _target(t: argparse._ArgumentGroup) -> None:
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


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The workload, load and SLO options (``pdgate simulate`` takes them too, spelled the same)."""
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
