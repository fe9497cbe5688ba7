"""Evaluation protocols for output-length predictors that do not flatter them.

A pooled rank correlation over many answering models mostly measures which model answered
(verbose models answer longer, and the gateway knows the model at serving time). What
scheduling needs is the ranking of requests *to the same model*, on prompts the predictor has
not seen. So every protocol here reports, besides the pooled figures of
:func:`~scheduler.costmodel.length_baselines.evaluate_lengths`:

* :func:`within_model`: Spearman per answering model, then the unweighted mean over models
  (each model's ranking counts once, however many rows it has), and the coverage of the high
  quantile per model (a model-blind high quantile covers verbose models too seldom);

and the protocols are:

* :func:`cross_validate` with ``"prompts"``: K folds of distinct prompts; every answer to a
  prompt is on one side (new prompts, models already seen);
* ``"models"``: K folds of answering models (a new model, whose prompts other models answered);
* ``"both"``: the fold's prompts *and* models are left out of its training (new prompts from a
  new model); only rows whose prompt fold and model fold coincide are predicted, about 1/K;
* ``"sources"``: one fold per value of a record field (``source_field``, e.g. alpaca_eval's
  ``dataset``: the benchmark a prompt came from), each predicted by a model trained on the
  other sources (traffic of a kind not trained on); ``folds`` does not apply;
* :func:`prequential`: the deployment's view. Requests arrive in order; each is predicted by
  the model of the moment before its answer is learned; every ``refit_every`` requests the
  model is refitted on everything seen so far (plus any base data trained on before serving);
  accuracy is reported per window of arrivals, so a curve shows how fast it adapts.

Fold assignment is deterministic for a seed: keys are ordered by CRC32 (not Python's salted
``hash``), then permuted by the seeded generator.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

from pdgate.scheduler.costmodel.calibration import LengthCalibration
from pdgate.scheduler.costmodel.datasets import LabeledRequest, prompt_key
from pdgate.scheduler.costmodel.length_baselines import evaluate_lengths, rank_correlation
from pdgate.scheduler.costmodel.length_types import LengthPredictor, cap_prediction

__all__ = [
    "DEFAULT_SOURCE_FIELD",
    "MIN_MODEL_ROWS",
    "Predictions",
    "Protocol",
    "cross_validate",
    "fold_numbers",
    "length_report",
    "prequential",
    "source_folds",
    "source_of",
    "within_model",
]

MIN_MODEL_ROWS = 10
"""Fewest rows of one answering model for its own Spearman to count in the mean."""

Protocol = Literal["prompts", "models", "both", "sources"]
DEFAULT_SOURCE_FIELD = "dataset"
PredictorFactory = Callable[[], LengthPredictor]


@dataclass(frozen=True)
class Predictions:
    """Predictions for some rows (``index`` into the evaluated list), and the truth."""

    index: np.ndarray
    median: np.ndarray
    high: np.ndarray
    actual: np.ndarray
    models: list[str]


def within_model(
    median: np.ndarray,
    high: np.ndarray,
    actual: np.ndarray,
    models: Sequence[str],
    min_rows: int = MIN_MODEL_ROWS,
) -> dict[str, Any]:
    """Per answering model: rows, Spearman of ``median`` with ``actual``, coverage of ``high``;
    ``mean_spearman``: the unweighted mean over models with at least ``min_rows`` rows and a
    defined Spearman (``None`` when none qualifies); ``coverage_min`` / ``coverage_max`` over the
    same models."""
    median, high, actual = (np.asarray(a, dtype=float) for a in (median, high, actual))
    by_model: dict[str, list[int]] = {}
    for i, model in enumerate(models):
        by_model.setdefault(model, []).append(i)
    per_model: dict[str, dict[str, Any]] = {}
    for model in sorted(by_model):
        rows = np.asarray(by_model[model])
        per_model[model] = {
            "n": int(rows.size),
            "spearman": rank_correlation(stats.spearmanr, median[rows], actual[rows])
            if rows.size >= min_rows
            else None,
            "coverage_high": float(np.mean(actual[rows] <= high[rows])),
        }
    counted = [m for m in per_model.values() if m["spearman"] is not None]
    return {
        "mean_spearman": float(np.mean([m["spearman"] for m in counted])) if counted else None,
        "n_models": len(counted),
        "coverage_min": min((m["coverage_high"] for m in counted), default=None),
        "coverage_max": max((m["coverage_high"] for m in counted), default=None),
        "per_model": per_model,
    }


def length_report(predictions: Predictions, q_high: float, min_rows: int = MIN_MODEL_ROWS) -> dict[str, Any]:
    """Pooled figures (:func:`evaluate_lengths`) plus ``within_model``."""
    p = predictions
    return evaluate_lengths(p.median, p.high, p.actual, q_high) | {
        "within_model": within_model(p.median, p.high, p.actual, p.models, min_rows)
    }


def cross_validate(
    rows: Sequence[LabeledRequest],
    make: PredictorFactory,
    protocol: Protocol,
    folds: int = 5,
    seed: int = 0,
    source_field: str = DEFAULT_SOURCE_FIELD,
) -> Predictions:
    """Out-of-fold predictions of predictors from ``make`` under ``protocol`` (module docstring).

    ``ValueError`` when there are fewer than ``folds`` distinct prompts (or models, or fewer than
    2 sources) to split, or a fold leaves nothing to train on."""
    fold_arrays = fold_numbers(rows, protocol, folds, seed, source_field)
    models = [r.features.model for r in rows]
    index: list[np.ndarray] = []
    medians: list[np.ndarray] = []
    highs: list[np.ndarray] = []
    for k in range(max(int(fold.max()) for fold in fold_arrays) + 1):
        in_fold = _in_fold(fold_arrays, k, len(rows))
        test = np.flatnonzero(in_fold["test"])
        train = np.flatnonzero(in_fold["train"])
        if test.size == 0:
            continue
        if train.size == 0:
            raise ValueError(f"fold {k} leaves no rows to train on")
        predictor = make().fit(
            [rows[i].features for i in train.tolist()], [rows[i].output_tokens for i in train.tolist()]
        )
        median, high = predictor.predict_many([rows[i].features for i in test.tolist()])
        index.append(test)
        medians.append(np.asarray(median, dtype=float))
        highs.append(np.asarray(high, dtype=float))
    if not index:
        raise ValueError("no fold had rows to predict")
    order = np.concatenate(index)
    return Predictions(
        order,
        np.concatenate(medians),
        np.concatenate(highs),
        np.array([rows[i].output_tokens for i in order.tolist()], dtype=float),
        [models[i] for i in order.tolist()],
    )


def fold_numbers(
    rows: Sequence[LabeledRequest],
    protocol: Protocol,
    folds: int,
    seed: int = 0,
    source_field: str = DEFAULT_SOURCE_FIELD,
) -> list[np.ndarray]:
    """Every row's fold, once per key the protocol splits by (prompt, model or both; the source);
    a row is predicted in fold ``k`` when all its folds are ``k``. ``ValueError`` when there are
    fewer distinct prompts or models than ``folds``, or fewer than 2 sources."""
    if protocol == "sources":
        return [source_folds(rows, source_field)]
    if folds < 2:
        raise ValueError("need at least 2 folds")
    out = []
    if protocol in ("prompts", "both"):
        out.append(_folds([prompt_key(r) or f"r:{i}" for i, r in enumerate(rows)], folds, seed))
    if protocol in ("models", "both"):
        out.append(_folds([r.features.model for r in rows], folds, seed + 1))
    return out


def source_folds(rows: Sequence[LabeledRequest], source_field: str) -> np.ndarray:
    """One fold per distinct value of the record field ``source_field``, in sorted order;
    ``ValueError`` when a row lacks it or there are fewer than 2 values."""
    values = [source_of(r, source_field) for r in rows]
    if any(v is None for v in values):
        raise ValueError(f"leaving sources out needs the field {source_field!r} in every row")
    unique = sorted({str(v) for v in values})
    if len(unique) < 2:
        raise ValueError(f"leaving sources out needs at least 2 values of {source_field!r}, not {len(unique)}")
    fold_of = {v: k for k, v in enumerate(unique)}
    return np.array([fold_of[str(v)] for v in values])


def source_of(row: LabeledRequest, source_field: str) -> Any:
    """The row's source: its record's ``source_field`` (``None`` when absent)."""
    return row.record.get(source_field)


def prequential(
    stream: Sequence[LabeledRequest],
    make: PredictorFactory,
    initial: LengthPredictor,
    *,
    base: Sequence[LabeledRequest] = (),
    refit_every: int = 200,
    window: int = 500,
    max_records: int = 50_000,
    min_rows: int = MIN_MODEL_ROWS,
    calibration: LengthCalibration | None = None,
) -> dict[str, Any]:
    """Predict-then-learn over ``stream`` in order (module docstring).

    ``initial`` serves until the first refit (a model trained on ``base`` beforehand, or a
    prior); each refit fits a fresh ``make()`` on ``base`` plus the latest ``max_records``
    streamed rows. With ``calibration`` (what the gateway runs between refits), every prediction
    is scaled by its answering model's length scale in force, and every answer then updates it;
    a refit starts it over. Returns ``windows`` (per ``window`` arrivals: pooled figures,
    ``within_model`` without its per-model table, and the rows the model of the window's first
    request was trained on) and ``overall`` (the whole stream, with the per-model table)."""
    if refit_every < 1 or window < 1:
        raise ValueError("refit_every and window must be positive")
    q_high = float(initial.q_high)
    predictor = initial
    trained_on = len(base)
    medians = np.empty(len(stream))
    highs = np.empty(len(stream))
    trained = np.empty(len(stream), dtype=np.int64)
    for start in range(0, len(stream), refit_every):
        block = stream[start : start + refit_every]
        median, high = predictor.predict_many([r.features for r in block])
        if calibration is not None:
            median, high = _calibrated(block, np.asarray(median, float), np.asarray(high, float), calibration)
        medians[start : start + len(block)] = median
        highs[start : start + len(block)] = high
        trained[start : start + len(block)] = trained_on
        end = start + len(block)
        if end < len(stream):  # learn what was just answered before the next block arrives
            seen = list(base) + list(stream[max(0, end - max_records) : end])
            predictor = make().fit([r.features for r in seen], [r.output_tokens for r in seen])
            trained_on = len(seen)
            if calibration is not None:
                calibration.reset()
    actual = np.array([r.output_tokens for r in stream], dtype=float)
    models = [r.features.model for r in stream]
    windows = []
    for start in range(0, len(stream), window):
        part = slice(start, min(start + window, len(stream)))
        figures = evaluate_lengths(medians[part], highs[part], actual[part], q_high)
        inside = within_model(medians[part], highs[part], actual[part], models[part], min_rows)
        inside.pop("per_model")
        windows.append({"first": start, "trained_on": int(trained[start])} | figures | {"within_model": inside})
    everything = Predictions(np.arange(len(stream)), medians, highs, actual, models)
    return {
        "refit_every": refit_every,
        "window": window,
        "windows": windows,
        "overall": length_report(everything, q_high, min_rows),
    }


def _calibrated(
    block: Sequence[LabeledRequest], median: np.ndarray, high: np.ndarray, calibration: LengthCalibration
) -> tuple[np.ndarray, np.ndarray]:
    """``block``'s predictions as the gateway serves them, one request after another: scaled by
    the answering model's length scale in force, which the request's answer then updates."""
    median, high = median.copy(), high.copy()
    for i, row in enumerate(block):
        f = row.features
        scale = calibration.in_force.get(f.model)
        if scale is not None:
            served = cap_prediction(median[i] * scale, high[i] * scale, f.max_tokens)
            median[i], high[i] = served.median, served.high
        calibration.observe_output(f.model, float(median[i]), row.output_tokens, f.max_tokens, scale or 1.0)
    return median, high


def _folds(keys: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """Fold number of every row: distinct keys ordered by CRC32, permuted by ``seed``, dealt round-robin."""
    unique = sorted(set(keys), key=lambda k: (zlib.crc32(k.encode("utf-8", "surrogatepass")), k))
    if len(unique) < folds:
        raise ValueError(f"{len(unique)} distinct groups cannot make {folds} folds")
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[i]: position % folds for position, i in enumerate(order)}
    return np.array([fold_of[k] for k in keys])


def _in_fold(fold_arrays: Sequence[np.ndarray], k: int, n: int) -> dict[str, np.ndarray]:
    """Boolean ``test`` and ``train`` masks of fold ``k``: test rows have the fold's prompts,
    models or source (as the protocol splits), training rows share none of them."""
    test = np.ones(n, dtype=bool)
    train = np.ones(n, dtype=bool)
    for fold in fold_arrays:
        test &= fold == k
        train &= fold != k
    return {"test": test, "train": train}
