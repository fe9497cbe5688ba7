"""The simulator agrees with a real-time run at low load: the same 2P2D config, workload and seed
through engine and gateway processes over HTTP, and through ``pdgate simulate``'s virtual time
(with the hop costs measured on the project's box, docs/simulate.md). benchmarks/simulate_fidelity.py
runs the full load sweep; this is its smallest point."""

from __future__ import annotations

import argparse
from pathlib import Path

from support.scripts import load_benchmark

from pdgate.loadgen.slo import SloSpec

fidelity = load_benchmark("simulate_fidelity")


def test_virtual_time_matches_real_time_at_low_load(tmp_path: Path) -> None:
    args = argparse.Namespace(
        requests=30,
        input_len="fixed:1024",
        output_len="fixed:64",
        seed=0,
        hop_ms=2.1,
        gateway_ms_per_kib=0.58,
    )
    row = fidelity.point("2p2d", 3.0, args, SloSpec.parse(["ttft=0.2,tpot=0.03"]), tmp_path)
    assert row["failed"] == {"real": 0, "virtual": 0}
    for key in ("tpot_p50", "tpot_p90"):
        assert abs(row[key]["diff"]) < 0.10, row  # the engines' step model: the same in both
    # TTFT carries the host's CPU per request, modelled by the hop costs; a shared CI host is noisy
    assert abs(row["ttft_p50"]["diff"]) < 0.25, row
    assert abs(row["attainment"]["real"] - row["attainment"]["virtual"]) <= 0.05, row
