#!/usr/bin/env python3
"""What output-length accuracy is worth: SLO goodput with the true lengths, the length model,
prompt length only, and no prediction, on the same trace and fleet.

    python benchmarks/length_ablation.py [--answers Meta-Llama-3-8B-Instruct] [--requests 400]
        [--rates 8,12,16,20,24,28] [--slo ttft=1,tpot=0.012] [--train-rows N] [--seed 0] [--out results.json]

**Trace**: real prompts with real answer lengths: alpaca_eval's instructions (``../shared/data``)
answered by ``--answers`` (lengths in the builtin tokenizer's tokens), half of the prompts held
out (which half depends on ``--seed``); ``--requests`` of the held-out ones, shuffled, as chat requests with ``ignore_eos`` and
``max_tokens`` = the answer's length (so the simulated engine says exactly that much), Poisson
arrivals at each ``--rates`` rate, seed fixed.

**Fleet**: the 2P2D fleet of ``benchmarks/slo_goodput.py`` (H100 / Llama-3-8B sim engines) with
its default SLO-aware scheduling and admission, in virtual time (``pdgate simulate``); refits
off, so each arm keeps its predictor through the run.

**Arms** (``cost_model.length_source`` and the model the gateway loads):

* ``true lengths``: ``client``: ``ignore_eos`` with ``max_tokens`` tells the gateway each length;
* ``length model``: ``model`` (the client's settings unseen), the output-length model trained on
  the other half of the prompts (every alpaca_eval model's answers; ``--answers``' own under the
  fleet's served model name, as a gateway serving that model learns them from its traffic);
* ``prompt length``: ``model`` with the same model trained on prompt tokens and the answering
  model alone (text, cues and prompt digests stripped);
* ``none``: ``none``: no prediction, the scheduler's default length.

It prints, per arm and rate: SLO attainment, goodput (requests/s within SLO), 429s, TTFT and TPOT
p90; and per arm the goodput (the highest rate with >= 90 % attainment) against true lengths.
Figures are simulated time: they do not depend on the host's load. About 2 minutes per arm on
the project's 2-core box at the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from slo_goodput import MODEL, base_config, deep_merge, policy_config

from pdgate.common.tokenizer import load_tokenizer
from pdgate.gateway.config import GatewayConfig
from pdgate.loadgen.runner import LoadConfig
from pdgate.loadgen.slo import SloSpec
from pdgate.loadgen.stats import summarize
from pdgate.loadgen.types import BenchRequest
from pdgate.scheduler.costmodel.datasets import LabeledRequest, read_datasets, sample_rows, split_holdout
from pdgate.scheduler.costmodel.output_length import OutputLengthModel
from pdgate.scheduler.costmodel.store import ModelStore
from pdgate.simulate.run import run_simulation, simulation_config

ALPACA = REPO_ROOT.parent / "shared" / "data" / "alpaca_eval" / "results"
TARGET_PCT = 90.0
ARMS = {  # name: (cost_model.length_source, which trained model)
    "true lengths": ("client", "text"),
    "length model": ("model", "text"),
    "prompt length": ("model", "tokens"),
    "none": ("none", "text"),
}


def read_rows() -> list[LabeledRequest]:
    files = sorted(ALPACA.glob("*/model_outputs.json"))
    if not files:
        sys.exit(f"no alpaca_eval answers under {ALPACA} (../shared/data is needed)")
    return read_datasets([str(f) for f in files], load_tokenizer("builtin"))


def without_text(rows: Sequence[LabeledRequest]) -> list[LabeledRequest]:
    """The rows as a prompt-length-only predictor sees them (no words, cues or digest)."""
    return [replace(r, features=replace(r.features, text_hash={}, cues=(), prompt_digest=None)) for r in rows]


def as_served(rows: Sequence[LabeledRequest], answers: str) -> list[LabeledRequest]:
    """The rows with ``answers``' name replaced by the fleet's served model name: the gateway
    serving that model learns its verbosity from its own traffic under the name it serves it by.
    Without this the length model meets an unknown model and predicts every model's pooled
    lengths, which the gateway's online length scale then has to correct while the run goes on."""
    return [replace(r, features=replace(r.features, model=MODEL)) if r.features.model == answers else r for r in rows]


def trained_store(rows: Sequence[LabeledRequest], directory: Path) -> Path:
    model = OutputLengthModel().fit([r.features for r in rows], [r.output_tokens for r in rows])
    ModelStore(directory).save({"output_length": model}, {"n_train": len(rows), "model": model.describe()})
    return directory


