"""``pdgate simulate plan``: capacity planning with the simulator (its search: :mod:`pdgate.simulate.plan`).

* ``--rate R``: for each fleet family (PD, colocated, flexible with the role balancer), the fewest
  instances that serve R requests/s with ``--target-pct`` % of them within the SLOs, and every
  shape tried with its goodput per instance;
* ``--sweep-rate R1,R2,...``: the attainment and goodput of one fleet (the config, resized as
  ``--instances`` and the role counts say) at each rate: its goodput curve.

Each shape or rate is one simulation of the same workload (``--num-requests`` requests, Poisson
arrivals at the rate unless the workload is a trace with its own). Heavy modules are imported
where used, so that ``pdgate --help`` stays quick.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from pdgate.gateway.config import GatewayConfig
    from pdgate.gateway.instance_config import InstanceConfig
    from pdgate.loadgen.types import BenchRequest
    from pdgate.simulate.plan import Evaluation, PlanResult, Shape


def shape_config(base: GatewayConfig, shape: Shape) -> GatewayConfig:
    """``base`` with its fleet replaced by ``shape``: each role's instances copy the config's first
    instance of that role, or, when it has none, its first instance in that role."""
    from pdgate.gateway.config import GatewayConfig
    from pdgate.simulate.fleet import FIRST_PORT, copy_instance, scale_instances

    templates: list[InstanceConfig] = []
    for n, role in enumerate(shape.counts()):
        template = next((i for i in base.instances if i.role == role), None)
        if template is None:  # ports below the ones scale_instances gives
            template = copy_instance(base.instances[0], f"{role}-0", FIRST_PORT - 10 * (n + 1), role=role, serving=None)
        templates.append(template)
    instances = scale_instances(templates, counts=shape.counts())
    update: dict[str, Any] = {"instances": instances}
    if shape.flex:
        update["role_balancer"] = base.role_balancer.model_copy(update={"enabled": True})
    return GatewayConfig.model_validate(base.model_copy(update=update).model_dump())


def evaluate_at(
    args: argparse.Namespace, requests: Sequence[BenchRequest], rate: float, config: GatewayConfig
) -> Evaluation:
    """One simulation of ``config`` at ``rate``, judged as ``pdgate bench`` judges a run."""
    from pdgate.loadgen.options import build_slo, load_config, run_stats
    from pdgate.simulate.commands import simulate_as_asked
    from pdgate.simulate.fleet import role_counts
    from pdgate.simulate.plan import Evaluation, Shape

    result = simulate_as_asked(args, config, requests, load_config(args, rate))
    stats = run_stats(args, result.results, build_slo(args))
    counts = role_counts(config.instances)
    shape = Shape(*(counts.get(role, 0) for role in ("prefill", "decode", "both", "flex")))
    return Evaluation(shape, rate, stats.attainment or 0.0, stats.goodput_rps, stats.failed)


def run_plan(args: argparse.Namespace) -> int:
    """``pdgate simulate plan``; exit 0 when a fleet meets the target (a sweep: always), 1 when
    none does, 2 for bad arguments."""
    from pydantic import ValidationError

    from pdgate.gateway.config import ConfigError
    from pdgate.loadgen.options import build_slo, build_workload
    from pdgate.simulate.commands import fleet_config

    console = Console()
    try:
        base = fleet_config(args)
        if args.model is None:
            args.model = base.models[0].name
        slo, requests = build_slo(args), build_workload(args)
        rates = [float(r) for r in args.sweep_rate.split(",")] if args.sweep_rate else []
        if not rates and not args.rate:
            raise ValueError("give --rate R (the smallest fleets for R) or --sweep-rate R1,R2,... (one fleet's curve)")
        if any(r <= 0 for r in rates):
            raise ValueError("--sweep-rate: every rate must be positive")
        families = [f.strip() for f in args.families.split(",") if f.strip()]
    except (ConfigError, ValidationError, ValueError, OSError) as exc:
        console.print(f"[red]pdgate simulate plan: {exc}[/red]")
        return 2
    console.print(f"goal: {args.target_pct:g} % of requests within {slo.describe()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if rates:
        return _sweep(args, console, base, requests, rates, out)
    return _smallest(args, console, base, requests, families, out)


def _smallest(
    args: argparse.Namespace,
    console: Console,
    base: GatewayConfig,
    requests: Sequence[BenchRequest],
    families: list[str],
    out: Path,
) -> int:
    from pdgate.simulate.plan import smallest_fleets

    def evaluate(shape: Shape) -> Evaluation:
        evaluation = evaluate_at(args, requests, args.rate, shape_config(base, shape))
        mark = "meets" if evaluation.meets(args.target_pct) else "misses"
        console.print(f"  {shape.label:>10}  attainment {100 * evaluation.attainment:5.1f} %  {mark}")
        return evaluation

    try:
        plan = smallest_fleets(
            evaluate, rate=args.rate, target_pct=args.target_pct, max_instances=args.max_instances, families=families
        )
    except ValueError as exc:
        console.print(f"[red]pdgate simulate plan: {exc}[/red]")
        return 2
    console.print(plan_table(plan))
    best = plan.best
    if best is None:
        console.print(f"no fleet of up to {args.max_instances} instances meets the goal at {args.rate:g} req/s")
    else:
        console.print(f"smallest fleet: {best.shape.label} ({best.shape.total} instances)")
    path = out / "plan.json"
    path.write_text(json.dumps(plan_json(plan), indent=1))
    console.print(f"plan: {path}")
    return 0 if best is not None else 1


def _sweep(
    args: argparse.Namespace,
    console: Console,
    base: GatewayConfig,
    requests: Sequence[BenchRequest],
    rates: list[float],
    out: Path,
) -> int:
    from pdgate.loadgen.plots import plot_attainment_vs_rate
    from pdgate.loadgen.stats import max_rate_meeting

    found = []
    for rate in rates:
        evaluation = evaluate_at(args, requests, rate, base)
        found.append(evaluation)
        console.print(
            f"  {rate:8.2f} req/s  attainment {100 * evaluation.attainment:5.1f} %  goodput {evaluation.goodput_rps:.2f} req/s"
        )
    label = found[0].shape.label
    points = [(e.rate, e.attainment) for e in found]
    best = max_rate_meeting(points, args.target_pct / 100)
    console.print(f"{label}: highest rate meeting the goal: {best if best is not None else 'none'} req/s")
    (out / "sweep.json").write_text(
        json.dumps(
            {"shape": label, "target_pct": args.target_pct, "points": [_evaluation_json(e) for e in found]}, indent=1
        )
    )
    if not args.no_plots:
        console.print(f"plot: {plot_attainment_vs_rate({label: points}, args.target_pct, out / 'attainment.png')}")
    return 0


def plan_table(plan: PlanResult) -> Table:
    table = Table(title=f"fleets at {plan.rate:g} req/s (goal {plan.target_pct:g} % within SLO)")
    for column in ("family", "fleet", "instances", "attainment", "goodput req/s", "per instance", ""):
        table.add_column(column, justify="right" if column not in ("family", "fleet", "") else "left")
    smallest = {id(e) for e in plan.smallest.values() if e is not None}
    for e in sorted(plan.evaluations, key=lambda e: (e.shape.family, e.shape.total, e.shape)):
        table.add_row(
            e.shape.family,
            e.shape.label,
            str(e.shape.total),
            f"{100 * e.attainment:.1f} %",
            f"{e.goodput_rps:.2f}",
            f"{e.goodput_per_instance:.2f}",
            "smallest" if id(e) in smallest else "",
        )
    return table


def _evaluation_json(e: Evaluation) -> dict[str, Any]:
    return {
        "shape": e.shape.label,
        "family": e.shape.family,
        "instances": e.shape.total,
        "counts": e.shape.counts(),
        "rate": e.rate,
        "attainment": e.attainment,
        "goodput_rps": e.goodput_rps,
        "goodput_per_instance": e.goodput_per_instance,
        "failed": e.failed,
    }


def plan_json(plan: PlanResult) -> dict[str, Any]:
    return {
        "rate": plan.rate,
        "target_pct": plan.target_pct,
        "smallest": {f: (e.shape.label if e is not None else None) for f, e in plan.smallest.items()},
        "best": plan.best.shape.label if plan.best is not None else None,
        "evaluations": [_evaluation_json(e) for e in plan.evaluations],
    }
