"""What an output-length predictor returns, and the rules every predictor shares.

:class:`LengthPrediction` is a prediction, :class:`LengthPredictor` the interface that
:class:`~scheduler.costmodel.output_length.OutputLengthModel` and the baselines in
:mod:`scheduler.costmodel.length_baselines` implement; :func:`cap_prediction` /
:func:`cap_predictions` apply the ``1 <= median <= high <= max_tokens`` rule and
:func:`check_training` validates training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pdgate.scheduler.costmodel.features import RequestFeatures

__all__ = [
    "DEFAULT_Q_HIGH",
    "LengthPrediction",
    "LengthPredictor",
    "cap_prediction",
    "cap_predictions",
    "check_training",
]

DEFAULT_Q_HIGH = 0.9


@dataclass(frozen=True)
class LengthPrediction:
    """Predicted output tokens: ``1 <= median <= high``, both ``<= max_tokens`` when it is set.

    ``high`` is the model's ``q_high`` quantile (0.9 unless configured otherwise). ``scale`` is
    the online length scale both carry (:attr:`CostModel.length_scale` when it was served; the
    model's own median is ``median / scale`` unless capped), so a correction learnt from the
    answer divides out the scale that was in force then, not the one in force when it ends; 0
    when the median is not the model's at all (a client's ``min_tokens`` raised it), so that
    nothing is learnt from the answer.
    """

    median: float
    high: float
    scale: float = 1.0


class LengthPredictor(Protocol):
    """What evaluation needs from a model or baseline."""

    q_high: float

    def fit(self, features: Sequence[RequestFeatures], outputs: Sequence[int]) -> LengthPredictor: ...

    def predict(self, f: RequestFeatures) -> LengthPrediction: ...

    def predict_many(self, features: Sequence[RequestFeatures]) -> tuple[np.ndarray, np.ndarray]: ...


def cap_prediction(median: float, high: float, max_tokens: int | None) -> LengthPrediction:
    """``median`` and ``high`` made a :class:`LengthPrediction`: ``1 <= median <= high``, both capped by ``max_tokens``."""
    median = max(median, 1.0)
    high = max(high, median)
    if max_tokens is not None:
        median = min(median, float(max_tokens))
        high = min(high, float(max_tokens))
    return LengthPrediction(median, high)


def client_bounds(
    prediction: LengthPrediction | None, max_tokens: int, *, ignore_eos: bool, min_tokens: int, may_stop: bool
) -> LengthPrediction | None:
    """``prediction`` within what the client's sampling settings fix: with ``ignore_eos`` and no
    stop string or stop token (``may_stop`` false) the output is exactly ``max_tokens``; with
    ``min_tokens`` it is at least that many (both capped by ``max_tokens``)."""
    if ignore_eos and not may_stop and max_tokens > 0:
        return LengthPrediction(float(max_tokens), float(max_tokens))
    if prediction is None or min_tokens <= 0:
        return prediction
    floor = float(min(min_tokens, max_tokens)) if max_tokens > 0 else float(min_tokens)
    if prediction.median >= floor:
        return LengthPrediction(prediction.median, max(prediction.high, floor), prediction.scale)
    return LengthPrediction(floor, max(prediction.high, floor), 0.0)  # the client's floor, not the model's median


def cap_predictions(
    median: np.ndarray, high: np.ndarray, features: Sequence[RequestFeatures]
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`cap_prediction` over arrays, each row capped by its request's ``max_tokens``."""
    median = np.maximum(np.asarray(median, dtype=float), 1.0)
    high = np.maximum(np.asarray(high, dtype=float), median)
    limit = np.array([np.inf if f.max_tokens is None else float(f.max_tokens) for f in features])
    if len(limit):
        median = np.minimum(median, limit)
        high = np.minimum(high, limit)
    return median, high


def check_training(features: Sequence[RequestFeatures], outputs: Sequence[int]) -> np.ndarray:
    """``outputs`` as a float array; ValueError unless there is one finite count >= 1 per feature row."""
    y = np.asarray(outputs, dtype=float)
    if y.ndim != 1 or len(y) != len(features):
        raise ValueError(f"{len(features)} feature rows but {y.size} outputs")
    if len(y) == 0:
        raise ValueError("no training rows")
    if not np.all(np.isfinite(y)) or np.any(y < 1):
        raise ValueError("outputs must be finite and >= 1 token")
    return y