def workload(rows: Sequence[LabeledRequest], answers: str, n: int, seed: int) -> list[BenchRequest]:
    mine = [r for r in rows if r.features.model == answers]
    if not mine:
        sys.exit(f"no held-out answers of {answers!r}")
    order = np.random.default_rng(seed).permutation(len(mine))[:n]
    out = []
    for index, i in enumerate(order.tolist()):
        row = mine[i]
        instruction = str(row.record["instruction"])
        out.append(
            BenchRequest(
                index,
                "chat",
                max_tokens=row.output_tokens,
                messages=({"role": "user", "content": instruction},),
                prompt_tokens=row.features.prompt_tokens,
                extra={"ignore_eos": True},
            )
        )
    return out


def config_for(source: str, model_dir: Path, slo: SloSpec) -> GatewayConfig:
    base = base_config([8101, 8102, 8103, 8104], [5601, 5602, 5603, 5604], 8000, 1.0)
    config = deep_merge(
        policy_config("slo-aware", base, slo.default, 1.0),
        {"cost_model": {"length_source": source, "refit_interval_s": 1e9}},
    )
    return simulation_config(GatewayConfig.model_validate(config), str(model_dir))


def probe(config: GatewayConfig, requests: Sequence[BenchRequest], rate: float, slo: SloSpec, seed: int) -> dict:
    load = LoadConfig(rate=rate, seed=seed, timeout_s=600.0)
    result = run_simulation(config, requests, load, seed=seed)
    span = max(r.scheduled_s for r in result.results)
    stats = summarize(result.results, slo, duration_s=max(span, 1e-6) + 1e-9)
    return {
        "rate": rate,
        "attainment_pct": round(100 * (stats.attainment or 0.0), 1),
        "goodput_rps": round(stats.goodput_rps, 2),
        "rejected": sum(1 for r in result.results if r.status == 429),
        "ttft_p90_ms": None if stats.ttft.p90 is None else round(1e3 * stats.ttft.p90, 1),
        "tpot_p90_ms": None if stats.tpot.p90 is None else round(1e3 * stats.tpot.p90, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--answers", default="Meta-Llama-3-8B-Instruct", help="the alpaca_eval model whose answers set the lengths"
    )
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rates", default="8,12,16,20,24,28", help="requests per second, comma-separated")
    ap.add_argument("--slo", default="ttft=1,tpot=0.012", help="as pdgate bench's --slo")
    ap.add_argument("--train-rows", type=int, help="train the predictors on a seeded sample of this many answers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write every figure as JSON here")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    slo = SloSpec.parse(args.slo)
    rows = read_rows()
    train, test = split_holdout(rows, 0.5, args.seed)
    train = as_served(sample_rows(train, args.train_rows, args.seed), args.answers)
    requests = workload(test, args.answers, args.requests, args.seed)
    lengths = np.array([r.max_tokens for r in requests])
    print(
        f"{len(requests)} held-out prompts answered by {args.answers}: output tokens median {np.median(lengths):.0f}, "
        f"p90 {np.percentile(lengths, 90):.0f}; predictors trained on {len(train)} answers to the other prompts",
        flush=True,
    )
    report: dict[str, Any] = {"answers": args.answers, "slo": args.slo, "requests": len(requests), "arms": {}}
    with tempfile.TemporaryDirectory(prefix="pdgate-length-ablation-") as tmp:
        stores = {
            "text": trained_store(train, Path(tmp) / "text"),
            "tokens": trained_store(without_text(train), Path(tmp) / "tokens"),
        }
        for arm, (source, which) in ARMS.items():
            config = config_for(source, stores[which], slo)
            probes = [probe(config, requests, rate, slo, args.seed) for rate in rates]
            met = [p["rate"] for p in probes if p["attainment_pct"] >= TARGET_PCT]
            report["arms"][arm] = {"probes": probes, "goodput_rps": max(met, default=0.0)}
            for p in probes:
                print(f"  {arm:14s} {p}", flush=True)
    truth = report["arms"]["true lengths"]["goodput_rps"] or float("nan")
    print(f"\n| arm | goodput (req/s, >= {TARGET_PCT:.0f} % within SLO) | vs true lengths | attainment % by rate |")
    print("|---|---:|---:|---|")
    for arm, figures in report["arms"].items():
        by_rate = " ".join(f"{p['rate']:g}:{p['attainment_pct']:g}" for p in figures["probes"])
        print(f"| {arm} | {figures['goodput_rps']:g} | {figures['goodput_rps'] / truth:.2f}x | {by_rate} |")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
