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
   has max_tokens, is chat, the cues, one-hot model, one-hot tag]`` (the cues: what the prompt
   asks for, :mod:`scheduler.costmodel.cues`; models and tags seen in at least
   ``min_category_rows`` training rows; others get no offset);
3. a *prompt memory*: for every prompt (:func:`~scheduler.costmodel.features.prompt_digest`)
   answered in training, how far its answers ran from the median head, in log tokens; a prompt
   asked again is shifted by that much, shrunk by its count (:data:`MEMORY_PRIOR`). The heads
   are fitted for prompts not seen (stacked on out-of-fold text scores); the memory is what a
   repeated prompt (a template, a benchmark, a retried request) adds.

Predictions are ``expm1`` of the heads, then ``1 <= median <= high`` and both capped by
``max_tokens``. After :meth:`OutputLengthModel.fit` only plain floats, lists and dicts remain
(no scikit-learn object), so :meth:`OutputLengthModel.predict` is a few dictionary lookups and
one sparse dot product in Python (tens of microseconds), and a pickled model does not depend on
the scikit-learn version. With fewer than ``min_rows`` training rows the model predicts the
empirical quantiles of the outputs (also the fallback should a quantile fit fail), and
:meth:`OutputLengthModel.prior` predicts fixed defaults without any data.

:class:`GlobalMeanBaseline` and :class:`PromptLengthBaseline` share the interface, and
:func:`evaluate_lengths` scores any of them on held-out data; they live in
:mod:`scheduler.costmodel.length_baselines`, the prediction type and its capping rules in
:mod:`scheduler.costmodel.length_types`, the design matrices in
:mod:`scheduler.costmodel.length_design`, and this module re-exports their public names.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import mul
from typing import Any

import numpy as np
import scipy.sparse as sp

from pdgate.scheduler.costmodel.features import N_FEATURES, RequestFeatures
from pdgate.scheduler.costmodel.length_baselines import GlobalMeanBaseline as GlobalMeanBaseline
from pdgate.scheduler.costmodel.length_baselines import PromptLengthBaseline as PromptLengthBaseline
from pdgate.scheduler.costmodel.length_baselines import evaluate_lengths as evaluate_lengths
from pdgate.scheduler.costmodel.length_design import (
    DENSE_COLUMNS,
    group_offsets,
    numeric_matrix,
    one_hot,
    prompt_groups,
    text_matrix,
    text_scale,
    vocabulary,
)
from pdgate.scheduler.costmodel.length_types import DEFAULT_Q_HIGH as DEFAULT_Q_HIGH
from pdgate.scheduler.costmodel.length_types import LengthPrediction as LengthPrediction
from pdgate.scheduler.costmodel.length_types import LengthPredictor as LengthPredictor
from pdgate.scheduler.costmodel.length_types import cap_prediction, cap_predictions, check_training

MEMORY_PRIOR = 1.0
"""Pseudo-count of the prompt memory's shrinkage: a prompt answered once moves the prediction
half-way to its answer's length, one answered 9 times 90 %."""

RIDGE_ALPHAS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
"""Ridge penalties tried by grouped cross-validation (weights are ~1 per n-gram, so large ones win on
little or repetitive text: 1000 on alpaca_eval's 805 prompts x 38 models)."""


