"""Output-length prediction: a median and a high quantile of a request's output tokens.

:class:`OutputLengthModel` is a two-stage model fitted on ``log1p(output_tokens)``:

1. a *text score*: ridge regression on the hashed prompt n-grams
   (:func:`scheduler.costmodel.features.hash_text`, each request's weights rescaled so that an
   n-gram seen once weighs 1 whatever the prompt's length), on the target minus the mean of the
   answering model (so the coefficients are about the prompt, not about which model answered).
   The ridge penalty is picked by grouped K-fold cross-validation (identical prompts stay in one
   fold), and the out-of-fold predictions are the score the second stage is fitted on
   (stacking), so that stage learns how far to trust the score on prompts it has not seen;
2. two linear *quantile heads* (median and ``q_high``; :class:`sklearn.linear_model.QuantileRegressor`,
   HiGHS interior point) over ``[text score, log1p(prompt_tokens), log1p(max_tokens or 0),
   has max_tokens, is chat, one-hot model, one-hot tag]`` (models and tags seen in at least
   ``min_category_rows`` training rows; others get no offset).

Predictions are ``expm1`` of the heads, then ``1 <= median <= high`` and both capped by
``max_tokens``. After :meth:`OutputLengthModel.fit` only plain floats, lists and dicts remain
(no scikit-learn object), so :meth:`OutputLengthModel.predict` is a few dictionary lookups and
one sparse dot product in Python (tens of microseconds), and a pickled model does not depend on
the scikit-learn version. With fewer than ``min_rows`` training rows the model predicts the
empirical quantiles of the outputs (also the fallback should a quantile fit fail), and
:meth:`OutputLengthModel.prior` predicts fixed defaults without any data.

:class:`GlobalMeanBaseline` and :class:`PromptLengthBaseline` share the interface, and
:func:`evaluate_lengths` scores any of them on held-out data.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import mul
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
from scipy import stats

from pdgate.scheduler.costmodel.features import N_FEATURES, RequestFeatures

DEFAULT_Q_HIGH = 0.9
RIDGE_ALPHAS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
"""Ridge penalties tried by grouped cross-validation (weights are ~1 per n-gram, so large ones win on
little or repetitive text: 1000 on alpaca_eval's 805 prompts x 38 models)."""
_NUMERIC = 5  # text score, log1p(prompt_tokens), log1p(max_tokens or 0), has max_tokens, is chat


@dataclass(frozen=True)
class LengthPrediction:
    """Predicted output tokens: ``1 <= median <= high``, both ``<= max_tokens`` when it is set.

    ``high`` is the model's ``q_high`` quantile (0.9 unless configured otherwise).
    """

    median: float
    high: float


class LengthPredictor(Protocol):
    """What evaluation needs from a model or baseline."""

    q_high: float

    def fit(self, features: Sequence[RequestFeatures], outputs: Sequence[int]) -> LengthPredictor: ...

    def predict(self, f: RequestFeatures) -> LengthPrediction: ...

    def predict_many(self, features: Sequence[RequestFeatures]) -> tuple[np.ndarray, np.ndarray]: ...


def _cap(median: float, high: float, max_tokens: int | None) -> LengthPrediction:
    median = max(median, 1.0)
    high = max(high, median)
    if max_tokens is not None:
        median = min(median, float(max_tokens))
        high = min(high, float(max_tokens))
    return LengthPrediction(median, high)


def _cap_many(
    median: np.ndarray, high: np.ndarray, features: Sequence[RequestFeatures]
) -> tuple[np.ndarray, np.ndarray]:
    median = np.maximum(np.asarray(median, dtype=float), 1.0)
    high = np.maximum(np.asarray(high, dtype=float), median)
    limit = np.array([np.inf if f.max_tokens is None else float(f.max_tokens) for f in features])
    if len(limit):
        median = np.minimum(median, limit)
        high = np.minimum(high, limit)
    return median, high


def _check_training(features: Sequence[RequestFeatures], outputs: Sequence[int]) -> np.ndarray:
    y = np.asarray(outputs, dtype=float)
    if y.ndim != 1 or len(y) != len(features):
        raise ValueError(f"{len(features)} feature rows but {y.size} outputs")
    if len(y) == 0:
        raise ValueError("no training rows")
    if not np.all(np.isfinite(y)) or np.any(y < 1):
        raise ValueError("outputs must be finite and >= 1 token")
    return y


@dataclass(frozen=True)
class _Head:
    """One linear quantile head on ``log1p(output_tokens)``."""

    intercept: float
    numeric: tuple[float, ...]  # weights of the _NUMERIC columns, in order
    model: Mapping[str, float]
    tag: Mapping[str, float]

    def value(
        self, score: float, lp: float, lm: float, has_max: float, chat: float, model: str, tag: str | None
    ) -> float:
        w = self.numeric
        z = self.intercept + w[0] * score + w[1] * lp + w[2] * lm + w[3] * has_max + w[4] * chat
        z += self.model.get(model, 0.0)
        if tag is not None:
            z += self.tag.get(tag, 0.0)
        return z

    def values(self, numeric: np.ndarray, models: Sequence[str], tags: Sequence[str | None]) -> np.ndarray:
        z = self.intercept + numeric @ np.asarray(self.numeric)
        z += np.array([self.model.get(m, 0.0) for m in models])
        z += np.array([0.0 if t is None else self.tag.get(t, 0.0) for t in tags])
        return np.asarray(z, dtype=float)


class OutputLengthModel:
    """Median and ``q_high`` quantile of output tokens (see the module docstring for the design).

    ``fit`` returns the model; ``n_train``, ``trained_at`` (UNIX time) and ``q_high`` record how
    it was trained. ``predict`` serves one request without scikit-learn; ``predict_many`` gives
    the same numbers as arrays, for evaluation.
    """

    def __init__(
        self,
        q_high: float = DEFAULT_Q_HIGH,
        *,
        n_features: int = N_FEATURES,
        min_rows: int = 20,
        ridge_alphas: Sequence[float] = RIDGE_ALPHAS,
        folds: int = 5,
        quantile_alpha: float = 1e-4,
        max_quantile_rows: int = 20_000,
        min_category_rows: int = 10,
        max_categories: int = 64,
        seed: int = 0,
    ) -> None:
        if not 0.5 < q_high < 1.0:
            raise ValueError("q_high must be in (0.5, 1)")
        self.q_high = float(q_high)
        self.n_features = int(n_features)
        self.min_rows = int(min_rows)
        self.ridge_alphas = tuple(float(a) for a in ridge_alphas)
        self.folds = int(folds)
        self.quantile_alpha = float(quantile_alpha)
        self.max_quantile_rows = int(max_quantile_rows)
        self.min_category_rows = int(min_category_rows)
        self.max_categories = int(max_categories)
        self.seed = int(seed)
        self.n_train = 0
        self.trained_at: float | None = None
        self.kind = "prior"
        self.ridge_alpha: float | None = None
        self._constant = (128.0, 512.0)
        self._text_intercept = 0.0
        self._text_coef: list[float] = []
        self._heads: tuple[_Head, _Head] | None = None

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def prior(
        cls, default_median: float = 128, default_high: float = 512, q_high: float = DEFAULT_Q_HIGH
    ) -> OutputLengthModel:
        """A cold-start model: ``default_median`` / ``default_high`` for every request (capped by max_tokens)."""
        if not 1 <= default_median <= default_high:
            raise ValueError("need 1 <= default_median <= default_high")
        model = cls(q_high)
        model._constant = (float(default_median), float(default_high))
        return model

    def fit(self, features: Sequence[RequestFeatures], outputs: Sequence[int]) -> OutputLengthModel:
        """Fit on ``features`` and their observed output token counts (each >= 1); returns ``self``."""
        y_tokens = _check_training(features, outputs)
        self.n_train = len(y_tokens)
        self.trained_at = time.time()
        self._heads = None
        self._text_coef = []
        self._text_intercept = 0.0
        self.ridge_alpha = None
        self._constant = (float(np.quantile(y_tokens, 0.5)), float(np.quantile(y_tokens, self.q_high)))
        self.kind = "empirical"
        if len(y_tokens) < self.min_rows:
            return self
        y = np.log1p(y_tokens)
        models = _vocabulary([f.model for f in features], self.min_category_rows, self.max_categories)
        text = _text_matrix(features, self.n_features)
        scores = self._fit_text(
            text, y - _group_offsets([f.model for f in features], models, y), _prompt_groups(features)
        )
        tags = _vocabulary([f.tag for f in features if f.tag is not None], self.min_category_rows, self.max_categories)
        design = np.hstack(
            [
                _numeric(features, scores),
                _one_hot([f.model for f in features], models),
                _one_hot([f.tag for f in features], tags),
            ]
        )
        rows = np.arange(len(y))
        if len(rows) > self.max_quantile_rows:
            rows = np.sort(np.random.default_rng(self.seed).choice(rows, self.max_quantile_rows, replace=False))
        try:
            heads = tuple(self._fit_head(design[rows], y[rows], q, models, tags) for q in (0.5, self.q_high))
        except ValueError:  # a failed LP: keep the empirical quantiles (describe() says kind "empirical")
            return self
        self._heads = (heads[0], heads[1])
        self.kind = "linear"
        return self

    def _fit_text(self, text: sp.csr_matrix, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """Fit the ridge text model; returns the out-of-fold text score of every training row."""
        from sklearn.linear_model import Ridge
        from sklearn.model_selection import GroupKFold

        if text.nnz == 0 or len(np.unique(groups)) < self.folds:
            return np.zeros(len(y))
        best: tuple[float, float, np.ndarray] | None = None
        splits = list(GroupKFold(n_splits=self.folds).split(text, y, groups))
        for alpha in self.ridge_alphas:
            oof = np.empty(len(y))
            for train, test in splits:
                oof[test] = Ridge(alpha=alpha).fit(text[train], y[train]).predict(text[test])
            error = float(np.mean((oof - y) ** 2))
            if best is None or error < best[0]:
                best = (error, alpha, oof)
        assert best is not None
        _, alpha, oof = best
        final = Ridge(alpha=alpha).fit(text, y)
        self.ridge_alpha = alpha
        self._text_intercept = float(final.intercept_)
        self._text_coef = [float(c) for c in final.coef_]
        return oof

    def _fit_head(
        self, design: np.ndarray, y: np.ndarray, q: float, models: Sequence[str], tags: Sequence[str]
    ) -> _Head:
        from sklearn.linear_model import QuantileRegressor

        reg = QuantileRegressor(quantile=q, alpha=self.quantile_alpha, solver="highs-ipm").fit(design, y)
        if not (np.all(np.isfinite(reg.coef_)) and math.isfinite(reg.intercept_)):
            raise ValueError(f"the q={q} quantile regression did not converge")
        coef = [float(c) for c in reg.coef_]
        numeric = tuple(coef[:_NUMERIC])
        model_w = {m: w for m, w in zip(models, coef[_NUMERIC : _NUMERIC + len(models)]) if w != 0.0}
        tag_w = {t: w for t, w in zip(tags, coef[_NUMERIC + len(models) :]) if w != 0.0}
        return _Head(float(reg.intercept_), numeric, model_w, tag_w)

    # --- prediction ---------------------------------------------------------------------------

    def text_score(self, text_hash: Mapping[int, float]) -> float:
        """The text model's ``log1p(output_tokens)`` estimate from hashed n-grams alone."""
        coef = self._text_coef
        if not coef or not text_hash:
            return self._text_intercept
        scale = _text_scale(text_hash)
        try:  # C-level loop; an index outside this model's hash space is an IndexError
            total = sum(map(mul, map(coef.__getitem__, text_hash.keys()), text_hash.values()))
        except IndexError:
            n = len(coef)
            total = sum(coef[i] * v for i, v in text_hash.items() if 0 <= i < n)
        return float(self._text_intercept + total * scale)

    def predict(self, f: RequestFeatures) -> LengthPrediction:
        """Median and high quantile of the output tokens of one request (no scikit-learn call)."""
        heads = self._heads
        if heads is None:
            return _cap(self._constant[0], self._constant[1], f.max_tokens)
        score = self.text_score(f.text_hash)
        lp = math.log1p(f.prompt_tokens)
        has_max = 0.0 if f.max_tokens is None else 1.0
        lm = math.log1p(f.max_tokens) if f.max_tokens is not None else 0.0
        chat = 1.0 if f.endpoint == "chat" else 0.0
        median = heads[0].value(score, lp, lm, has_max, chat, f.model, f.tag)
        high = heads[1].value(score, lp, lm, has_max, chat, f.model, f.tag)
        return _cap(math.expm1(median), math.expm1(high), f.max_tokens)

    def predict_many(self, features: Sequence[RequestFeatures]) -> tuple[np.ndarray, np.ndarray]:
        """``(median, high)`` arrays for many requests; the same values as :meth:`predict`."""
        if self._heads is None:
            n = len(features)
            return _cap_many(np.full(n, self._constant[0]), np.full(n, self._constant[1]), features)
        if self._text_coef:
            text = _text_matrix(features, len(self._text_coef))
            scores = self._text_intercept + text @ np.asarray(self._text_coef)
        else:
            scores = np.full(len(features), self._text_intercept)
        numeric = _numeric(features, scores)
        models = [f.model for f in features]
        tags = [f.tag for f in features]
        median = self._heads[0].values(numeric, models, tags)
        high = self._heads[1].values(numeric, models, tags)
        return _cap_many(np.expm1(median), np.expm1(high), features)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary of what was trained (for model metadata)."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "q_high": self.q_high,
            "n_train": self.n_train,
            "trained_at": self.trained_at,
        }
        if self.kind != "linear":
            out["constant"] = {"median": self._constant[0], "high": self._constant[1]}
        else:
            assert self._heads is not None
            out["ridge_alpha"] = self.ridge_alpha
            out["text_features"] = sum(1 for c in self._text_coef if c != 0.0)
            out["models"] = sorted(set(self._heads[0].model) | set(self._heads[1].model))
            out["tags"] = sorted(set(self._heads[0].tag) | set(self._heads[1].tag))
        return out


# --- baselines --------------------------------------------------------------------------------


class GlobalMeanBaseline:
    """Every request gets the training mean (median) and the training ``q_high`` quantile (high),
    capped by its max_tokens like the model's predictions."""

    def __init__(self, q_high: float = DEFAULT_Q_HIGH) -> None:
        self.q_high = float(q_high)
        self.mean = 1.0
        self.high = 1.0
        self.n_train = 0

    def fit(self, features: Sequence[RequestFeatures], outputs: Sequence[int]) -> GlobalMeanBaseline:
        y = _check_training(features, outputs)
        self.mean = float(np.mean(y))
        self.high = float(np.quantile(y, self.q_high))
        self.n_train = len(y)
        return self

    def predict(self, f: RequestFeatures) -> LengthPrediction:
        return _cap(self.mean, self.high, f.max_tokens)

    def predict_many(self, features: Sequence[RequestFeatures]) -> tuple[np.ndarray, np.ndarray]:
        n = len(features)
        return _cap_many(np.full(n, self.mean), np.full(n, self.high), features)


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
        y = _check_training(features, outputs)
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
        return _cap(float(self.medians[b]), float(self.highs[b]), f.max_tokens)

    def predict_many(self, features: Sequence[RequestFeatures]) -> tuple[np.ndarray, np.ndarray]:
        which = np.searchsorted(self.edges, np.log1p([f.prompt_tokens for f in features]), side="right")
        return _cap_many(self.medians[which], self.highs[which], features)


# --- evaluation -------------------------------------------------------------------------------


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
    out["spearman"] = _correlation(stats.spearmanr, median, actual)
    out["kendall"] = _correlation(stats.kendalltau, median, actual)
    out["mae"] = float(np.mean(np.abs(median - actual)))
    out["within_2x"] = float(np.mean((median >= actual / 2) & (median <= actual * 2)))
    out["coverage_high"] = float(np.mean(actual <= high))
    out["mean_high_ratio"] = float(np.mean(high / np.maximum(actual, 1.0)))
    return out


def _correlation(fn: Any, a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    value = float(fn(a, b)[0])
    return value if math.isfinite(value) else None


# --- design matrices --------------------------------------------------------------------------


def _text_matrix(features: Sequence[RequestFeatures], n_features: int) -> sp.csr_matrix:
    """Rows of hashed n-gram weights rescaled so each row's smallest weight is 1 (see :func:`_text_scale`);
    indices outside ``[0, n_features)`` are dropped."""
    indptr = np.zeros(len(features) + 1, dtype=np.int64)
    indices: list[int] = []
    data: list[float] = []
    for row, f in enumerate(features):
        text_hash = f.text_hash
        if text_hash:
            scale = _text_scale(text_hash)
            for i, v in text_hash.items():
                if 0 <= i < n_features:
                    indices.append(i)
                    data.append(v * scale)
        indptr[row + 1] = len(indices)
    return sp.csr_matrix(
        (np.asarray(data, dtype=float), np.asarray(indices, dtype=np.int64), indptr), shape=(len(features), n_features)
    )


def _text_scale(text_hash: Mapping[int, float]) -> float:
    """``1 / min(weight)``: undoes :func:`~scheduler.costmodel.features.hash_text`'s L2 normalisation
    (its rarest n-gram nearly always occurs once, weight ``1 / norm``), so an n-gram counts the
    same in a short and in a long prompt. A keyword then moves the score by its coefficient
    whatever the prompt's length, which is how instructions like "answer yes or no" behave."""
    smallest = min(text_hash.values())
    return 1.0 / smallest if smallest > 0 else 1.0


def _numeric(features: Sequence[RequestFeatures], scores: np.ndarray) -> np.ndarray:
    out = np.empty((len(features), _NUMERIC))
    out[:, 0] = scores
    out[:, 1] = np.log1p([f.prompt_tokens for f in features])
    out[:, 2] = np.log1p([0 if f.max_tokens is None else f.max_tokens for f in features])
    out[:, 3] = [0.0 if f.max_tokens is None else 1.0 for f in features]
    out[:, 4] = [1.0 if f.endpoint == "chat" else 0.0 for f in features]
    return out


def _vocabulary(values: Iterable[str], min_count: int, limit: int) -> list[str]:
    counts = Counter(values)
    frequent = [v for v, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
    return frequent[:limit]


def _one_hot(values: Sequence[str | None], vocabulary: Sequence[str]) -> np.ndarray:
    out = np.zeros((len(values), len(vocabulary)))
    column = {v: i for i, v in enumerate(vocabulary)}
    for row, value in enumerate(values):
        i = column.get(value) if value is not None else None
        if i is not None:
            out[row, i] = 1.0
    return out


def _group_offsets(values: Sequence[str], vocabulary: Sequence[str], y: np.ndarray) -> np.ndarray:
    """Per row, the mean of ``y`` over rows with the same value (minus the overall mean); 0 for
    values outside ``vocabulary``. Taking it out of the text model's target keeps the text
    coefficients about the prompt, not about which model answered it."""
    known = set(vocabulary)
    sums: dict[str, list[float]] = {}
    for value, target in zip(values, y):
        if value in known:
            entry = sums.setdefault(value, [0.0, 0.0])
            entry[0] += target
            entry[1] += 1.0
    overall = float(np.mean(y))
    means = {value: total / count - overall for value, (total, count) in sums.items()}
    return np.array([means.get(value, 0.0) for value in values])


def _prompt_groups(features: Sequence[RequestFeatures]) -> np.ndarray:
    """Group ids for cross-validation: requests with the same hashed text share a group; requests
    without text are each their own group."""
    ids: dict[tuple[tuple[int, float], ...], int] = {}
    out = np.empty(len(features), dtype=np.int64)
    for row, f in enumerate(features):
        if not f.text_hash:
            out[row] = -1 - row
            continue
        key = tuple(sorted((i, round(v, 9)) for i, v in f.text_hash.items()))
        out[row] = ids.setdefault(key, len(ids))
    return out
