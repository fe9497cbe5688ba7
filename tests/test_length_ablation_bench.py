"""benchmarks/length_ablation.py: its arms are valid gateway configs, and a small run over real
alpaca_eval prompts (../shared/data) prints every arm's figures and writes them as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.scripts import BENCHMARKS, load_benchmark

bench = load_benchmark("length_ablation")


def test_every_arm_is_a_gateway_config_with_its_length_source(tmp_path):
    from pdgate.loadgen.slo import SloSpec

    for arm, (source, _) in bench.ARMS.items():
        config = bench.config_for(source, tmp_path, SloSpec.parse("ttft=1,tpot=0.012"))
        assert config.cost_model.length_source == source, arm
        assert config.cost_model.dir == str(tmp_path) and config.cost_model.refit_interval_s >= 1e9
        assert config.slo.default.tpot_ms == pytest.approx(12.0)


@pytest.mark.skipif(not bench.ALPACA.is_dir(), reason="needs ../shared/data/alpaca_eval")
def test_a_small_run_prints_and_writes_every_arm(tmp_path):
    out = tmp_path / "ablation.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "length_ablation.py"), "--requests", "40", "--rates", "2,4",
         "--train-rows", "1500", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report["arms"]) == ["true lengths", "length model", "prompt length", "none"]
    assert report["requests"] == 40
    for arm, figures in report["arms"].items():
        assert [p["rate"] for p in figures["probes"]] == [2.0, 4.0], arm
        assert all(0 <= p["attainment_pct"] <= 100 for p in figures["probes"])
        assert f"| {arm} |" in result.stdout
    assert report["arms"]["true lengths"]["probes"][0]["attainment_pct"] == 100.0  # 2 req/s: an idle fleet
