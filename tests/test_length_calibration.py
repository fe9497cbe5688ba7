"""The output-length model's online correction per answering model (issue 19): a model that says
more (or less) than the fit expects is corrected within a few dozen requests, requests cut at
max_tokens teach nothing, and a refit starts the correction over."""

from __future__ import annotations

import pytest

from pdgate.scheduler.costmodel.calibration import LengthCalibration
from pdgate.scheduler.costmodel.features import RequestFeatures
from pdgate.scheduler.costmodel.latency import LatencyModel
from pdgate.scheduler.costmodel.model import CostModel
from pdgate.scheduler.costmodel.output_length import OutputLengthModel

pytestmark = pytest.mark.unit


def test_a_verbose_model_is_learnt_from_the_medians_it_was_served_with():
    calibration = LengthCalibration()
    model = CostModel(LatencyModel(), OutputLengthModel.prior(default_median=100, default_high=400))
    f = RequestFeatures(20, None, "chat", "verbose", None, {})
    for _ in range(40):  # the model answers twice what the fit predicts
        served = model.predict_output(f)
        if calibration.observe_output("verbose", served.median, 200, None, served.scale):
            model = CostModel(model.latency, model.output, length_scale=dict(calibration.in_force))
    assert calibration.in_force["verbose"] == pytest.approx(2.0, rel=0.05)
    prediction = model.predict_output(f)
    assert prediction.median == pytest.approx(200, rel=0.05) and prediction.high == pytest.approx(800, rel=0.05)
    other = RequestFeatures(20, None, "chat", "terse", None, {})
    assert model.predict_output(other).median == 100  # per answering model
    capped = RequestFeatures(20, 150, "chat", "verbose", None, {})
    assert model.predict_output(capped).median == 150 and model.predict_output(capped).high == 150


def test_requests_cut_at_max_tokens_teach_nothing_and_a_refit_starts_over():
    calibration = LengthCalibration()
    assert not calibration.observe_output("m", 100.0, 256, 256)  # stopped by max_tokens: its natural length is unknown
    assert not calibration.observe_output("m", 256.0, 40, 256)  # the served median was the cap
    assert calibration.in_force == {} and calibration.keys_seen == set()
    for _ in range(30):
        scale = calibration.in_force.get("m", 1.0)
        calibration.observe_output("m", 100.0 * scale, 50, 1024, scale)
    assert calibration.in_force["m"] == pytest.approx(0.5, rel=0.1)
    calibration.reset()
    assert calibration.in_force == {} and "m" in calibration.keys_seen


def test_answers_to_requests_served_before_the_scale_moved_do_not_move_it_again():
    """A burst: every request is served before the first answer comes back (the answers of a
    decode batch arrive together, seconds later). Each is judged against the median it was
    served with, so the scale settles at the model's verbosity; judging them against the scale
    in force at their end fed its every move back into it (a 10x swing within one burst)."""
    calibration = LengthCalibration()
    model = CostModel(LatencyModel(), OutputLengthModel.prior(default_median=100, default_high=400))
    f = RequestFeatures(20, None, "chat", "verbose", None, {})
    for _ in range(3):  # three bursts of 60, each served at the scale of its start
        served = [model.predict_output(f) for _ in range(60)]
        for prediction in served:
            calibration.observe_output("verbose", prediction.median, 200, None, prediction.scale)
        model = CostModel(model.latency, model.output, length_scale=dict(calibration.in_force))
        assert 1.0 <= calibration.in_force["verbose"] <= 2.1
    assert calibration.in_force["verbose"] == pytest.approx(2.0, rel=0.05)


async def test_the_gateways_cost_service_learns_a_models_verbosity_from_completed_requests():
    from pdgate.gateway.config import CostModelConfig
    from pdgate.gateway.costs import CostModelService

    service = CostModelService(CostModelConfig(), {})
    await service.start()
    try:
        f = RequestFeatures(30, 4096, "chat", "chatty", None, {})
        for i in range(40):
            served = service.current.predict_output(f)
            record = {"v": 1, "request_id": f"r{i}", **f.to_record(), "output_tokens": round(3 * 128)}
            record["predicted"] = {"output_median": served.median, "output_scale": served.scale}  # as placement logs it
            service.observe(record)
        assert service.current.length_scale["chatty"] == pytest.approx(
            3 * 128 / service.current.output.predict(f).median, rel=0.1
        )
        fixed = {**record, "length_fixed": True, "model": "benchmark", "output_tokens": 4000}
        service.observe(fixed)  # ignore_eos: the client fixed the length, nothing to learn
        assert "benchmark" not in service.current.length_scale
        for i in range(40):  # answers predicted by an earlier model (before a refit): nothing to learn
            stale = {**record, "request_id": f"s{i}", "model": "stale", "cost_model": "v0001", "output_tokens": 900}
            service.observe(stale)
        assert "stale" not in service.current.length_scale
    finally:
        await service.close()


def test_a_median_raised_by_min_tokens_teaches_nothing():
    from pdgate.scheduler.costmodel.length_types import LengthPrediction, client_bounds

    served = LengthPrediction(100.0, 400.0, 1.5)
    floored = client_bounds(served, 1000, ignore_eos=False, min_tokens=300, may_stop=False)
    assert floored == LengthPrediction(300.0, 400.0, 0.0)  # the client's floor, not the model's median
    assert client_bounds(served, 1000, ignore_eos=False, min_tokens=50, may_stop=False) == served
    calibration = LengthCalibration()
    for _ in range(40):
        calibration.observe_output("m", floored.median, 310, 1000, floored.scale)
    assert calibration.in_force == {} and calibration.keys_seen == set()


class NoInstances:
    """What intake asks of the cluster, for a model with no instances: the prompt's block hashes
    (none: no instance has a hash scheme) and its instances."""

    def for_model(self, model: str) -> list:
        return []

    def prompt_hashes(self, model: str, token_ids, *, lora=None, cache_salt=None):
        from pdgate.gateway.hash_schemes import PromptHashes

        return PromptHashes(token_ids, lora, cache_salt)


@pytest.mark.parametrize(
    ("source", "expected"),
    [("client", (300.0, 300.0)), ("model", (128.0, 512.0)), ("none", None)],
)
async def test_length_source_decides_what_the_scheduler_takes_the_length_to_be(source, expected):
    import json

    from pdgate.common.tokenizer import load_tokenizer
    from pdgate.gateway.config import GatewayConfig
    from pdgate.gateway.costs import CostModelService
    from pdgate.gateway.intake import Intake
    from pdgate.gateway.launcher import default_config_path

    config = GatewayConfig.load(str(default_config_path()))
    config = config.model_copy(
        update={"cost_model": config.cost_model.model_copy(update={"length_source": source, "dir": None})}
    )
    model = config.models[0].name
    costs = CostModelService(config.cost_model, {})
    await costs.start()  # the prior: median 128, high 512
    try:
        intake = Intake(config, NoInstances(), {model: load_tokenizer("builtin")}, costs)  # type: ignore[arg-type]
        body = {"model": model, "messages": [{"role": "user", "content": "Write an essay"}], "max_tokens": 300}
        routed = intake.parse(json.dumps(body | {"ignore_eos": True}).encode(), "chat", None)
        output = routed.info.output
        assert (None if output is None else (output.median, output.high)) == expected
        assert routed.features is not None and routed.features.cues  # recorded for the refits whatever the source
        blind = source == "model"
        assert routed.features.max_tokens == (None if blind else 300)
        assert routed.features.length_fixed is (not blind)
    finally:
        await costs.close()
