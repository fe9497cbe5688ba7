"""From parsed ``pdgate bench`` arguments to what a run needs: targets, SLOs, workload, load.

Heavy modules are imported where used, so that ``pdgate --help`` stays quick.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def build_targets(args: argparse.Namespace) -> list[Any]:
    """The ``--target`` endpoints (``[NAME=]URL``); unnamed ones are ``target`` (or ``target0``, ...)."""
    from pdgate.loadgen.client import Target

    targets = []
    for i, spec in enumerate(args.target):
        name, _, url = spec.rpartition("=") if "=" in spec.split("://", 1)[0] else ("", "", spec)
        targets.append(
            Target(name or (f"target{i}" if len(args.target) > 1 else "target"), url, args.model, api_key=args.api_key)
        )
    return targets


def build_slo(args: argparse.Namespace) -> Any:
    """The SLOs of ``--slo``: a YAML/JSON file, or specs (``ttft=1,tpot=0.1`` when none is given)."""
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


def load_config(args: argparse.Namespace, rate: float | None) -> Any:
    """The runner's :class:`~loadgen.runner.LoadConfig` at ``rate``."""
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


def run_stats(args: argparse.Namespace, results: list[Any], slo: Any) -> Any:
    """A run's statistics over ``--duration`` (default: until the last scheduled send), less
    ``--warmup`` and ``--cooldown``."""
    from pdgate.loadgen.stats import summarize

    duration = args.duration or max((r.scheduled_s for r in results), default=0.0) + 1e-9
    return summarize(results, slo, duration_s=max(duration, 1e-6), warmup_s=args.warmup, cooldown_s=args.cooldown)


def run_meta(args: argparse.Namespace, target: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run file records of its configuration (everything but the API key)."""
    config = {k: v for k, v in vars(args).items() if k not in ("run", "api_key")}
    return {"name": target.name, "target": target.name, "url": target.url, "config": config, **(extra or {})}
