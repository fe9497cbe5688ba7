#!/usr/bin/env python3
"""How right the latency models are under load: predicted against actual prefill, hand-off,
TTFT and TPOT, per instance group, at several loads and prompt lengths, on the simulated engine.

    python benchmarks/latency_check.py [--rates 2,8,16,24] [--prompts 256,1024,4096]
        [--output 128] [--requests 200] [--refits] [--seed 0] [--out results.json]

For every prompt length and rate: ``--requests`` requests of that prompt length (lognormal,
sigma 0.2) and ``--output`` output tokens (``ignore_eos``), Poisson arrivals, through the
default 2P2D fleet (configs/default.yaml: H100 / Llama-3-8B sim engines, SLO-aware scheduling)
in virtual time (``pdgate simulate``), the gateway logging every completed request with what it
predicted at placement. The cost model starts from its priors (fitted to the engine's profile)
and, with ``--refits``, refits online every 10 simulated seconds.

Per point and group it prints the mean absolute percentage error (MAPE) and the median of
actual / predicted for:

* ``prefill``: the prefill leg's time (send to answer) against the predicted queue wait plus
  the idle prefill time (prefill instances' group);
* ``handoff``: decode leg sent to first token, against the predicted KV transfer plus first
  step (decode group);
* ``ttft``: against the predicted TTFT (admission queue + wait + prefill + hand-off);
* ``tpot``: against the predicted TPOT of the decode batch it joined (decode group).

Simulated time: the figures do not depend on the host's load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pdgate.common.tokenizer import load_tokenizer
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.launcher import default_config_path
from pdgate.loadgen import workloads
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.runner import LoadConfig
from pdgate.simulate.run import run_simulation, simulation_config

# quantity: (actual timing key, predicted keys summed, the placement group it belongs to)
QUANTITIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "prefill": ("prefill_s", ("wait_s", "prefill_s"), "prefill_group"),
    "handoff": ("handoff_s", ("handoff_s",), "decode_group"),
    "ttft": ("ttft_s", ("ttft_s",), "prefill_group"),
    "tpot": ("tpot_s", ("tpot_s",), "decode_group"),
}


def config(log_dir: Path, refits: bool) -> GatewayConfig:
    base = simulation_config(GatewayConfig.load(str(default_config_path())), str(log_dir))
    cost_model = base.cost_model.model_copy(
        update={"log_requests": True, "refit_interval_s": 10.0 if refits else 1e9, "min_new_samples": 20}
    )
    return base.model_copy(update={"cost_model": cost_model})


def errors(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per quantity and group: MAPE (%), median actual/predicted and the count."""
    pairs: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for record in records:
        timing, predicted, placement = (
            record.get("timing") or {},
            record.get("predicted") or {},
            record.get("placement") or {},
        )
        for name, (actual_key, predicted_keys, group_key) in QUANTITIES.items():
            actual = timing.get(actual_key)
            guesses = [predicted.get(k) for k in predicted_keys]
            group = placement.get(group_key)
            if actual is None or group is None or any(g is None for g in guesses):
                continue
            guess = float(sum(guesses))
            if guess > 0 and actual > 0:
                pairs[(name, str(group))].append((float(actual), guess))
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (name, group), values in sorted(pairs.items()):
        actual, guess = np.array(values).T
        out[name][group] = {
            "mape_pct": round(float(100 * np.mean(np.abs(guess - actual) / actual)), 1),
            "median_ratio": round(float(np.median(actual / guess)), 3),
            "n": len(values),
        }
    return out


def point(prompt: int, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    builder = PromptBuilder(load_tokenizer("builtin"), seed=args.seed)
    requests = workloads.synthetic(
        args.requests,
        f"lognormal:{prompt}:0.2:{4 * prompt}",
        f"fixed:{args.output}",
        builder,
        args.seed,
        "completions",
        ignore_eos=True,
    )
    with tempfile.TemporaryDirectory(prefix="pdgate-latency-check-") as tmp:
        result = run_simulation(
            config(Path(tmp), args.refits),
            requests,
            LoadConfig(rate=rate, seed=args.seed, timeout_s=600.0),
            seed=args.seed,
        )
        log = Path(tmp) / "requests.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    ok = sum(1 for r in result.results if r.ok)
    return {"prompt_tokens": prompt, "rate": rate, "ok": ok, "records": len(records), "errors": errors(records)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="2,8,16,24")
    ap.add_argument("--prompts", default="256,1024,4096", help="median prompt tokens, comma-separated")
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--refits", action="store_true", help="refit online every 10 simulated seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    points = []
    print("| prompt | rate | quantity | group | MAPE % | median actual/predicted | n |")
    print("|---:|---:|---|---|---:|---:|---:|")
    for prompt in [int(p) for p in args.prompts.split(",")]:
        for rate in [float(r) for r in args.rates.split(",")]:
            figures = point(prompt, rate, args)
            points.append(figures)
            for name, groups in figures["errors"].items():
                for group, e in groups.items():
                    print(
                        f"| {prompt} | {rate:g} | {name} | {group} | {e['mape_pct']} | {e['median_ratio']} | {e['n']} |",
                        flush=True,
                    )
    if args.out is not None:
        args.out.write_text(json.dumps({"refits": args.refits, "output": args.output, "points": points}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
