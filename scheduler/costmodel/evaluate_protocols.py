"""``pdgate cost-model evaluate``'s protocols: cross-validation and the prequential replay, run
for the output-length model and its two baselines alike (see
:mod:`scheduler.costmodel.length_evaluation` for what each protocol measures)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pdgate.scheduler.costmodel.calibration import LengthCalibration
from pdgate.scheduler.costmodel.datasets import LabeledRequest, prompt_key
from pdgate.scheduler.costmodel.length_baselines import GlobalMeanBaseline, PromptLengthBaseline
from pdgate.scheduler.costmodel.length_evaluation import (
    DEFAULT_SOURCE_FIELD,
    Predictions,
    PredictorFactory,
    Protocol,
    cross_validate,
    fold_numbers,
    length_report,
    prequential,
    source_of,
)
from pdgate.scheduler.costmodel.output_length import OutputLengthModel

__all__ = ["ProtocolOptions", "per_source", "predictors", "run_protocols"]


@dataclass(frozen=True)
class ProtocolOptions:
    """What to run and how (the command's flags)."""

    splits: Sequence[Protocol] = ()
    folds: int = 5
    prequential: bool = False
    refit_every: int = 200
    window: int = 500
    order: Literal["shuffled", "file"] = "shuffled"
    distinct_prompts: bool = False  # replay one answer per prompt (no prompt comes back)
    calibration: bool = True  # the gateway's online length scale per answering model between refits
    min_model_rows: int = 10
    source_field: str = DEFAULT_SOURCE_FIELD  # the record field that names a row's source ("sources" split)
    q_high: float = 0.9
    seed: int = 0


def predictors(q_high: float, seed: int) -> dict[str, PredictorFactory]:
    """The model and the baselines it is compared with, as fresh-predictor factories."""
    return {
        "model": lambda: OutputLengthModel(q_high, seed=seed),
        "global_mean": lambda: GlobalMeanBaseline(q_high),
        "prompt_length": lambda: PromptLengthBaseline(q_high),
    }


def run_protocols(
    rows: Sequence[LabeledRequest],
    base: Sequence[LabeledRequest],
    options: ProtocolOptions,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """``cross_validation`` (per split) and ``prequential`` reports, each ``{"model": report,
    "baselines": {name: report}}``; ``ValueError`` when the data cannot be split as asked."""
    makers = predictors(options.q_high, options.seed)
    for split in options.splits:  # refuse a split the data cannot make before fitting anything
        fold_numbers(rows, split, options.folds, options.seed, options.source_field)
    out: dict[str, Any] = {}
    if options.splits:
        out["cross_validation"] = {}
        for split in options.splits:
            reports = {}
            for name, make in makers.items():
                progress(f"cross-validating {name}, leaving out {split}")
                predictions = cross_validate(rows, make, split, options.folds, options.seed, options.source_field)
                reports[name] = length_report(predictions, options.q_high, options.min_model_rows)
                if split == "sources":
                    by_source = per_source(rows, predictions, options)
                    scored = [
                        f["within_model_spearman"] for f in by_source.values() if f["within_model_spearman"] is not None
                    ]
                    reports[name]["per_source"] = by_source
                    reports[name]["per_source_mean_within_model_spearman"] = float(np.mean(scored)) if scored else None
            folds = len(reports["model"].get("per_source", ())) or options.folds
            out["cross_validation"][split] = _with_baselines(reports) | {"folds": folds}
    if options.prequential:
        stream = list(rows)
        if options.order == "shuffled":
            stream = [stream[i] for i in np.random.default_rng(options.seed).permutation(len(stream))]
        if options.distinct_prompts:
            stream = _first_answer_per_prompt(stream)
        reports = {}
        for name, make in makers.items():
            progress(f"replaying {len(stream)} requests for {name} (refit every {options.refit_every})")
            initial = (
                make().fit(_features(base), _outputs(base)) if base else OutputLengthModel.prior(q_high=options.q_high)
            )
            reports[name] = prequential(
                stream,
                make,
                initial,
                base=base,
                refit_every=options.refit_every,
                window=options.window,
                min_rows=options.min_model_rows,
                calibration=LengthCalibration() if options.calibration else None,
            )
        out["prequential"] = _with_baselines(reports) | {
            "order": options.order,
            "distinct_prompts": options.distinct_prompts,
            "calibration": options.calibration,
            "n": len(stream),
            "base_rows": len(base),
        }
    return out


def per_source(rows: Sequence[LabeledRequest], predictions: Predictions, options: ProtocolOptions) -> dict[str, Any]:
    """Each left-out source's own figures: rows, pooled Spearman, ``within_model`` mean Spearman
    and coverage of the high quantile (as in :func:`within_model`)."""
    sources = np.array([str(source_of(rows[i], options.source_field)) for i in predictions.index.tolist()])
    out: dict[str, Any] = {}
    for source in sorted(set(sources.tolist())):
        mask = sources == source
        subset = Predictions(
            predictions.index[mask],
            predictions.median[mask],
            predictions.high[mask],
            predictions.actual[mask],
            [m for m, keep in zip(predictions.models, mask.tolist()) if keep],
        )
        report = length_report(subset, options.q_high, options.min_model_rows)
        within = report["within_model"]
        out[source] = {
            "n": int(mask.sum()),
            "spearman": report["spearman"],
            "within_model_spearman": within["mean_spearman"],
            "coverage_min": within["coverage_min"],
            "coverage_max": within["coverage_max"],
        }
    return out


def _first_answer_per_prompt(rows: Sequence[LabeledRequest]) -> list[LabeledRequest]:
    """The first row of every prompt (:func:`prompt_key`), in order; rows without text all stay."""
    seen: set[str] = set()
    out = []
    for row in rows:
        key = prompt_key(row)
        if key is None or key not in seen:
            out.append(row)
            if key is not None:
                seen.add(key)
    return out


def _with_baselines(reports: dict[str, Any]) -> dict[str, Any]:
    return {"model": reports.pop("model"), "baselines": reports}


def _features(rows: Sequence[LabeledRequest]) -> list[Any]:
    return [r.features for r in rows]


def _outputs(rows: Sequence[LabeledRequest]) -> list[int]:
    return [r.output_tokens for r in rows]
