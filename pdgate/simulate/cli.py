"""``pdgate simulate``: the gateway's own code over a simulated fleet on a virtual clock.

One run takes the workload, arrival and SLO options of ``pdgate bench run``, spelled the same,
and the fleet config of ``pdgate serve``/``up`` (default: configs/default.yaml). No sockets, no
HTTP and no sleeping: the gateway, its engines and the load generator share one process whose
clock jumps to the next event, so minutes of traffic over tens of instances take seconds. The
report is ``pdgate bench``'s (JSON, CSV, tables, plots) plus the fleet's series (load, queue,
KV usage and role per instance, migrations).
"""

from __future__ import annotations

import argparse

from pdgate.loadgen.cli import add_workload_args
from pdgate.simulate.commands import run_simulate
from pdgate.simulate.plan_command import __doc__ as PLAN_DESCRIPTION
from pdgate.simulate.plan_command import run_plan

SIMULATE_DESCRIPTION = __doc__


def add_simulate_commands(commands: argparse._SubParsersAction) -> None:
    sim = commands.add_parser(
        "simulate",
        help="the gateway over a simulated fleet in virtual time (policy evaluation, capacity planning)",
        description=SIMULATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_args(sim)
    sim.add_argument("--rate", type=float, help="requests/s (poisson, gamma, constant)")
    add_workload_args(sim)
    sim.set_defaults(run=run_simulate, out="results/simulate")
    sub = sim.add_subparsers(dest="simulate_command", metavar="COMMAND", required=False)
    plan = sub.add_parser(
        "plan",
        help="the smallest fleet per shape for a rate, or one fleet's goodput curve",
        description=PLAN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_args(plan)
    plan.add_argument("--rate", type=float, help="requests/s the fleet must serve within the SLOs")
    plan.add_argument("--sweep-rate", metavar="R1,R2,...", help="instead: the given fleet at each of these rates")
    plan.add_argument("--target-pct", type=float, default=90.0, help="%% of requests that must meet their SLOs")
    plan.add_argument("--max-instances", type=int, default=64, help="the largest fleet tried")
    plan.add_argument("--families", default="pd,colocated,flex", help="fleet shapes searched: pd, colocated, flex")
    add_workload_args(plan)
    plan.set_defaults(run=run_plan, out="results/simulate-plan")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The fleet and how a simulation runs (both ``simulate`` and ``simulate plan``)."""
    add_fleet_args(p)
    p.add_argument("--model", help="the model to request (default: the config's first)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (simulated)")
    p.add_argument(
        "--sample-interval", type=float, default=1.0, help="simulated seconds between two samples of the fleet"
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        metavar="N",
        help="every engine streams N tokens together (vLLM's --stream-interval): a faster run; TTFT, TPOT and "
        "E2E stay exact, inter-token gaps are N tokens wide (default: the engines' own, 1)",
    )
    p.add_argument(
        "--hop-ms",
        type=float,
        default=0.0,
        help="virtual ms every request between two parts takes (HTTP and parsing on real hosts; default 0)",
    )
    p.add_argument(
        "--gateway-ms-per-kib",
        type=float,
        default=0.0,
        help="virtual ms the gateway takes per KiB of a request body (tokenizing and hashing the prompt; default 0)",
    )


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    f = p.add_argument_group("fleet")
    f.add_argument("--config", metavar="FILE", help="fleet and gateway YAML (default: configs/default.yaml)")
    f.add_argument("--instances", type=int, metavar="N", help="resize the fleet to N, keeping its roles' proportions")
    for role, flag in (("prefill", "--prefill"), ("decode", "--decode"), ("both", "--colocated"), ("flex", "--flex")):
        f.add_argument(flag, type=int, metavar="N", dest=f"count_{role}", help=f"exactly N {role} instances")
    f.add_argument("--cost-model-dir", help="start from the cost model saved here (default: the priors)")
