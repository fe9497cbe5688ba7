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

SIMULATE_DESCRIPTION = __doc__


def add_simulate_commands(commands: argparse._SubParsersAction) -> None:
    sim = commands.add_parser(
        "simulate",
        help="the gateway over a simulated fleet in virtual time (policy evaluation, capacity planning)",
        description=SIMULATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_fleet_args(sim)
    sim.add_argument("--rate", type=float, help="requests/s (poisson, gamma, constant)")
    sim.add_argument("--model", help="the model to request (default: the config's first)")
    sim.add_argument("--timeout", type=float, default=600.0, help="seconds per request (simulated)")
    sim.add_argument(
        "--sample-interval", type=float, default=1.0, help="simulated seconds between two samples of the fleet"
    )
    add_workload_args(sim)
    sim.set_defaults(run=run_simulate, out="results/simulate")


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    f = p.add_argument_group("fleet")
    f.add_argument("--config", metavar="FILE", help="fleet and gateway YAML (default: configs/default.yaml)")
    f.add_argument("--instances", type=int, metavar="N", help="resize the fleet to N, keeping its roles' proportions")
    for role, flag in (("prefill", "--prefill"), ("decode", "--decode"), ("both", "--colocated"), ("flex", "--flex")):
        f.add_argument(flag, type=int, metavar="N", dest=f"count_{role}", help=f"exactly N {role} instances")
    f.add_argument("--cost-model-dir", help="start from the cost model saved here (default: the priors)")
