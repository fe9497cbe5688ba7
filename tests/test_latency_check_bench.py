"""benchmarks/latency_check.py: the error of every latency prediction per group, from the
gateway's own request log of a small virtual-time run."""

from __future__ import annotations

import argparse

import pytest
from support.scripts import load_benchmark

bench = load_benchmark("latency_check")


def test_errors_are_per_quantity_and_group():
    record = {
        "timing": {"prefill_s": 0.12, "handoff_s": 0.03, "ttft_s": 0.2, "tpot_s": 0.01},
        "predicted": {"wait_s": 0.02, "prefill_s": 0.08, "handoff_s": 0.03, "ttft_s": 0.25, "tpot_s": 0.01},
        "placement": {"prefill_group": "p", "decode_group": "d"},
    }
    figures = bench.errors([record, {**record, "timing": {**record["timing"], "tpot_s": None}}])
    assert figures["prefill"]["p"] == {"mape_pct": 16.7, "median_ratio": 1.2, "n": 2}  # predicted wait + compute: 0.1
    assert figures["ttft"]["p"]["median_ratio"] == pytest.approx(0.8)
    assert figures["handoff"]["d"]["mape_pct"] == 0.0
    assert figures["tpot"]["d"]["n"] == 1  # a request without a TPOT is left out


def test_a_point_measures_every_quantity():
    args = argparse.Namespace(requests=30, output=32, refits=False, seed=0)
    figures = bench.point(512, 8.0, args)
    assert figures["ok"] == 30 and figures["records"] == 30
    assert set(figures["errors"]) == {"prefill", "handoff", "ttft", "tpot"}
    for quantity, groups in figures["errors"].items():
        for group, e in groups.items():
            assert e["n"] > 0 and e["mape_pct"] < 60, (quantity, group, e)
