"""``pdgate simulate``: the gateway's own code over a simulated fleet, in virtual time.

What a user of the simulator relies on: every request of the workload is answered with the
tokens asked for and timed on the simulated clock, through the real PD hand-off; the engines'
KV events reach the gateway's prefix index (shared prefixes are cached); a seed reproduces a
run exactly; ``--instances`` resizes the fleet; the command line writes ``pdgate bench``'s report
plus the fleet's series; and a run takes far less wall time than it simulates.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdgate.common.tokenizer import load_tokenizer
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.launcher import default_config_path
from pdgate.loadgen import workloads
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.runner import LoadConfig
from pdgate.simulate.fleet import scale_instances, simulated_instance
from pdgate.simulate.run import run_simulation, simulation_config


def _default_fleet(**changes: object) -> GatewayConfig:
    config = GatewayConfig.load(str(default_config_path()))
    instances = [simulated_instance(i) for i in config.instances]
    return simulation_config(config.model_copy(update={"instances": instances, **changes}))


def _synthetic(n: int, *, input_len: str = "fixed:256", output_len: str = "fixed:32", seed: int = 0) -> list:
    builder = PromptBuilder(load_tokenizer("builtin"), seed=seed)
    return workloads.synthetic(n, input_len, output_len, builder, seed, "completions", ignore_eos=True)


def test_every_request_is_answered_in_virtual_time_through_pd() -> None:
    requests = _synthetic(40)
    result = run_simulation(_default_fleet(), requests, LoadConfig(rate=4.0, seed=1))
    assert [r.error for r in result.results] == [None] * 40
    assert all(r.output_tokens == 32 for r in result.results)
    # TTFT is a prefill step plus the hand-off; TPOT an H100 decode step (8-15 ms at this load)
    ttfts = sorted(r.ttft_s for r in result.results if r.ttft_s is not None)
    tpots = sorted(r.tpot_s for r in result.results if r.tpot_s is not None)
    assert 0.005 < ttfts[len(ttfts) // 2] < 0.2, ttfts
    assert 0.005 < tpots[len(tpots) // 2] < 0.03, tpots
    assert result.simulated_s > 8.0  # 40 arrivals at 4/s
    assert result.wall_s < result.simulated_s  # faster than real time, even on a busy 2-core host
    prefill = {s.instance for s in result.samples if s.role == "prefill"}
    decode = {s.instance for s in result.samples if s.role == "decode"}
    assert prefill == {"prefill-0", "prefill-1"} and decode == {"decode-0", "decode-1"}
    assert result.steps > 0


def test_a_seed_reproduces_the_run_exactly() -> None:
    requests = _synthetic(30, input_len="uniform:64:512", output_len="uniform:4:40", seed=3)
    runs = [run_simulation(_default_fleet(), requests, LoadConfig(rate=8.0, seed=5), seed=7) for _ in range(2)]
    first, second = ([(r.sent_s, r.first_token_s, r.end_s, r.output_tokens) for r in run.results] for run in runs)
    assert first == second
    assert [s.to_dict() for s in runs[0].samples] == [s.to_dict() for s in runs[1].samples]


def test_kv_events_feed_the_prefix_index_so_shared_prefixes_are_cached() -> None:
    builder = PromptBuilder(load_tokenizer("builtin"), seed=0)
    requests = workloads.shared_prefix(2, 512, 10, "fixed:64", "fixed:8", builder, 0, "completions", ignore_eos=True)
    result = run_simulation(_default_fleet(), requests, LoadConfig(rate=5.0, seed=0))
    assert all(r.ok for r in result.results)
    later = [r for r in result.results if r.index >= 4]
    cached = [r.cached_tokens or 0 for r in later]
    assert sum(1 for c in cached if c >= 512) >= len(later) // 2, cached


def test_instances_scale_the_fleet_keeping_its_proportions() -> None:
    base = _default_fleet()
    scaled = scale_instances(base.instances, 16)
    roles = [i.role for i in scaled]
    assert roles.count("prefill") == 8 and roles.count("decode") == 8
    assert len({i.spec().id for i in scaled}) == 16 and len({i.url for i in scaled}) == 16
    exact = scale_instances(base.instances, counts={"prefill": 3, "decode": 5})
    assert [i.role for i in exact].count("decode") == 5 and len(exact) == 8
    with pytest.raises(ValueError, match="no both instance"):
        scale_instances(base.instances, counts={"both": 2})
    config = base.model_copy(update={"instances": scaled})
    result = run_simulation(
        config, _synthetic(64, output_len="fixed:16"), LoadConfig(rate=40.0, seed=2), sample_interval_s=0.02
    )
    assert all(r.ok for r in result.results)
    busy = {s.instance for s in result.samples if s.running > 0}
    assert len(busy) >= 8  # the load is spread over the fleet, not one pair


def test_the_command_writes_the_bench_report_and_the_fleet_series(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    cmd = [sys.executable, "-m", "pdgate.cli", "simulate", "--num-requests", "24", "--rate", "6"]
    cmd += ["--input-len", "fixed:128", "--output-len", "fixed:8", "--slo", "ttft=0.5,tpot=0.05"]
    cmd += ["--instances", "6", "--sample-interval", "0.05", "--out", str(out), "--no-plots"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "x real time" in proc.stdout
    doc = json.loads(next(out.glob("*.json")).read_text())
    assert doc["stats"]["total"] == 24 and doc["stats"]["ok"] == 24
    assert doc["run_meta"]["simulation"]["instances"] == 6
    assert doc["run_meta"]["simulation"]["roles"] == {"prefill": 3, "decode": 3}
    rows = list(csv.DictReader(next(out.glob("fleet_*.csv")).open()))
    assert {r["instance"] for r in rows} == {"prefill-0", "prefill-1", "prefill-2", "decode-0", "decode-1", "decode-2"}
    assert any(int(r["running"]) > 0 for r in rows)
    assert max(float(r["busy_s"]) for r in rows) > 0


def test_bad_fleet_options_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pdgate.cli", "simulate", "--num-requests", "4", "--rate", "1", "--instances", "1"]
    proc = subprocess.run(cmd + ["--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "each needs an instance" in proc.stdout + proc.stderr


def test_a_stream_interval_sends_fewer_chunks_with_the_same_latencies() -> None:
    requests = _synthetic(20, output_len="fixed:40")
    runs = {
        n: run_simulation(_default_fleet(), requests, LoadConfig(rate=4.0, seed=1), stream_interval=n) for n in (1, 8)
    }
    fine, coarse = runs[1].results, runs[8].results
    assert all(r.ok and r.output_tokens == 40 for r in fine + coarse)
    assert [len(r.chunk_times) for r in fine] == [40] * 20
    assert all(len(r.chunk_times) <= 7 for r in coarse)  # the first token, then 8 at a time
    for a, b in zip(fine, coarse, strict=True):
        assert b.ttft_s == pytest.approx(a.ttft_s, abs=1e-9)
        assert b.e2e_s == pytest.approx(a.e2e_s, abs=1e-9)


def test_a_scaling_plan_is_computed_but_nothing_is_started() -> None:
    base = GatewayConfig.load(str(default_config_path())).model_dump()
    base["instances"] = [simulated_instance(i).model_dump() for i in GatewayConfig.model_validate(base).instances]
    base["scaling"] = {"enabled": True, "interval_s": 1.0, "actuator": {"type": "local", "parameters": {}}}
    config = simulation_config(GatewayConfig.model_validate(base))
    assert config.scaling.enabled and config.scaling.actuator.type == "none"
    result = run_simulation(config, _synthetic(20), LoadConfig(rate=4.0, seed=1))
    assert all(r.ok for r in result.results)
    assert 'pdgate_plan_instances{model="llama-3-8b",role="decode"}' in result.gateway_metrics
