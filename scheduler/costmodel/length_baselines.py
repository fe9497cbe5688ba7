"""Yardsticks for output-length prediction: two baselines and held-out evaluation.

:class:`GlobalMeanBaseline` and :class:`PromptLengthBaseline` implement
:class:`~scheduler.costmodel.length_types.LengthPredictor` like
:class:`~scheduler.costmodel.output_length.OutputLengthModel`; :func:`evaluate_lengths` scores
any of them on held-out data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from pdgate.scheduler.costmodel.features import RequestFeatures
from pdgate.scheduler.costmodel.length_types import (
    DEFAULT_Q_HIGH,
    LengthPrediction,
    cap_prediction,
    cap_predictions,
    check_training,
)

__all__ = ["GlobalMeanBaseline", "PromptLengthBaseline", "evaluate_lengths", "rank_correlation"]


class GlobalMeanBaseline:
    """Every request gets the training mean (median) and the training ``q_high`` quantile (high),
    capped by its max_tokens like the model's predictions."""

    def __init__(self, q_high: float = DEFAULT_Q_HIGH) -> None:
        self.q_high = float(q_high)
        self.mean = 1.0
        self.high = 1.0
        self.n_train = 0

    def fit(self, features: Sequence[RequestFeatures], outputs: Sequence[int]) -> GlobalMeanBaseline:
        y = check_training(features, outputs)
        self.mean = float(np.mean(y))
        self.high = float(np.quantile(y, self.q_high))
        self.n_train = len(y)
        return self

    def predict(self, f: RequestFeatures) -> LengthPrediction:
        return cap_prediction(self.mean, self.high, f.max_tokens)

    def predict_many(self, features: Sequence[RequestFeatures]) -> tuple[np.ndarray, np.ndarray]:
        n = len(features)
        return cap_predictions(np.full(n, self.mean), np.full(n, self.high), features)


class PromptLengthBaseline:
    """Prompt length only: training rows binned by ``log1p(prompt_tokens)`` at its deciles; each
    bin predicts its median and ``q_high`` quantile (capped by max_tokens)."""

    def __init__(self, q_high: float = DEFAULT_Q_HIGH, bins: int = 10) -> None:
        self.q_high = float(q_high)
        self.bins = int(bins)
        self.edges = np.zeros(0)
        self.medians = np.ones(1)
        self.highs = np.ones(1)
        self.n_train = 0

    def fit(self, features: Sequence[RequestFeatures], outputs: Sequence[int]) -> PromptLengthBaseline:
        y = check_training(features, outputs)
        x = np.log1p([f.prompt_tokens for f in features])
        self.edges = np.unique(np.quantile(x, np.linspace(0, 1, self.bins + 1)[1:-1]))
        which = np.searchsorted(self.edges, x, side="right")
        self.medians = np.empty(len(self.edges) + 1)
        self.highs = np.empty(len(self.edges) + 1)
        for b in range(len(self.edges) + 1):
            part = y[which == b]
            part = part if len(part) else y
            self.medians[b] = np.quantile(part, 0.5)
            self.highs[b] = np.quantile(part, self.q_high)
        self.n_train = len(y)
        return self

    def predict(self, f: RequestFeatures) -> LengthPrediction:
        b = int(np.searchsorted(self.edges, math.log1p(f.prompt_tokens), side="right"))
        return cap_prediction(float(self.medians[b]), float(self.highs[b]), f.max_tokens)

    def predict_many(self, features: Sequence[RequestFeatures]) -> tuple[np.ndarray, np.ndarray]:
        which = np.searchsorted(self.edges, np.log1p([f.prompt_tokens for f in features]), side="right")
        return cap_predictions(self.medians[which], self.highs[which], features)


def evaluate_lengths(median: np.ndarray, high: np.ndarray, actual: np.ndarray, q_high: float) -> dict[str, Any]:
    """Held-out quality of length predictions (all JSON-able).

    ``spearman`` / ``kendall``: rank correlation of ``median`` with ``actual`` (``None`` when
    undefined, e.g. a constant prediction or fewer than two rows); ``mae``: mean absolute error
    of ``median`` in tokens; ``within_2x``: fraction with ``actual/2 <= median <= 2*actual``;
    ``coverage_high``: fraction with ``actual <= high`` (ideally ``q_high``); ``mean_high_ratio``:
    mean of ``high / actual`` (how much a ``high`` reservation over-books); ``n``.
    """
    median = np.asarray(median, dtype=float)
    high = np.asarray(high, dtype=float)
    actual = np.asarray(actual, dtype=float)
    if not median.shape == high.shape == actual.shape:
        raise ValueError("median, high and actual must have the same length")
    n = int(actual.size)
    out: dict[str, Any] = {"n": n, "q_high": float(q_high)}
    if n == 0:
        return out | {
            "spearman": None,
            "kendall": None,
            "mae": None,
            "within_2x": None,
            "coverage_high": None,
            "mean_high_ratio": None,
        }
    out["spearman"] = rank_correlation(stats.spearmanr, median, actual)
    out["kendall"] = rank_correlation(stats.kendalltau, median, actual)
    out["mae"] = float(np.mean(np.abs(median - actual)))
    out["within_2x"] = float(np.mean((median >= actual / 2) & (median <= actual * 2)))
    out["coverage_high"] = float(np.mean(actual <= high))
    out["mean_high_ratio"] = float(np.mean(high / np.maximum(actual, 1.0)))
    return out


def rank_correlation(fn: Any, a: np.ndarray, b: np.ndarray) -> float | None:
    """``fn``'s (scipy's ``spearmanr``, ``kendalltau``) coefficient of ``a`` and ``b``; ``None`` when
    undefined (fewer than two rows, a constant side, a non-finite result)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    value = float(fn(a, b)[0])
    return value if math.isfinite(value) else None
