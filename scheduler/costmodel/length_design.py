"""Design matrices of the output-length model (:mod:`scheduler.costmodel.output_length`).

From a batch of :class:`~scheduler.costmodel.features.RequestFeatures`: the sparse hashed-text
matrix (:func:`text_matrix`, rescaled by :func:`text_scale`), the :data:`NUMERIC_COLUMNS` dense
columns (:func:`numeric_matrix`), one-hot categories (:func:`vocabulary`, :func:`one_hot`), the
per-model target offsets (:func:`group_offsets`) and the cross-validation groups
(:func:`prompt_groups`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from pdgate.scheduler.costmodel.cues import CUE_NAMES
from pdgate.scheduler.costmodel.features import RequestFeatures

__all__ = [
    "DENSE_COLUMNS",
    "NUMERIC_COLUMNS",
    "group_offsets",
    "numeric_matrix",
    "one_hot",
    "prompt_groups",
    "text_matrix",
    "text_scale",
    "vocabulary",
]

NUMERIC_COLUMNS = 5  # text score, log1p(prompt_tokens), log1p(max_tokens or 0), has max_tokens, is chat
DENSE_COLUMNS = NUMERIC_COLUMNS + len(CUE_NAMES)
"""The numeric columns, then one per cue (:data:`~scheduler.costmodel.cues.CUE_NAMES`)."""


def text_matrix(features: Sequence[RequestFeatures], n_features: int) -> sp.csr_matrix:
    """Rows of hashed n-gram weights rescaled so each row's smallest weight is 1 (see :func:`text_scale`);
    indices outside ``[0, n_features)`` are dropped."""
    indptr = np.zeros(len(features) + 1, dtype=np.int64)
    indices: list[int] = []
    data: list[float] = []
    for row, f in enumerate(features):
        text_hash = f.text_hash
        if text_hash:
            scale = text_scale(text_hash)
            for i, v in text_hash.items():
                if 0 <= i < n_features:
                    indices.append(i)
                    data.append(v * scale)
        indptr[row + 1] = len(indices)
    return sp.csr_matrix(
        (np.asarray(data, dtype=float), np.asarray(indices, dtype=np.int64), indptr), shape=(len(features), n_features)
    )


def text_scale(text_hash: Mapping[int, float]) -> float:
    """``1 / min(weight)``: undoes :func:`~scheduler.costmodel.features.hash_text`'s L2 normalisation
    (its rarest n-gram nearly always occurs once, weight ``1 / norm``), so an n-gram counts the
    same in a short and in a long prompt. A keyword then moves the score by its coefficient
    whatever the prompt's length, which is how instructions like "answer yes or no" behave."""
    smallest = min(text_hash.values())
    return 1.0 / smallest if smallest > 0 else 1.0


def numeric_matrix(features: Sequence[RequestFeatures], scores: np.ndarray) -> np.ndarray:
    """The :data:`DENSE_COLUMNS` dense columns: ``[text score, log1p(prompt_tokens),
    log1p(max_tokens or 0), has max_tokens, is chat]``, then the cues (zeros where a request has
    none; a shorter vector is padded, a longer one cut)."""
    out = np.zeros((len(features), DENSE_COLUMNS))
    out[:, 0] = scores
    out[:, 1] = np.log1p([f.prompt_tokens for f in features])
    out[:, 2] = np.log1p([0 if f.max_tokens is None else f.max_tokens for f in features])
    out[:, 3] = [0.0 if f.max_tokens is None else 1.0 for f in features]
    out[:, 4] = [1.0 if f.endpoint == "chat" else 0.0 for f in features]
    width = len(CUE_NAMES)
    for row, f in enumerate(features):
        if f.cues:
            cues = f.cues[:width]
            out[row, NUMERIC_COLUMNS : NUMERIC_COLUMNS + len(cues)] = cues
    return out


def vocabulary(values: Iterable[str], min_count: int, limit: int) -> list[str]:
    """The values seen at least ``min_count`` times, most frequent first (ties by value), at most ``limit``."""
    counts = Counter(values)
    frequent = [v for v, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
    return frequent[:limit]


def one_hot(values: Sequence[str | None], vocabulary: Sequence[str]) -> np.ndarray:
    """One column per ``vocabulary`` entry; values outside it (or ``None``) get an all-zero row."""
    out = np.zeros((len(values), len(vocabulary)))
    column = {v: i for i, v in enumerate(vocabulary)}
    for row, value in enumerate(values):
        i = column.get(value) if value is not None else None
        if i is not None:
            out[row, i] = 1.0
    return out


def group_offsets(values: Sequence[str], vocabulary: Sequence[str], y: np.ndarray) -> np.ndarray:
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


def prompt_groups(features: Sequence[RequestFeatures]) -> np.ndarray:
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
