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
    PredictorFactory,
    Protocol,
    cross_validate,
    fold_numbers,
    length_report,
    prequential,
)
from pdgate.scheduler.costmodel.output_length import OutputLengthModel

__all__ = ["ProtocolOptions", "predictors", "run_protocols"]


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
        fold_numbers(rows, split, options.folds, options.seed)
    out: dict[str, Any] = {}
    if options.splits:
        out["cross_validation"] = {}
        for split in options.splits:
            reports = {}
            for name, make in makers.items():
                progress(f"cross-validating {name}, leaving out {split} ({options.folds} folds)")
                predictions = cross_validate(rows, make, split, options.folds, options.seed)
                reports[name] = length_report(predictions, options.q_high, options.min_model_rows)
            out["cross_validation"][split] = _with_baselines(reports) | {"folds": options.folds}
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
