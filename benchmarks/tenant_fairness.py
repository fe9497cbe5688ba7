#!/usr/bin/env python3
"""Fair share between tenants: does a tenant sending ten times its share push a calm one past its SLO?

    python benchmarks/tenant_fairness.py [--calm-rate 15] [--flood-factor 10] [--duration 20]
        [--slo ttft=1,tpot=0.05] [--seed 0] [--out results.json]

**Fleet**: the 2P2D fleet of ``benchmarks/slo_goodput.py`` (H100 / Llama-3-8B simulated engines,
SLO-aware scheduling and admission), in virtual time (``pdgate simulate``): the gateway's own code
on a virtual clock, so the figures do not depend on the host's load.

**Tenants**: ``calm`` and ``flood``, equal weights, named by the ``x-pdgate-tenant`` header.
``calm`` sends ``--calm-rate`` requests/s (Poisson), ``flood`` ``--flood-factor`` times as many;
every request is a 1024-token prompt and 128 output tokens (``ignore_eos``), and both tenants
have the same SLO (``--slo``). At the defaults the two together ask for several times what the
fleet can serve within the SLO, while calm alone asks for well under half of it.

**Arms**: ``calm alone``; ``both, fair share`` (``tenants.fair_share: true``, the default);
``both, deadline order`` (``tenants.fair_share: false``: one queue in deadline order, tenants
ignored). It prints each arm's SLO attainment per tenant (a 429 is a miss), requests served and
refused, and calm's attainment against running alone. About 10 s of CPU per arm at the defaults.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from slo_goodput import base_config, deep_merge, policy_config

from pdgate.common.tokenizer import load_tokenizer
from pdgate.gateway.config import GatewayConfig
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.runner import LoadConfig
from pdgate.loadgen.slo import Slo, SloSpec, meets
from pdgate.loadgen.types import BenchRequest, RequestResult
from pdgate.loadgen.workloads import synthetic
from pdgate.simulate.run import run_simulation, simulation_config

TENANT_HEADER = "x-pdgate-tenant"
PROMPT_TOKENS, OUTPUT_TOKENS = 1024, 128


def tenant_requests(tenant: str, rate: float, duration_s: float, seed: int) -> list[BenchRequest]:
    """Poisson arrivals of ``tenant`` at ``rate`` over ``duration_s`` (simulated seconds)."""
    rng = random.Random(f"{tenant}:{seed}")
    times, t = [], rng.expovariate(rate)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    builder = PromptBuilder(load_tokenizer("builtin"), seed=seed)
    built = synthetic(len(times), PROMPT_TOKENS, OUTPUT_TOKENS, builder, seed=hash(tenant) % 1000 + seed, api="chat")
    return [replace(r, arrival_s=at, slo_class=tenant, headers={TENANT_HEADER: tenant}) for r, at in zip(built, times)]


def merged(*streams: list[BenchRequest]) -> list[BenchRequest]:
    ordered = sorted((r for s in streams for r in s), key=lambda r: r.arrival_s or 0.0)
    return [replace(r, index=i) for i, r in enumerate(ordered)]


def config_for(slo: Slo, fair_share: bool) -> GatewayConfig:
    base = base_config([8101, 8102, 8103, 8104], [5601, 5602, 5603, 5604], 8000, 1.0)
    tenants = {
        "identify_by": ["header"],
        "fair_share": fair_share,
        "tenants": [{"name": "calm"}, {"name": "flood"}],
    }
    config = deep_merge(policy_config("slo-aware", base, slo, 1.0), {"tenants": tenants})
    return simulation_config(GatewayConfig.model_validate(config))


def attainment(results: Sequence[RequestResult], tenant: str, slo: Slo) -> dict[str, Any]:
    mine = [r for r in results if r.slo_class == tenant]
    met = sum(1 for r in mine if meets(r, slo))
    return {
        "requests": len(mine),
        "served": sum(1 for r in mine if r.ok),
        "refused_429": sum(1 for r in mine if r.status == 429),
        "attainment_pct": round(100.0 * met / len(mine), 1) if mine else None,
    }


def run_arm(name: str, requests: list[BenchRequest], slo: Slo, fair_share: bool, seed: int) -> dict[str, Any]:
    result = run_simulation(config_for(slo, fair_share), requests, LoadConfig(arrivals="trace", seed=seed), seed=seed)
    tenants = sorted({r.slo_class for r in requests})
    return {"arm": name, **{t: attainment(result.results, t, slo) for t in tenants}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calm-rate", type=float, default=15.0, help="calm's requests/s (simulated)")
    parser.add_argument("--flood-factor", type=float, default=10.0, help="flood sends this many times calm's rate")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals (simulated)")
    parser.add_argument("--slo", default="ttft=1,tpot=0.05", help="both tenants' SLO")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    slo = SloSpec.parse(args.slo).default
    calm = tenant_requests("calm", args.calm_rate, args.duration, args.seed)
    flood = tenant_requests("flood", args.calm_rate * args.flood_factor, args.duration, args.seed)
    arms = [
        run_arm("calm alone", merged(calm), slo, True, args.seed),
        run_arm("both, fair share", merged(calm, flood), slo, True, args.seed),
        run_arm("both, deadline order", merged(calm, flood), slo, False, args.seed),
    ]
    alone = arms[0]["calm"]["attainment_pct"] or 0.0
    print(
        f"calm {args.calm_rate:g} req/s, flood {args.calm_rate * args.flood_factor:g} req/s, "
        f"{args.duration:g} s, SLO {slo.describe()}, prompts {PROMPT_TOKENS} / output {OUTPUT_TOKENS} tokens"
    )
    print(f"{'arm':<24}{'calm %':>8}{'calm 429':>10}{'flood %':>9}{'flood 429':>11}{'calm vs alone':>15}")
    for arm in arms:
        c, f = arm["calm"], arm.get("flood")
        arm["calm_vs_alone_points"] = round((c["attainment_pct"] or 0.0) - alone, 1)
        print(
            f"{arm['arm']:<24}{c['attainment_pct']:>8}{c['refused_429']:>10}"
            f"{(f['attainment_pct'] if f else '-'):>9}{(f['refused_429'] if f else '-'):>11}"
            f"{arm['calm_vs_alone_points']:>+15.1f}"
        )
    if args.out is not None:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "arms": arms}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