@dataclass(frozen=True)
class _Head:
    """One linear quantile head on ``log1p(output_tokens)``.

    It and :class:`OutputLengthModel` stay in this module: pickled models name their classes by it.
    """

    intercept: float
    numeric: tuple[float, ...]  # weights of the dense columns, in order (a model saved before cues: the first 5)
    model: Mapping[str, float]
    tag: Mapping[str, float]

    def value(
        self,
        score: float,
        lp: float,
        lm: float,
        has_max: float,
        chat: float,
        model: str,
        tag: str | None,
        cues: tuple[float, ...] = (),
    ) -> float:
        w = self.numeric
        z = self.intercept + w[0] * score + w[1] * lp + w[2] * lm + w[3] * has_max + w[4] * chat
        if cues and len(w) > 5:
            z += sum(map(mul, w[5:], cues))
        z += self.model.get(model, 0.0)
        if tag is not None:
            z += self.tag.get(tag, 0.0)
        return z

    def values(self, numeric: np.ndarray, models: Sequence[str], tags: Sequence[str | None]) -> np.ndarray:
        z = self.intercept + numeric[:, : len(self.numeric)] @ np.asarray(self.numeric)
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
        max_memory: int = 100_000,
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
        self.max_memory = int(max_memory)
        self.seed = int(seed)
        self._memory: dict[int, tuple[float, int]] = {}
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
        y_tokens = check_training(features, outputs)
        self.n_train = len(y_tokens)
        self.trained_at = time.time()
        self._heads = None
        self._memory = {}
        self._text_coef = []
        self._text_intercept = 0.0
        self.ridge_alpha = None
        self._constant = (float(np.quantile(y_tokens, 0.5)), float(np.quantile(y_tokens, self.q_high)))
        self.kind = "empirical"
        if len(y_tokens) < self.min_rows:
            return self
        y = np.log1p(y_tokens)
        models = vocabulary([f.model for f in features], self.min_category_rows, self.max_categories)
        text = text_matrix(features, self.n_features)
        scores = self._fit_text(
            text, y - group_offsets([f.model for f in features], models, y), prompt_groups(features)
        )
        tags = vocabulary([f.tag for f in features if f.tag is not None], self.min_category_rows, self.max_categories)
        design = np.hstack(
            [
                numeric_matrix(features, scores),
                one_hot([f.model for f in features], models),
                one_hot([f.tag for f in features], tags),
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
        self._memory = self._prompt_memory(features, y)
        return self

    def _prompt_memory(self, features: Sequence[RequestFeatures], y: np.ndarray) -> dict[int, tuple[float, int]]:
        """Per prompt digest seen in training: the mean of ``log1p(output)`` minus the median head's
        prediction for its answers, and how many answers. The most answered ``max_memory`` prompts."""
        self._memory = {}
        median, _ = self.predict_many(features)
        residual = y - np.log1p(median)
        sums: dict[int, list[float]] = {}
        for f, r in zip(features, residual.tolist()):
            if f.prompt_digest is not None:
                entry = sums.setdefault(f.prompt_digest, [0.0, 0.0])
                entry[0] += r
                entry[1] += 1.0
        kept = sorted(sums.items(), key=lambda kv: -kv[1][1])[: self.max_memory]
        return {digest: (total / count, int(count)) for digest, (total, count) in kept}

    def _memory_shift(self, digest: int | None) -> float:
        """How far (in log tokens) the answers to this prompt ran from the heads, shrunk by their
        count (``n / (n + MEMORY_PRIOR)``); 0 for a prompt never seen."""
        memory: dict[int, tuple[float, int]] | None = getattr(self, "_memory", None)  # absent from older models
        if digest is None or not memory:
            return 0.0
        found = memory.get(digest)
        if found is None:
            return 0.0
        mean, count = found
        return mean * count / (count + MEMORY_PRIOR)

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
        numeric = tuple(coef[:DENSE_COLUMNS])
        model_w = {m: w for m, w in zip(models, coef[DENSE_COLUMNS : DENSE_COLUMNS + len(models)]) if w != 0.0}
        tag_w = {t: w for t, w in zip(tags, coef[DENSE_COLUMNS + len(models) :]) if w != 0.0}
        return _Head(float(reg.intercept_), numeric, model_w, tag_w)

    # --- prediction ---------------------------------------------------------------------------

    def text_score(self, text_hash: Mapping[int, float]) -> float:
        """The text model's ``log1p(output_tokens)`` estimate from hashed n-grams alone."""
        coef = self._text_coef
        if not coef or not text_hash:
            return self._text_intercept
        scale = text_scale(text_hash)
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
            return cap_prediction(self._constant[0], self._constant[1], f.max_tokens)
        score = self.text_score(f.text_hash)
        lp = math.log1p(f.prompt_tokens)
        has_max = 0.0 if f.max_tokens is None else 1.0
        lm = math.log1p(f.max_tokens) if f.max_tokens is not None else 0.0
        chat = 1.0 if f.endpoint == "chat" else 0.0
        shift = self._memory_shift(f.prompt_digest)
        median = heads[0].value(score, lp, lm, has_max, chat, f.model, f.tag, f.cues) + shift
        high = heads[1].value(score, lp, lm, has_max, chat, f.model, f.tag, f.cues) + shift
        return cap_prediction(math.expm1(median), math.expm1(high), f.max_tokens)

    def predict_many(self, features: Sequence[RequestFeatures]) -> tuple[np.ndarray, np.ndarray]:
        """``(median, high)`` arrays for many requests; the same values as :meth:`predict`."""
        if self._heads is None:
            n = len(features)
            return cap_predictions(np.full(n, self._constant[0]), np.full(n, self._constant[1]), features)
        if self._text_coef:
            text = text_matrix(features, len(self._text_coef))
            scores = self._text_intercept + text @ np.asarray(self._text_coef)
        else:
            scores = np.full(len(features), self._text_intercept)
        numeric = numeric_matrix(features, scores)
        models = [f.model for f in features]
        tags = [f.tag for f in features]
        shift = np.array([self._memory_shift(f.prompt_digest) for f in features])
        median = self._heads[0].values(numeric, models, tags) + shift
        high = self._heads[1].values(numeric, models, tags) + shift
        return cap_predictions(np.expm1(median), np.expm1(high), features)

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
            out["memory_prompts"] = len(getattr(self, "_memory", {}))
        return out
