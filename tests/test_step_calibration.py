"""The decode step model's online correction (issue 17, item 6): a biased step fit is corrected
from completed requests within a few dozen of them, and a refit starts the correction over."""

from __future__ import annotations

import pytest

from pdgate.scheduler.costmodel.calibration import StepCalibration
from pdgate.scheduler.costmodel.latency import LatencyModel, PriorSpec
from pdgate.scheduler.costmodel.model import CostModel
from pdgate.scheduler.snapshot import InstanceView

pytestmark = pytest.mark.unit


def test_a_slower_engine_than_its_fit_is_corrected_and_a_refit_starts_over():
    calibration = StepCalibration()
    changes = [calibration.observe("g", 0.010, 0.0115) for _ in range(40)]  # the engine runs 15 % slower
    assert any(changes) and calibration.in_force["g"] == pytest.approx(1.15, rel=0.03)
    assert not calibration.observe("g", 0.010, 0.0115)  # settled: no new model for every request
    assert calibration.in_force.get("other") is None
    assert not calibration.observe("g", 0.0, 0.01) and not calibration.observe("g", 0.01, float("nan"))
    calibration.reset()
    assert calibration.in_force == {} and "g" in calibration.groups_seen


def test_a_scale_in_force_multiplies_the_groups_step_time_only():
    latency = LatencyModel.from_priors({"a": PriorSpec(), "b": PriorSpec()})
    base = CostModel(latency, None)  # type: ignore[arg-type]
    scaled = CostModel(latency, None, tpot_scale={"a": 1.2})  # type: ignore[arg-type]
    a = InstanceView(id="a0", url="http://a0", role="decode", model="m", cost_group="a")
    b = InstanceView(id="b0", url="http://b0", role="decode", model="m", cost_group="b")
    assert scaled.decode_step_s(a, 16, 16000) == pytest.approx(1.2 * base.decode_step_s(a, 16, 16000))
    assert scaled.decode_step_s(b, 16, 16000) == base.decode_step_s(b, 16, 16000)
    assert scaled.prefill_s(a, 1000) == base.prefill_s(a, 1000)


def test_the_stalls_of_colocated_prompts_are_not_learnt_as_a_slower_step():
    from pdgate.scheduler.costmodel.latency import observations_of

    def record(share: float) -> dict:
        placement = {
            "decode_group": "g",
            "decode_batch": 8,
            "decode_context_tokens": 8000,
            "decode_prefill_share": share,
        }
        return {"prompt_tokens": 100, "output_tokens": 50, "timing": {"tpot_s": 0.02}, "placement": placement}

    rows = observations_of([record(0.0), record(0.5)])["g"].decode_step
    assert [y for _, y in rows] == pytest.approx([0.02, 0.01])  # TPOT = step / (1 - share)
