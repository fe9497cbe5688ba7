"""`pdgate bench` end to end against a real simulated engine: what it measures agrees with the
engine's own metrics, and run / sweep / report write their tables, JSON, CSV and plots."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from support.fleet import metric

BENCH = [sys.executable, "-m", "pdgate.cli", "bench"]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=120, check=False)


def test_run_measures_what_the_engine_reports(sim_factory, tmp_path: Path) -> None:
    engine = sim_factory("--served-model-name", "m", "--time-scale", "1")  # engine time = wall time
    out = bench(
        "run",
        "--target",
        f"sim={engine.url}",
        "--model",
        "m",
        "--num-requests",
        "24",
        "--rate",
        "20",
        "--input-len",
        "uniform:40:200",
        "--output-len",
        "fixed:16",
        "--slo",
        "ttft=2,tpot=0.5",
        "--out",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SLO attainment" in out.stdout and "100.0%" in out.stdout
    run = json.loads((tmp_path / "sim.json").read_text())
    results = run["results"]
    assert len(results) == 24 and all(r["status"] == 200 and r["output_tokens"] == 16 for r in results)
    # the engine counted the same tokens the client measured
    assert metric(engine.url, "vllm:generation_tokens_total") == sum(r["output_tokens"] for r in results)
    assert metric(engine.url, "vllm:prompt_tokens_total") == sum(r["prompt_tokens"] for r in results)
    # and the client's TTFT is the engine's plus the network: never less, within a few ms on loopback
    engine_ttft = metric(engine.url, "vllm:time_to_first_token_seconds_sum") / 24
    client_ttft = sum(r["first_token_s"] - r["sent_s"] for r in results) / 24
    assert engine_ttft <= client_ttft <= engine_ttft + 0.02
    rows = list(csv.DictReader((tmp_path / "sim.csv").open()))
    assert len(rows) == 24 and {"ttft_s", "tpot_s", "met_slo"} <= set(rows[0])
    assert (tmp_path / "cdf.png").stat().st_size > 1000 and (tmp_path / "timeseries_sim.png").exists()

    report = bench("report", str(tmp_path / "sim.json"), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "goodput" in report.stdout and (tmp_path / "report" / "cdf.png").exists()


def test_sweep_finds_a_goodput_rate_and_plots_it(sim_factory, tmp_path: Path) -> None:
    engine = sim_factory("--served-model-name", "m", "--time-scale", "1")
    out = bench(
        "sweep",
        "--target",
        f"sim={engine.url}",
        "--model",
        "m",
        "--input-len",
        "fixed:64",
        "--output-len",
        "fixed:8",
        "--slo",
        "ttft=0.5,tpot=0.1",
        "--start-rate",
        "4",
        "--max-rate",
        "8",
        "--point-duration",
        "1.5",
        "--max-probes",
        "2",
        "--out",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "goodput rate 8.0 req/s" in out.stdout
    saved = json.loads((tmp_path / "sweep_sim.json").read_text())
    assert [p[0] for p in saved["run_meta"]["sweep"]["sim"]] == [4.0, 8.0]
    assert (tmp_path / "attainment.png").stat().st_size > 1000


def test_bad_arguments_are_explained(tmp_path: Path) -> None:
    out = bench("run", "--target", "http://127.0.0.1:9", "--model", "m", "--out", str(tmp_path))
    assert out.returncode == 2 and "needs --rate" in out.stdout
    out = bench("run", "--target", "http://127.0.0.1:9", "--model", "m", "--workload", "trace", "--rate", "1")
    assert out.returncode == 2 and "--trace FILE" in out.stdout
    slo = tmp_path / "slo.yaml"
    slo.write_text("default: {ttft: 0.5\n")
    out = bench("run", "--target", "http://127.0.0.1:9", "--model", "m", "--rate", "1", "--slo", str(slo))
    said = "".join(out.stdout.split())  # the terminal may wrap the message anywhere
    assert out.returncode == 2 and "slo.yaml:2:notvalidYAML" in said, out.stdout + out.stderr
