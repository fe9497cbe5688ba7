"""`pdgate bench` end to end against a real simulated engine: what it measures agrees with the
engine's own metrics, and run / sweep / report write their tables, JSON, CSV and plots. Also the
cheap parts of the scale-out benchmark scripts (benchmarks/worker_scaling.py, replica_goodput.py):
their --help, the stub engine's framing, the ratios and the replica set-ups' configs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import httptools
import pytest
from support.fleet import metric
from support.scripts import BENCHMARKS, load_benchmark

from pdgate.gateway.config import GatewayConfig

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


def test_scale_out_benchmarks_explain_themselves() -> None:
    for name in ("worker_scaling", "replica_goodput"):
        out = subprocess.run(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0 and "--out" in out.stdout, out.stdout + out.stderr


def test_stub_engine_replays_a_stream_one_event_per_chunk() -> None:
    raw = load_benchmark("_raw_http")
    body = b'data: {"a": 1}\n\ndata: {"a": 2}\n\ndata: [DONE]\n\n'
    pieces = raw.render(200, "text/event-stream", body, True)
    assert len(pieces) == 3 and b"Transfer-Encoding: chunked" in pieces[0]
    got: list[bytes] = []

    class Sink:
        def on_body(self, data: bytes) -> None:
            got.append(data)

    httptools.HttpResponseParser(Sink()).feed_data(b"".join(pieces))
    assert b"".join(got) == body
    [plain] = raw.render(200, "application/json", b'{"x": 1}', False)
    assert plain.endswith(b'Content-Length: 8\r\n\r\n{"x": 1}')


def test_worker_scaling_ratio_is_of_medians_and_pairs_rounds() -> None:
    ws = load_benchmark("worker_scaling")
    rates = {1: [100.0, 90.0, 110.0], 2: [150.0, 180.0, 170.0]}
    runs = [
        {"kind": "nonstream", "workers": n, "round": i, "req_s": rate}
        for n, values in rates.items()
        for i, rate in enumerate(values)
    ]
    summary = ws.summarize(runs, [1, 2])
    assert "stream" not in summary  # no stream runs, no stream ratio
    ratio = summary["nonstream"]["ratios"][2]
    assert ratio["median"] == pytest.approx(170 / 100)
    assert ratio["by_round"] == pytest.approx([1.5, 2.0, 170 / 110])


def test_replica_setups_are_valid_gateway_configs() -> None:
    rg = load_benchmark("replica_goodput")
    base = rg.engine_binds(rg.sg.base_config([8101, 8102, 8103, 8104], [5601, 5602, 5603, 5604], 8000, 1.0))
    assert {i["kv_events"]["endpoint"] for i in base["instances"]} == {f"tcp://*:{p}" for p in range(5601, 5605)}
    setups = rg.variants(3)
    assert [workers for workers, _ in setups.values()] == [1, 3, 3]
    for _, extra in setups.values():
        GatewayConfig.model_validate(rg.sg.deep_merge(base, extra))
    assert not GatewayConfig.model_validate(rg.sg.deep_merge(base, setups["3 replicas, no sharing"][1])).sharing.enabled
