"""Output-length evaluation protocols: within-model figures, leave-out splits, prequential replay."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from pdgate.scheduler.costmodel.datasets import LabeledRequest, prompt_key
from pdgate.scheduler.costmodel.features import RequestFeatures
from pdgate.scheduler.costmodel.length_evaluation import cross_validate, prequential, within_model
from pdgate.scheduler.costmodel.length_types import LengthPrediction

pytestmark = pytest.mark.unit


def row(prompt: str, model: str, output: int) -> LabeledRequest:
    features = RequestFeatures(prompt_tokens=len(prompt.split()), max_tokens=None, endpoint="chat", model=model)
    return LabeledRequest(features, output, {"instruction": prompt, "generator": model})


def grid(prompts: int, models: int) -> list[LabeledRequest]:
    """Every model answers every prompt; prompt p asks for about 10*(p+1) tokens, model m adds 1000*m."""
    return [row(f"prompt {p}", f"m{m}", 10 * (p + 1) + 1000 * m) for m in range(models) for p in range(prompts)]


class Recorder:
    """A predictor that remembers what it was trained on and what it was asked to predict."""

    fits: list[Recorder] = []

    def __init__(self) -> None:
        self.q_high = 0.9
        self.trained: list[RequestFeatures] = []
        self.asked: list[RequestFeatures] = []

    def fit(self, features: Sequence[RequestFeatures], outputs: Sequence[int]) -> Recorder:
        self.trained = list(features)
        Recorder.fits.append(self)
        return self

    def predict(self, f: RequestFeatures) -> LengthPrediction:
        return LengthPrediction(float(len(self.trained)), 2.0 * len(self.trained))

    def predict_many(self, features: Sequence[RequestFeatures]) -> tuple[np.ndarray, np.ndarray]:
        self.asked += features
        median = np.full(len(features), float(len(self.trained)))
        return median, median * 2


def test_within_model_ranking_is_not_fooled_by_verbose_models():
    rng = np.random.default_rng(0)
    models = ["short"] * 200 + ["verbose"] * 200
    actual = np.concatenate([rng.integers(10, 100, 200), rng.integers(500, 1000, 200)]).astype(float)
    knows_only_the_model = np.array([50.0] * 200 + [700.0] * 200) + rng.normal(0, 1, 400)
    report = within_model(knows_only_the_model, knows_only_the_model * 2, actual, models)
    from scipy import stats

    assert stats.spearmanr(knows_only_the_model, actual)[0] > 0.6  # pooled: looks good
    assert abs(report["mean_spearman"]) < 0.2  # within each model: no better than chance
    assert report["n_models"] == 2
    perfect = within_model(actual, actual * 2, actual, models)
    assert perfect["mean_spearman"] == pytest.approx(1.0)
    assert perfect["coverage_min"] == perfect["coverage_max"] == 1.0


def test_within_model_leaves_out_models_with_too_few_rows():
    actual = np.arange(1.0, 16.0)
    models = ["big"] * 12 + ["tiny"] * 3
    report = within_model(actual, actual, actual, models, min_rows=10)
    assert report["n_models"] == 1
    assert report["per_model"]["tiny"]["spearman"] is None
    assert report["per_model"]["tiny"]["n"] == 3


@pytest.mark.parametrize("protocol", ["prompts", "models", "both"])
def test_no_fold_trains_on_what_it_is_scored_on(protocol):
    rows = grid(prompts=20, models=5)
    prompt_of = {id(r.features): prompt_key(r) for r in rows}
    Recorder.fits = []
    predictions = cross_validate(rows, Recorder, protocol, folds=5, seed=3)
    assert len(Recorder.fits) == 5
    for fit in Recorder.fits:
        assert fit.asked
        if protocol in ("prompts", "both"):
            assert not {prompt_of[id(f)] for f in fit.asked} & {prompt_of[id(f)] for f in fit.trained}
        if protocol in ("models", "both"):
            assert not {f.model for f in fit.asked} & {f.model for f in fit.trained}
    assert len(set(predictions.index.tolist())) == len(predictions.index)  # each row predicted once at most
    assert predictions.actual.tolist() == [rows[i].output_tokens for i in predictions.index]
    if protocol == "both":
        assert 0 < len(predictions.index) < len(rows)  # only the diagonal folds
    else:
        assert len(predictions.index) == len(rows)


def test_leaving_sources_out_trains_each_fold_on_the_other_sources_only():
    rows = [
        LabeledRequest(r.features, r.output_tokens, r.record | {"dataset": source})
        for source, block in (("a", grid(6, 2)), ("b", grid(4, 2)), ("c", grid(3, 2)))
        for r in block
    ]
    source_of = {id(r.features): r.record["dataset"] for r in rows}
    Recorder.fits = []
    predictions = cross_validate(rows, Recorder, "sources", folds=5)  # one fold per source, whatever folds says
    assert len(Recorder.fits) == 3
    for fit in Recorder.fits:
        asked = {source_of[id(f)] for f in fit.asked}
        assert len(asked) == 1 and not asked & {source_of[id(f)] for f in fit.trained}
        assert len(fit.trained) + len(fit.asked) == len(rows)
    assert sorted(predictions.index.tolist()) == list(range(len(rows)))


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"dataset": "a"}] * 5 + [{}] * 5, "needs the field 'dataset' in every row"),
        ([{"dataset": "a"}] * 10, "at least 2 values of 'dataset'"),
    ],
)
def test_sources_that_cannot_be_left_out_are_an_error(records, message):
    rows = [LabeledRequest(r.features, r.output_tokens, record) for r, record in zip(grid(10, 1), records)]
    with pytest.raises(ValueError, match=message):
        cross_validate(rows, Recorder, "sources")


def test_too_few_groups_for_the_folds_is_an_error():
    with pytest.raises(ValueError, match="cannot make 5 folds"):
        cross_validate(grid(prompts=20, models=3), Recorder, "models", folds=5)


def test_prequential_predicts_each_request_before_learning_it():
    base = grid(prompts=4, models=1)
    stream = [row(f"new {i}", "m0", i + 1) for i in range(23)]
    Recorder.fits = []
    initial = Recorder().fit([r.features for r in base], [r.output_tokens for r in base])
    report = prequential(stream, Recorder, initial, base=base, refit_every=5, window=10, min_rows=2)
    # refits after rows 5, 10, 15, 20 (none after the last block): base + what was seen
    assert [len(f.trained) for f in Recorder.fits] == [4, 9, 14, 19, 24]
    assert [w["first"] for w in report["windows"]] == [0, 10, 20]
    assert [w["trained_on"] for w in report["windows"]] == [4, 14, 24]
    for fit in Recorder.fits:
        learned = {id(f) for f in fit.trained}
        seen = len(fit.trained) - len(base)
        assert all(id(r.features) in learned for r in stream[:seen])
        assert [id(f) for f in fit.asked] == [id(r.features) for r in stream[seen : seen + 5]]
    assert report["overall"]["n"] == 23
    assert "per_model" in report["overall"]["within_model"]
    assert "per_model" not in report["windows"][0]["within_model"]
