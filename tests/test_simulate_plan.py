"""``pdgate simulate plan``: the search finds the smallest fleet of each shape meeting the goal
(checked against a stand-in whose answer is known), and the command runs it over simulations,
and draws one fleet's goodput curve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdgate.simulate.plan import Evaluation, Shape, smallest_fleets


def _capacity_model(shape: Shape) -> Evaluation:
    """A fleet serves 10 req/s per colocated or flex instance; PD 12 per decode instance, as long as
    there is a prefill instance per three decode ones."""
    if shape.family == "pd":
        capacity = 12.0 * shape.decode if 3 * shape.prefill >= shape.decode else 12.0 * 3 * shape.prefill
    else:
        capacity = 10.0 * shape.total
    rate = 95.0
    served = min(rate, capacity)
    return Evaluation(shape, rate, served / rate, served)


def test_the_search_finds_the_smallest_fleet_of_each_family() -> None:
    tried: list[Shape] = []

    def evaluate(shape: Shape) -> Evaluation:
        tried.append(shape)
        return _capacity_model(shape)

    plan = smallest_fleets(evaluate, rate=95.0, target_pct=99.0, max_instances=64)
    assert plan.smallest["colocated"] is not None and plan.smallest["colocated"].shape == Shape(colocated=10)
    assert plan.smallest["flex"] is not None and plan.smallest["flex"].shape == Shape(flex=10)
    pd = plan.smallest["pd"]
    assert pd is not None and pd.shape == Shape(prefill=3, decode=8)  # 11 instances: 96 req/s
    assert plan.best is not None and plan.best.shape == Shape(colocated=10)
    assert len(tried) == len(set(tried)) < 40  # each shape once; doubling then bisecting, not every count
    assert all(e.goodput_per_instance == pytest.approx(e.goodput_rps / e.shape.total) for e in plan.evaluations)


def test_a_goal_no_fleet_meets_is_reported_as_none() -> None:
    plan = smallest_fleets(_capacity_model, rate=95.0, target_pct=99.0, max_instances=4, families=["colocated"])
    assert plan.smallest == {"colocated": None} and plan.best is None
    with pytest.raises(ValueError, match="unknown fleet family"):
        smallest_fleets(_capacity_model, rate=1.0, target_pct=90.0, max_instances=4, families=["gpu"])


def _plan(
    tmp_path: Path, *extra: str, slo: str = "ttft=0.3,tpot=0.05", n: int = 40
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pdgate.cli", "simulate", "plan", "--num-requests", str(n)]
    cmd += ["--input-len", "fixed:256", "--output-len", "fixed:16", "--slo", slo]
    cmd += ["--out", str(tmp_path), "--no-plots", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_plan_reports_the_smallest_fleets_from_simulations(tmp_path: Path) -> None:
    proc = _plan(tmp_path, "--rate", "8", "--families", "pd,colocated", "--max-instances", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["smallest"] == {"pd": "1P1D", "colocated": "1C"}  # light load: the smallest of each
    assert doc["best"] == "1C"
    assert {e["family"] for e in doc["evaluations"]} == {"pd", "colocated"}
    assert all(0.9 <= e["attainment"] <= 1.0 for e in doc["evaluations"])


def test_sweep_rate_draws_one_fleets_curve_and_bad_input_is_refused(tmp_path: Path) -> None:
    proc = _plan(tmp_path, "--sweep-rate", "2,400", "--instances", "2", slo="ttft=0.1,tpot=0.012", n=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert doc["shape"] == "1P1D"
    low, high = doc["points"]
    assert low["attainment"] >= 0.9 > high["attainment"]  # 400 req/s swamps one pair
    assert "highest rate meeting the goal: 2.0 req/s" in proc.stdout
    refused = _plan(tmp_path)
    assert refused.returncode == 2 and "give --rate" in refused.stdout
