"""``pdgate cost-model train | evaluate``: fit the learned cost model and score it on held-out data.

* ``train``: reads every ``--data`` file (gateway request logs, generic JSONL, alpaca JSON; see
  :mod:`scheduler.costmodel.datasets`), holds out ``--holdout`` of the distinct prompts (every
  answer to a prompt on one side), fits the output-length model and two baselines (global mean;
  prompt length only) on the rest and scores all three on the held-out prompts. The saved model
  is the one trained on the training split only (the figures describe exactly what is saved).
  When the rows carry gateway timing, the latency component is fitted on the training split too.
  A new version is written to ``--out`` (a :class:`~scheduler.costmodel.store.ModelStore`) and
  becomes current. Prints a JSON summary on stdout; progress goes to stderr.
* ``evaluate``: scores the current version of ``--model`` (and the baselines saved with it) on
  every row of the ``--data`` files; prints JSON. Evaluate on data the model was not trained on.

Exit status 2, with a one-line message, for a missing or unreadable file, an unknown format, a
malformed row, no usable rows, or a model directory without a model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DESCRIPTION = __doc__

EPILOG = """\
examples:
  pdgate cost-model train --data logs/requests-*.jsonl --out models/cost
  pdgate cost-model train --data alpaca_eval/results/*/model_outputs.json --out models/alpaca --holdout 0.2
  pdgate cost-model evaluate --model models/cost --data logs/requests-today.jsonl
"""


EVALUATE_DESCRIPTION = """\
Figures for output-length prediction, and which question each answers:

* pooled Spearman/Kendall/MAE/within-2x/coverage: over all rows together. Mixes *which model
  answered* (known when serving) with *how long this prompt's answer is*; flatters on data with
  many models.
* within_model.mean_spearman: Spearman per answering model, averaged (each model once). How well
  requests to one served model are ranked: what scheduling by predicted length needs.
* within_model.coverage_min/max: the spread of the high quantile's coverage over models.
* --model DIR: the saved model on --data; evaluate on rows it was not trained on.
* --cross-validate prompts: new prompts, known models (K folds of distinct prompts).
* --cross-validate models: a new answering model on prompts others answered (K folds of models).
* --cross-validate both: new prompts from a new model (only the diagonal folds are predicted).
* --prequential: the deployment's view: requests in order, each predicted before it is learned,
  a refit every --refit-every requests on --base plus what was seen; figures per --window. With
  several models answering the same prompts, a prompt comes back and what was learned of its
  earlier answers counts; --distinct-prompts replays one answer per prompt (new traffic only).
  Between refits each answering model's length scale learns online, as in the gateway
  (--no-calibration: without it). --where / --base-where pick rows by a record field, e.g. to
  train on some of a benchmark's prompt sources and replay another.

Every split also scores the two baselines (global mean; prompt length only), fitted the same way.
Prints JSON.
"""


class _UsageError(Exception):
    """A problem with the inputs, reported as one line and exit status 2."""


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
    _tokenizer_flags(train)
    train.add_argument("--holdout", type=float, default=0.2, help="fraction of distinct prompts held out (0-0.9)")
    train.add_argument("--seed", type=int, default=0, help="seed of the held-out split and subsampling")
    train.add_argument("--q-high", type=float, default=0.9, help="the high quantile predicted besides the median")
    train.add_argument(
        "--max-train-rows", type=int, metavar="N", help="fit on a seeded random sample of at most N training rows"
    )
    train.add_argument("--keep", type=int, default=5, help="model versions kept in --out")
    train.set_defaults(run=run_train)
    evaluate = sub.add_parser(
        "evaluate",
        help="score a saved model on data files, and/or cross-validate and replay the data online",
        description=EVALUATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--model", metavar="DIR", help="model store directory: score its current version")
    evaluate.add_argument("--data", nargs="+", required=True, metavar="FILE")
    _tokenizer_flags(evaluate)
    evaluate.add_argument(
        "--cross-validate",
        nargs="+",
        choices=["prompts", "models", "both"],
        default=[],
        metavar="SPLIT",
        help="out-of-fold evaluation leaving out prompts, answering models, or both",
    )
    evaluate.add_argument("--folds", type=int, default=5, help="folds of --cross-validate (default 5)")
    evaluate.add_argument(
        "--prequential", action="store_true", help="replay --data in order: predict each request, then learn it"
    )
    evaluate.add_argument(
        "--base", nargs="+", default=[], metavar="FILE", help="data trained on before the replay (and kept in refits)"
    )
    evaluate.add_argument("--refit-every", type=int, default=200, help="requests between refits of the replay")
    evaluate.add_argument("--window", type=int, default=500, help="requests per reported window of the replay")
    evaluate.add_argument(
        "--order",
        choices=["shuffled", "file"],
        default="shuffled",
        help="replay order: a seeded shuffle (mixed traffic) or the files' order",
    )
    evaluate.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="replay one answer per prompt, so that no prompt comes back (new traffic only)",
    )
    evaluate.add_argument(
        "--no-calibration",
        action="store_true",
        help="replay without the gateway's online length scale per answering model between refits",
    )
    evaluate.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="keep the --data rows whose FIELD (a record field, e.g. dataset or generator) is one of the values",
    )
    evaluate.add_argument(
        "--base-where", action="append", default=[], metavar="FIELD=V1,V2", help="the same for --base rows"
    )
    evaluate.add_argument(
        "--max-rows", type=int, metavar="N", help="use a seeded random sample of at most N rows of --data"
    )
    evaluate.add_argument("--min-model-rows", type=int, default=10, help="fewest rows for a model's own Spearman")
    evaluate.add_argument("--q-high", type=float, default=0.9, help="the high quantile of models fitted here")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(run=run_evaluate)


def _tokenizer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer",
        default="builtin",
        help="'builtin' (the sim's) or a local Hugging Face tokenizer directory (counts text tokens)",
    )
    parser.add_argument(
        "--endpoint",
        choices=["chat", "completion"],
        default="chat",
        help="how alpaca-style rows are sent (default chat: one user message)",
    )


def run_train(args: argparse.Namespace) -> int:
    try:
        summary = _train(args)
    except _UsageError as exc:
        print(f"pdgate cost-model train: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(_rounded(summary), indent=2, default=_json_default))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    try:
        report = _evaluate(args)
    except _UsageError as exc:
        print(f"pdgate cost-model evaluate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(_rounded(report), indent=2, default=_json_default))
    return 0


# --- train ------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from pdgate.scheduler.costmodel.datasets import split_holdout
    from pdgate.scheduler.costmodel.output_length import (
        GlobalMeanBaseline,
        OutputLengthModel,
        PromptLengthBaseline,
    )
    from pdgate.scheduler.costmodel.store import ModelStore

    if not 0 <= args.holdout <= 0.9:
        raise _UsageError("--holdout must be between 0 and 0.9")
    if not 0.5 < args.q_high < 1:
        raise _UsageError("--q-high must be between 0.5 and 1")
    if args.keep < 1 or (args.max_train_rows is not None and args.max_train_rows < 1):
        raise _UsageError("--keep and --max-train-rows must be positive")
    started = time.monotonic()
    rows = _read(args)
    train, test = split_holdout(rows, args.holdout, args.seed)
    n_train_available = len(train)
    if args.max_train_rows is not None and len(train) > args.max_train_rows:
        keep = np.sort(np.random.default_rng(args.seed).choice(len(train), args.max_train_rows, replace=False))
        train = [train[i] for i in keep]
    if not train:
        raise _UsageError("no training rows left after the held-out split")
    _progress(
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
    output_metrics = _length_metrics(model, baselines, test) if test else None
    latency_metrics = None
    latency = _fit_latency(_timing_records(train))
    if latency is not None:
        components["latency"] = latency
        latency_metrics = _latency_metrics(latency, _timing_records(test))
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
        "metrics": {"output_length": output_metrics, "latency": latency_metrics},
        "components": sorted(components),
    }
    try:
        directory = ModelStore(args.out, keep=args.keep).save(components, _json_safe(meta))
    except OSError as exc:
        raise _UsageError(f"cannot write the model to {args.out}: {exc}") from None
    return {
        "version_dir": directory,
        "model_version": Path(directory).name,
        "n_train": len(train),
        "n_test": len(test),
        "n_files": len(args.data),
        "output_length": output_metrics,
        "latency": latency_metrics,
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
        _progress("timing records found but scheduler.costmodel.latency is not available: no latency model")
        return None
    return LatencyModel.fit_records(records)


def _latency_metrics(latency: Any, records: list[dict[str, Any]]) -> Any:
    evaluate = getattr(latency, "evaluate", None)
    if not callable(evaluate) or not records:
        return None
    return evaluate(records)


def _timing_records(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [r.record for r in rows if isinstance(r.record.get("timing"), dict)]


# --- evaluate ---------------------------------------------------------------------------------


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is None and not args.cross_validate and not args.prequential:
        raise _UsageError("say what to evaluate: --model DIR, --cross-validate SPLIT... and/or --prequential")
    if args.folds < 2 or args.refit_every < 1 or args.window < 1 or args.min_model_rows < 2:
        raise _UsageError("--folds and --min-model-rows must be at least 2, --refit-every and --window positive")
    if args.max_rows is not None and args.max_rows < 1:
        raise _UsageError("--max-rows must be positive")
    if not 0.5 < args.q_high < 1:
        raise _UsageError("--q-high must be between 0.5 and 1")
    if args.base and not args.prequential:
        raise _UsageError("--base is the training data of --prequential")
    saved = _load_saved(Path(args.model)) if args.model is not None else None
    rows = _sample(_where(_read(args), args.where), args.max_rows, args.seed)
    report: dict[str, Any] = {"n": len(rows)}
    if saved is not None:
        report |= _evaluate_saved(args.model, *saved, rows)
    if args.cross_validate or args.prequential:
        from pdgate.scheduler.costmodel.evaluate_protocols import ProtocolOptions, run_protocols

        base = _where(_read(args, args.base), args.base_where) if args.base else []
        options = ProtocolOptions(
            splits=args.cross_validate,
            folds=args.folds,
            prequential=args.prequential,
            refit_every=args.refit_every,
            window=args.window,
            order=args.order,
            distinct_prompts=args.distinct_prompts,
            calibration=not args.no_calibration,
            min_model_rows=args.min_model_rows,
            q_high=args.q_high,
            seed=args.seed,
        )
        try:
            report |= run_protocols(rows, base, options, _progress)
        except ValueError as exc:
            raise _UsageError(str(exc)) from None
    return report


def _where(rows: list[Any], conditions: Sequence[str]) -> list[Any]:
    """The rows whose record has, for every ``FIELD=V1,V2`` condition, one of the values."""
    for condition in conditions:
        name, sep, values = condition.partition("=")
        if not sep or not name or not values:
            raise _UsageError(f"--where/--base-where takes FIELD=VALUE[,VALUE...], not {condition!r}")
        allowed = set(values.split(","))
        rows = [r for r in rows if str(r.record.get(name)) in allowed]
        if not rows:
            raise _UsageError(f"no rows have {condition}")
    return rows


def _sample(rows: list[Any], limit: int | None, seed: int) -> list[Any]:
    """At most ``limit`` rows, a seeded random sample in their original order."""
    if limit is None or len(rows) <= limit:
        return rows
    import numpy as np

    keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
    return [rows[i] for i in keep]


def _load_saved(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The current version's components and metadata; a usage error when there is none to score."""
    from pdgate.scheduler.costmodel.store import ModelStore

    if not directory.is_dir():
        raise _UsageError(f"no model directory at {directory}")
    try:
        loaded = ModelStore(directory).load_current()
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    if loaded is None:
        raise _UsageError(f"{directory} holds no model version (run `pdgate cost-model train --out {directory}`)")
    components, meta = loaded
    model = components.get("output_length")
    if model is None or not hasattr(model, "predict_many"):
        raise _UsageError(f"{directory}/{meta.get('version')}: no output_length component")
    return components, meta


def _evaluate_saved(
    directory: str, components: dict[str, Any], meta: dict[str, Any], rows: list[Any]
) -> dict[str, Any]:
    model = components["output_length"]
    baselines = {
        name: components[f"baseline_{name}"]
        for name in ("global_mean", "prompt_length")
        if f"baseline_{name}" in components
    }
    latency = components.get("latency")
    return {
        "model_version": meta.get("version"),
        "model_dir": directory,
        "output_length": _length_metrics(model, baselines, rows),
        "latency": _latency_metrics(latency, _timing_records(rows)) if latency is not None else None,
    }


# --- shared -----------------------------------------------------------------------------------


def _read(args: argparse.Namespace, paths: Sequence[str] | None = None) -> list[Any]:
    from pdgate.common.tokenizer import load_tokenizer
    from pdgate.scheduler.costmodel.datasets import read_dataset

    paths = args.data if paths is None else paths

    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (OSError, RuntimeError, ValueError) as exc:
        raise _UsageError(f"--tokenizer {args.tokenizer}: {exc}") from None
    rows = []
    for path in paths:
        if not Path(path).is_file():
            raise _UsageError(f"no such file: {path}")
        try:
            rows += read_dataset(path, tokenizer, endpoint_default=args.endpoint)
        except ValueError as exc:
            raise _UsageError(str(exc)) from None
        except OSError as exc:
            raise _UsageError(f"cannot read {path}: {exc}") from None
    if not rows:
        raise _UsageError(f"no usable rows in {', '.join(paths)}")
    return rows


def _length_metrics(model: Any, baselines: dict[str, Any], rows: Sequence[Any]) -> dict[str, Any]:
    import numpy as np

    from pdgate.scheduler.costmodel.length_evaluation import Predictions, length_report

    features = [r.features for r in rows]
    actual = np.array([r.output_tokens for r in rows], dtype=float)
    models = [f.model for f in features]
    q_high = float(getattr(model, "q_high", 0.9))

    def score(predictor: Any) -> dict[str, Any]:
        median, high = predictor.predict_many(features)
        return length_report(Predictions(np.arange(len(rows)), median, high, actual, models), q_high)

    return {"model": score(model), "baselines": {name: score(b) for name, b in baselines.items()}}


def _progress(message: str) -> None:
    print(f"pdgate cost-model: {message}", file=sys.stderr, flush=True)


def _rounded(value: Any) -> Any:
    """Floats to 4 decimals for printing."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays (e.g. in a latency component's metrics) as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _json_safe(value: Any) -> Any:
    """Non-finite floats to ``None`` (strict JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
