"""benchmarks/slo_goodput.py: its policy configs are valid gateway configs, the trace's arrival
pattern is scaled to the probed rate, and a tiny end-to-end run (a fresh 2P2D sim fleet and
gateway per probe) prints its table, writes its JSON and leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.scripts import BENCHMARKS, assert_run_left_no_process, load_benchmark

from pdgate.gateway.config import GatewayConfig
from pdgate.loadgen.slo import Slo
from pdgate.loadgen.types import RequestResult
from pdgate.scheduler.registry import PluginRegistry

bench = load_benchmark("slo_goodput")


def _azure_csv(path: Path, rows: int) -> None:
    """A small Azure-format trace: bursts of 3 requests 10 ms apart, bursts 1 s apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(rows):
        t = (i // 3) * 1.0 + (i % 3) * 0.01
        lines.append(f"2023-11-16 18:{int(t // 60):02d}:{t % 60:010.7f},{100 + (i * 37) % 200},{4 + i % 5}")
    path.write_text("\n".join(lines) + "\n")


def test_baseline_policies_are_valid_gateway_configs() -> None:
    base = bench.base_config([8101, 8102, 8103, 8104], [5601, 5602, 5603, 5604], 8000, 1.0)
    for name, policy in bench.POLICIES.items():
        if bench.policy_available(name) is not None:
            continue
        config = bench.policy_config(name, base, Slo(ttft_s=0.4, tpot_s=0.02), 1.0)
        parsed = GatewayConfig.model_validate(config)
        if "scheduling" in policy["config"]:
            profiles = PluginRegistry(load_entry_points=False).build(parsed.scheduling)
            assert {"prefill", "decode", "colocated"} <= set(profiles)
    rr = bench.POLICIES["round-robin"]["config"]["scheduling"]["profiles"]
    pickers = {profile: entries[-1]["pluginRef"] for profile, entries in rr.items()}
    assert len(set(pickers.values())) == 3  # one round-robin picker per profile, never shared


def test_admission_and_slo_sections_follow_the_gateway_config(monkeypatch) -> None:
    base = bench.base_config([8101, 8102, 8103, 8104], [5601, 5602, 5603, 5604], 8000, 2.0)
    monkeypatch.setattr(bench, "gateway_sections", lambda: {"scheduling"})
    monkeypatch.setattr(bench.GatewayConfig, "model_validate", classmethod(lambda cls, data: data))
    assert "admission" not in bench.policy_config("least-loaded", base, Slo(0.4, 0.02), 2.0)
    assert bench.policy_available("slo-aware")  # a reason: no slo/admission section
    monkeypatch.setattr(bench, "gateway_sections", lambda: {"scheduling", "slo", "admission"})
    assert bench.policy_config("least-loaded", base, Slo(0.4, 0.02), 2.0)["admission"] == {"enabled": False}
    assert bench.policy_available("slo-aware") is None
    slo_aware = bench.policy_config("slo-aware", base, Slo(0.4, 0.02), 2.0)
    assert slo_aware["slo"] == {"default": {"ttft_ms": 200.0, "tpot_ms": 10.0}}  # wall ms at time scale 2
    assert "scheduling" not in slo_aware and "admission" not in slo_aware
    assert base["scrape_interval_s"] == 0.5 and all(i["launch"]["time_scale"] == 2.0 for i in base["instances"])


def test_arrivals_keep_the_trace_pattern_scaled_to_the_rate(tmp_path: Path, monkeypatch) -> None:
    _azure_csv(tmp_path / "code.csv", 30)
    monkeypatch.setattr(bench, "DATA", tmp_path)
    spec = bench.TraceSpec(
        "t",
        "code.csv",
        "azure",
        "test",
        ttft_s=0.4,
        tpot_s=0.02,
        start_rate=1.0,
        time_scale=1.0,
        offset=3,
        max_requests=20,
    )
    workload = bench.TraceWorkload(spec, seed=0)
    assert len(workload.pool) == 20
    reqs = workload.requests(12, 6.0)
    times = [r.arrival_s for r in reqs]
    assert times[0] == 0.0 and (len(reqs) - 1) / times[-1] == pytest.approx(6.0)
    native = [r.arrival_s for r in workload.window(12)]
    factor = times[-1] / (native[-1] - native[0])
    assert times == pytest.approx([(t - native[0]) * factor for t in native])
    assert [r.index for r in reqs] == list(range(12))
    assert [r.prompt_tokens for r in reqs] == [r.prompt_tokens for r in workload.window(12)]
    assert workload.requests(12, 6.0) is reqs  # the identical list for every policy at a rate


def test_results_are_converted_to_simulated_seconds() -> None:
    r = RequestResult(
        index=0,
        target="t",
        slo_class="default",
        scheduled_s=1.0,
        sent_s=1.5,
        end_s=3.0,
        first_token_s=2.0,
        chunk_times=[2.0, 2.5],
        output_tokens=3,
        status=200,
    )
    sim = bench.to_sim(r, 4.0)
    assert (sim.sent_s, sim.first_token_s, sim.end_s, sim.chunk_times) == (6.0, 8.0, 12.0, [8.0, 10.0])
    assert sim.tpot_s == pytest.approx(4 * r.tpot_s)


def test_quick_run_end_to_end(tmp_path: Path) -> None:
    _azure_csv(tmp_path / "data" / bench.TRACES["azure-code"].path, 640)
    out = tmp_path / "goodput.json"
    env = {**os.environ, "PDGATE_DATA": str(tmp_path / "data")}
    run = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "slo_goodput.py"),
            "--quick",
            "--traces",
            "azure-code",
            "--policies",
            "round-robin",
            "--requests-per-probe",
            "12",
            "--max-probes",
            "1",
            "--start-rate",
            "4",
            "--out",
            str(out),
            "--keep-logs",
        ],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| round-robin |" in run.stdout
    data = json.loads(out.read_text())
    probes = data["traces"]["azure-code"]["policies"]["round-robin"]["probes"]
    assert len(probes) == 1 and probes[0]["requests"] == 12 and probes[0]["failed"] == 0
    assert probes[0]["attainment"] == 1.0  # 4 req/s of ~200-token prompts is nothing for the fleet
    assert probes[0]["lag"]["engines_unreachable"] == 0
    assert assert_run_left_no_process(run.stdout) >= 1  # no engine or gateway of the run survives it


def test_scale_runs_the_comparison_in_virtual_time(tmp_path: Path) -> None:
    _azure_csv(tmp_path / "data" / bench.TRACES["azure-code"].path, 640)
    out = tmp_path / "goodput.json"
    env = {**os.environ, "PDGATE_DATA": str(tmp_path / "data")}
    cmd = [sys.executable, str(BENCHMARKS / "slo_goodput.py"), "--quick", "--traces", "azure-code"]
    cmd += ["--policies", "round-robin", "--requests-per-probe", "12", "--max-probes", "1", "--start-rate", "4"]
    cmd += ["--scale", "8", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=110, env=env, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "8 instances in virtual time" in run.stdout
    trace = json.loads(out.read_text())["traces"]["azure-code@8"]
    assert trace["instances"] == 8
    (probe,) = trace["policies"]["round-robin"]["probes"]
    assert probe["rate"] == 8.0 and probe["requests"] == 24  # both grow with the fleet (x 8/4)
    assert probe["failed"] == 0 and probe["attainment"] == 1.0
