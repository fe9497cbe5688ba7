"""``pdgate cost-model train | evaluate``: fit the learned cost model and score it on held-out data.

* ``train``: reads every ``--data`` file (gateway request logs, generic JSONL, alpaca JSON; see
  :mod:`scheduler.costmodel.datasets`), holds out ``--holdout`` of the distinct prompts (every
  answer to a prompt on one side), fits the output-length model and two baselines (global mean;
  prompt length only) on the rest and scores all three on the held-out prompts. The saved model
  is the one trained on the training split only (the figures describe exactly what is saved).
  When the rows carry gateway timing, the latency component is fitted on the training split too.
  A new version is written to ``--out`` (a :class:`~scheduler.costmodel.store.ModelStore`) and
  becomes current. Prints a JSON summary on stdout; progress goes to stderr.
* ``evaluate`` (:mod:`scheduler.costmodel.cli_evaluate`): scores the current version of
  ``--model`` (and the baselines saved with it) on the ``--data`` files, and/or cross-validates
  and replays them (the protocols that do not flatter a model); prints JSON.

Exit status 2, with a one-line message, for a missing or unreadable file, an unknown format, a
malformed row, no usable rows, or a model directory without a model.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from pdgate.scheduler.costmodel.cli_common import (
    UsageError,
    latency_metrics,
    length_metrics,
    progress,
    read_rows,
    run_reporting,
    timing_records,
    tokenizer_flags,
)
from pdgate.scheduler.costmodel.cli_evaluate import add_evaluate_command

DESCRIPTION = __doc__

EPILOG = """\
examples:
  pdgate cost-model train --data logs/requests-*.jsonl --out models/cost
  pdgate cost-model train --data alpaca_eval/results/*/model_outputs.json --out models/alpaca --holdout 0.2
  pdgate cost-model evaluate --model models/cost --data logs/requests-today.jsonl
"""


def add_cost_model_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``cost-model train`` and ``cost-model evaluate`` on ``pdgate``'s subcommands."""
    parser = commands.add_parser(
        "cost-model",
        help="train and evaluate the learned cost model",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cost_model_command", metavar="COMMAND", required=True)
    train = sub.add_parser("train", help="fit on data files, score on a held-out split, save a new version")
    train.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="FILE",
        help="gateway request logs (JSONL), generic JSONL or alpaca JSON files",
    )
    train.add_argument("--out", required=True, metavar="DIR", help="model store directory (created if missing)")
    tokenizer_flags(train)
    train.add_argument("--holdout", type=float, default=0.2, help="fraction of distinct prompts held out (0-0.9)")
    train.add_argument("--seed", type=int, default=0, help="seed of the held-out split and subsampling")
    train.add_argument("--q-high", type=float, default=0.9, help="the high quantile predicted besides the median")
    train.add_argument(
        "--max-train-rows", type=int, metavar="N", help="fit on a seeded random sample of at most N training rows"
    )
    train.add_argument("--keep", type=int, default=5, help="model versions kept in --out")
    train.set_defaults(run=run_train)
    add_evaluate_command(sub)


def run_train(args: argparse.Namespace) -> int:
    return run_reporting("train", _train, args)


# --- train ------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> dict[str, Any]:

    from pdgate.scheduler.costmodel.datasets import sample_rows, split_holdout
    from pdgate.scheduler.costmodel.output_length import (
        GlobalMeanBaseline,
        OutputLengthModel,
        PromptLengthBaseline,
    )
    from pdgate.scheduler.costmodel.store import ModelStore

    if not 0 <= args.holdout <= 0.9:
        raise UsageError("--holdout must be between 0 and 0.9")
    if not 0.5 < args.q_high < 1:
        raise UsageError("--q-high must be between 0.5 and 1")
    if args.keep < 1 or (args.max_train_rows is not None and args.max_train_rows < 1):
        raise UsageError("--keep and --max-train-rows must be positive")
    started = time.monotonic()
    rows = read_rows(args)
    train, test = split_holdout(rows, args.holdout, args.seed)
    n_train_available = len(train)
    train = sample_rows(train, args.max_train_rows, args.seed)
    if not train:
        raise UsageError("no training rows left after the held-out split")
    progress(
        f"{len(rows)} rows from {len(args.data)} file(s): training on {len(train)}, holding out {len(test)} "
        f"({args.holdout:g} of the prompts)"
    )
    features, outputs = [r.features for r in train], [r.output_tokens for r in train]
    read_s = time.monotonic() - started
    model = OutputLengthModel(args.q_high, seed=args.seed).fit(features, outputs)
    baselines = {
        "global_mean": GlobalMeanBaseline(args.q_high).fit(features, outputs),
        "prompt_length": PromptLengthBaseline(args.q_high).fit(features, outputs),
    }
    fit_s = time.monotonic() - started - read_s
    components: dict[str, Any] = {
        "output_length": model,
        "baseline_global_mean": baselines["global_mean"],
        "baseline_prompt_length": baselines["prompt_length"],
    }
    output_metrics = length_metrics(model, baselines, test) if test else None
    latency_figures = None
    latency = _fit_latency(timing_records(train))
    if latency is not None:
        components["latency"] = latency
        latency_figures = latency_metrics(latency, timing_records(test))
    meta = {
        "source_files": [str(Path(p).resolve()) for p in args.data],
        "tokenizer": args.tokenizer,
        "n_rows": len(rows),
        "n_train": len(train),
        "n_train_available": n_train_available,
        "n_test": len(test),
        "holdout": args.holdout,
        "seed": args.seed,
        "q_high": args.q_high,
        "trained_on": "train split only (the held-out prompts are not in the saved model)",
        "output_length_model": model.describe(),
        "metrics": {"output_length": output_metrics, "latency": latency_figures},
        "components": sorted(components),
    }
    try:
        directory = ModelStore(args.out, keep=args.keep).save(components, _json_safe(meta))
    except OSError as exc:
        raise UsageError(f"cannot write the model to {args.out}: {exc}") from None
    return {
        "version_dir": directory,
        "model_version": Path(directory).name,
        "n_train": len(train),
        "n_test": len(test),
        "n_files": len(args.data),
        "output_length": output_metrics,
        "latency": latency_figures,
        "components": sorted(components),
        "output_length_model": model.describe(),
        "seconds": {"read": read_s, "fit": fit_s, "total": time.monotonic() - started},
    }


def _fit_latency(records: list[dict[str, Any]]) -> Any:
    """The latency component fitted on gateway timing records, or ``None`` (no records, or no
    latency model in this install)."""
    if not records:
        return None
    try:
        from pdgate.scheduler.costmodel.latency import LatencyModel
    except ImportError:
        progress("timing records found but scheduler.costmodel.latency is not available: no latency model")
        return None
    return LatencyModel.fit_records(records)


def _json_safe(value: Any) -> Any:
    """Non-finite floats to ``None`` (strict JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
