"""``pdgate cost-model evaluate``: a saved model on data files, and the protocols that do not
flatter a model (cross-validation leaving prompts or models out, the prequential replay)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
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
* --cross-validate sources: traffic of a kind not trained on: one fold per value of the record
  field --source-field (default dataset: alpaca_eval's prompt sources), each predicted by a
  model trained on the others; per_source gives each source's own figures, and
  per_source_mean_within_model_spearman their mean (the headline: pooling the folds mixes the
  sources' different offsets into each model's ranking).
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


def add_evaluate_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``evaluate`` on ``pdgate cost-model``'s subcommands."""
    evaluate = sub.add_parser(
        "evaluate",
        help="score a saved model on data files, and/or cross-validate and replay the data online",
        description=EVALUATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--model", metavar="DIR", help="model store directory: score its current version")
    evaluate.add_argument("--data", nargs="+", required=True, metavar="FILE")
    tokenizer_flags(evaluate)
    evaluate.add_argument(
        "--cross-validate",
        nargs="+",
        choices=["prompts", "models", "both", "sources"],
        default=[],
        metavar="SPLIT",
        help="out-of-fold evaluation leaving out prompts, answering models, both, or prompt sources",
    )
    evaluate.add_argument(
        "--source-field",
        default="dataset",  # length_evaluation.DEFAULT_SOURCE_FIELD (not imported: numpy stays out of --help)
        metavar="FIELD",
        help="the record field naming a row's source, for --cross-validate sources (default dataset)",
    )
    evaluate.add_argument(
        "--folds", type=int, default=5, help="folds of --cross-validate (default 5; sources: one per source)"
    )
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


def run_evaluate(args: argparse.Namespace) -> int:
    return run_reporting("evaluate", _evaluate, args)


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is None and not args.cross_validate and not args.prequential:
        raise UsageError("say what to evaluate: --model DIR, --cross-validate SPLIT... and/or --prequential")
    if args.folds < 2 or args.refit_every < 1 or args.window < 1 or args.min_model_rows < 2:
        raise UsageError("--folds and --min-model-rows must be at least 2, --refit-every and --window positive")
    if args.max_rows is not None and args.max_rows < 1:
        raise UsageError("--max-rows must be positive")
    if not 0.5 < args.q_high < 1:
        raise UsageError("--q-high must be between 0.5 and 1")
    if args.base and not args.prequential:
        raise UsageError("--base is the training data of --prequential")
    saved = _load_saved(Path(args.model)) if args.model is not None else None
    from pdgate.scheduler.costmodel.datasets import sample_rows

    rows = sample_rows(_where(read_rows(args), args.where), args.max_rows, args.seed)
    report: dict[str, Any] = {"n": len(rows)}
    if saved is not None:
        report |= _evaluate_saved(args.model, *saved, rows)
    if args.cross_validate or args.prequential:
        from pdgate.scheduler.costmodel.evaluate_protocols import ProtocolOptions, run_protocols

        base = _where(read_rows(args, args.base), args.base_where) if args.base else []
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
            source_field=args.source_field,
            q_high=args.q_high,
            seed=args.seed,
        )
        try:
            report |= run_protocols(rows, base, options, progress)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return report


def _where(rows: list[Any], conditions: Sequence[str]) -> list[Any]:
    """The rows whose record has, for every ``FIELD=V1,V2`` condition, one of the values."""
    for condition in conditions:
        name, sep, values = condition.partition("=")
        if not sep or not name or not values:
            raise UsageError(f"--where/--base-where takes FIELD=VALUE[,VALUE...], not {condition!r}")
        allowed = set(values.split(","))
        rows = [r for r in rows if str(r.record.get(name)) in allowed]
        if not rows:
            raise UsageError(f"no rows have {condition}")
    return rows


def _load_saved(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The current version's components and metadata; a usage error when there is none to score."""
    from pdgate.scheduler.costmodel.store import ModelStore

    if not directory.is_dir():
        raise UsageError(f"no model directory at {directory}")
    try:
        loaded = ModelStore(directory).load_current()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if loaded is None:
        raise UsageError(f"{directory} holds no model version (run `pdgate cost-model train --out {directory}`)")
    components, meta = loaded
    model = components.get("output_length")
    if model is None or not hasattr(model, "predict_many"):
        raise UsageError(f"{directory}/{meta.get('version')}: no output_length component")
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
        "output_length": length_metrics(model, baselines, rows),
        "latency": latency_metrics(latency, timing_records(rows)) if latency is not None else None,
    }
