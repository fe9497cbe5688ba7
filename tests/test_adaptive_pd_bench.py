"""benchmarks/adaptive_pd.py: its variants are valid gateway configs, the phases are laid back to
back on small trace fixtures, and a ``--quick`` run of two variants (a fresh 4-engine sim fleet and
gateway each) prints its table, writes consistent per-phase figures and leaves no process behind."""

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

bench = load_benchmark("adaptive_pd")
sg = bench.sg  # the slo_goodput module the benchmark imported


def _azure_csv(path: Path, rows: int, output: int, idle_from: int | None = None) -> None:
    """A small Azure-format trace: bursts of 3 requests 10 ms apart, bursts 1 s apart, and an
    idle minute before record ``idle_from`` (which the prefill-heavy phase cuts to 2 s)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(rows):
        t = (i // 3) * 1.0 + (i % 3) * 0.01 + (60.0 if idle_from is not None and i >= idle_from else 0.0)
        lines.append(f"2023-11-16 18:{int(t // 60):02d}:{t % 60:010.7f},{100 + (i * 37) % 200},{output + i % 5}")
    path.write_text("\n".join(lines) + "\n")


def _mooncake_jsonl(path: Path, rows: int) -> None:
    """A small Mooncake trace: every request shares its first 512-token block with the others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [
        {
            "timestamp": 200 * i,
            "input_length": 1024 + 100,
            "output_length": 4 + i % 3,
            "hash_ids": [0, 1000 + i, 2000 + i],
        }
        for i in range(rows)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _azure_csv(root / sg.TRACES["azure-code"].path, 5200, 4, idle_from=5021)  # the window starts at 5000
    _azure_csv(root / sg.TRACES["azure-conv"].path, 600, 12)
    _mooncake_jsonl(root / sg.TRACES["mooncake"].path, 200)
    return root


def test_every_variant_is_a_valid_gateway_config() -> None:
    ports = list(range(8101, 8110))
    for name, variant in bench.VARIANTS.items():
        for admission in (True, False):
            config = bench.variant_config(variant, admission, ports, Slo(ttft_s=0.4, tpot_s=0.015), 1.0, 2.0, 10.0)
            parsed = GatewayConfig.model_validate(config)
            assert [i.start_role for i in parsed.instances] == list(variant.roles), name
            assert all(i.role == ("flex" if variant.flex else r) for i, r in zip(parsed.instances, variant.roles))
            assert parsed.admission.enabled is admission
            assert parsed.slo.default.tpot_ms == 15.0
            assert parsed.role_balancer.enabled is variant.balancer
            handler = parsed.scheduling.profile_handler.type if parsed.scheduling else "pd-split"
            assert handler == ("pd-adaptive" if variant.pd_adaptive else "pd-split"), name
    adaptive = bench.variant_config(bench.VARIANTS["adaptive"], True, ports, Slo(0.4, 0.015), 2.0, 2.0, 10.0)
    assert adaptive["role_balancer"] == {"enabled": True, "interval_s": 1.0, "min_dwell_s": 5.0}  # wall s at scale 2


def test_phases_are_laid_back_to_back(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sg, "DATA", data)
    workload = bench.build_workload(["prefill-heavy", "decode-heavy", "prefix-sharing"], [4.0, 5.0, 3.0], 10.0, 0)
    assert [len(p.indices) for p in workload.phases] == [40, 50, 30]
    assert [r.index for r in workload.requests] == list(range(120))
    for phase in workload.phases:
        times = [workload.requests[i].arrival_s for i in phase.indices]
        assert times[0] == pytest.approx(phase.start_s) and times == sorted(times)
        assert phase.start_s <= times[-1] <= phase.end_s
    assert workload.span_s == 30.0
    # the prefill-heavy phase: no gap longer than 2 native seconds (here 1 s bursts), scaled
    code = [workload.requests[i].arrival_s for i in workload.phases[0].indices]
    assert max(b - a for a, b in zip(code, code[1:])) < 10.0 / 3
    assert workload.tokens(0) == workload.requests[0].prompt_tokens + workload.requests[0].max_tokens
    with pytest.raises(ValueError, match="trace window has"):
        bench.build_workload(["prefix-sharing"], [30.0], 10.0, 0)  # 300 requests, the fixture has 200


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_quick_run_end_to_end(data: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "adaptive.json", tmp_path / "attainment.png"
    env = {**os.environ, "PDGATE_DATA": str(data)}
    run = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "adaptive_pd.py"),
            "--quick",
            "--phase-s",
            "4",  # (CI time: 3 x 4 s per variant instead of --quick's 3 x 8 s)
            "--variants",
            "2P2D,adaptive",
            "--admission",
            "on",
            "--out",
            str(out),
            "--plot",
            str(png),
            "--keep-logs",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| 2P2D | on |" in run.stdout and "| adaptive | on |" in run.stdout
    assert png.stat().st_size > 10_000
    data_out = json.loads(out.read_text())
    n = data_out["requests"]
    assert n == sum(p["requests"] for p in data_out["phases"]) > 0
    for key in ("2P2D/on", "adaptive/on"):
        r = data_out["runs"][key]
        assert set(r["phases"]) == {"prefill-heavy", "decode-heavy", "prefix-sharing"}
        for name, s in [*r["phases"].items(), ("overall", r["overall"])]:
            assert 0.0 <= s["attainment_pct"] <= 100.0, (key, name)
            assert s["met"] <= s["requests"] and s["rejected_429"] + s["failed_other"] <= s["requests"] - s["met"]
            assert s["goodput_rps"] == pytest.approx(s["met"] / s["duration_s"], abs=1e-3), (key, name)
            assert s["attainment_pct"] == pytest.approx(100 * s["met"] / s["requests"], abs=0.01)
        assert sum(s["requests"] for s in r["phases"].values()) == r["overall"]["requests"] == n
        assert sum(s["met"] for s in r["phases"].values()) == r["overall"]["met"]
        assert r["overall"]["duration_s"] == pytest.approx(sum(s["duration_s"] for s in r["phases"].values()))
        assert r["overall"]["attainment_pct"] > 50  # a light load on the fleet: most requests make it
        assert sum(w["requests"] for w in r["timeline"]) == n
        assert r["lag"]["engines_unreachable"] == 0
        assert r["roles_polled"] and set(r["roles_polled"][0]["serving"]) == {f"sim-{i}" for i in range(4)}
    ratio = data_out["ratios"]["on"]["adaptive"]["overall"]["goodput_rps"]
    assert ratio["best_static"] == "2P2D" and ratio["ratio"] > 0
    assert assert_run_left_no_process(run.stdout) == 2  # no engine or gateway of the run survives it


def test_scale_runs_the_variants_in_virtual_time(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "adaptive.json"
    env = {**os.environ, "PDGATE_DATA": str(data)}
    cmd = [sys.executable, str(BENCHMARKS / "adaptive_pd.py"), "--quick", "--variants", "1P3D,adaptive"]
    cmd += ["--admission", "on", "--scale", "8", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "8 instances in virtual time" in run.stdout
    runs = json.loads(out.read_text())["runs"]
    for key in ("1P3D/on", "adaptive/on"):
        assert runs[key]["overall"]["attainment_pct"] > 50
        polled = runs[key]["roles_polled"]
        assert polled and len(polled[0]["serving"]) == 8  # the fleet of 4 resized to 8
    first = runs["1P3D/on"]["roles_polled"][0]["serving"]
    assert sorted(first.values()).count("prefill") == 2  # 1P3D at 8: 2 prefill, 6 decode
