"""benchmarks/migration.py: its gateway configs are valid (off: no migration; on: load-balance with
time parameters scaled), the workload is reproducible, the report's parsers (gateway log,
downtime histogram) are right, and a smoke run (a fresh 1P3D sim fleet and gateway per run)
prints its table, writes its JSON, fails no request and leaves no process behind."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from support.scripts import BENCHMARKS, assert_run_left_no_process, load_benchmark

from pdgate.gateway.config import GatewayConfig
from pdgate.scheduler.registry import PluginRegistry

bench = load_benchmark("migration")


def _args(*argv: str) -> argparse.Namespace:
    return bench.parse_args(list(argv))


def test_off_and_on_configs_are_valid_gateway_configs() -> None:
    args = _args("--time-scale", "2", "--param", "imbalance_ratio=1.25", "--mechanism", "live")
    ports = [8101, 8102, 8103, 8104]
    off = bench.gateway_config(ports, 8000, args, migration=False)
    on = bench.gateway_config(ports, 8000, args, migration=True)
    assert off["migration"]["enabled"] is False and off["migration"]["policy"] == "no-migration"
    assert on["migration"]["enabled"] is True and on["migration"]["policy"] == "load-balance"
    assert on["migration"]["mechanism"] == "live" and on["migration"]["interval_s"] == 0.25
    params = on["migration"]["parameters"]
    assert params["imbalance_ratio"] == 1.25
    assert params["min_decoding_s"] == pytest.approx(0.1)  # 0.2 simulated s at time scale 2
    assert on["admission"] == {"enabled": False}
    roles = [i["role"] for i in on["instances"]]
    assert roles == ["prefill", "decode", "decode", "decode"]
    assert all(i["launch"]["time_scale"] == 2.0 for i in on["instances"])
    for config in (off, on):
        parsed = GatewayConfig.model_validate(config)
        profiles = PluginRegistry(load_entry_points=False).build(parsed.scheduling)
        assert {"prefill", "decode", "colocated"} <= set(profiles)
        policy = PluginRegistry(load_entry_points=False).create_migration_policy(
            parsed.migration.policy, parsed.migration.parameters
        )
        assert policy.type_name == parsed.migration.policy
    for placement in bench.PLACEMENTS:
        GatewayConfig.model_validate(bench.gateway_config(ports, 8000, _args("--placement", placement), migration=True))


def test_bad_policy_parameters_are_refused_before_anything_starts(capsys) -> None:
    with pytest.raises(SystemExit):
        _args("--param", "imbalance_ratio=0.5")
    assert "imbalance_ratio" in capsys.readouterr().err


def test_workload_is_reproducible_and_shaped() -> None:
    w = bench.Workload(duration_s=20.0)
    a, b = bench.build_requests(w, 3), bench.build_requests(w, 3)
    assert [(r.arrival_s, r.prompt_tokens, r.max_tokens, r.prompt) for r in a] == [
        (r.arrival_s, r.prompt_tokens, r.max_tokens, r.prompt) for r in b
    ]
    assert [r.index for r in a] == list(range(len(a)))
    assert all(x.arrival_s <= y.arrival_s for x, y in itertools.pairwise(a))
    longs = [r for r in a if r.slo_class == bench.LONG]
    assert len(longs) == w.burst_size * math.ceil((w.duration_s - w.first_burst_s) / w.burst_every_s)
    assert all(w.long_output[0] <= r.max_tokens <= w.long_output[1] for r in longs)
    body = a[0].body("m")
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["ignore_eos"]
    assert bench.build_requests(w, 4) != a


def test_tagged_target_names_each_request() -> None:
    target = bench.TaggedTarget("on", "http://127.0.0.1:1", "m", "on0")
    request = bench.build_requests(bench.SMOKE, 0)[5]
    assert target.path(request) == "/v1/completions"
    assert target.headers["X-Request-Id"] == "on0-5" and target.headers["Content-Type"] == "application/json"


def test_bucket_quantile_is_prometheus_histogram_quantile() -> None:
    buckets = {0.01: 0.0, 0.05: 2.0, 0.1: 4.0, math.inf: 4.0}
    assert bench.bucket_quantile(0.5, buckets) == pytest.approx(0.05)
    assert bench.bucket_quantile(0.25, buckets) == pytest.approx(0.03)
    assert bench.bucket_quantile(0.75, buckets) == pytest.approx(0.075)
    assert bench.bucket_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert bench.bucket_quantile(0.99, {0.1: 1.0, math.inf: 2.0}) == pytest.approx(0.1)


def test_gateway_log_parsing(tmp_path: Path) -> None:
    lines = [
        "pdgate gateway ready: http://127.0.0.1:1",
        {
            "level": "info",
            "logger": "pdgate.proxy",
            "message": "migrated on0-3 from decode-1 to decode-2 (balance, recompute) after 30 tokens",
        },
        {
            "level": "info",
            "logger": "pdgate.proxy",
            "message": "migration of on0-4 from decode-0 to decode-2 (defrag, live) failed: HTTP 502: no",
        },
        {
            "level": "warning",
            "logger": "pdgate.proxy",
            "message": "failed on0-5 over from decode-2 to decode-0 after 12 tokens (stalled)",
        },
        {
            "level": "info",
            "logger": "pdgate.access",
            "message": "POST /v1/completions 200",
            "request_id": "on0-3",
            "decode": "decode-1",
        },
        {"level": "warning", "logger": "pdgate.migration", "message": "stream on0-5 on decode-2 stalled"},
    ]
    log = tmp_path / "gateway.log"
    log.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    moves, placed, problems = bench.parse_gateway_log(log)
    assert [(m.request_id, m.reason, m.mechanism, m.ok, m.tokens) for m in moves] == [
        ("on0-3", "balance", "recompute", True, 30),
        ("on0-4", "defrag", "live", False, None),
        ("on0-5", "failover", "failover", True, 12),
    ]
    assert moves[1].error == "HTTP 502: no"
    assert placed == {"on0-3": "decode-1"}
    assert problems == ["stream on0-5 on decode-2 stalled"]


def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "migration.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "migration.py"), "--smoke", "--out", str(out), "--keep-logs"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| metric | off | on | on/off |" in run.stdout and "**TPOT p99 (ms)**" in run.stdout
    data = json.loads(out.read_text())
    off, on = data["runs"]["off"], data["runs"]["on"]
    for r in (off, on):
        assert r["failed"] == 0 and r["completed"] == r["requests"] > 0
        assert r["ttft_s"]["p99"] is not None and r["tpot_s"]["p99"] is not None
        assert len(r["per_request"]) == r["requests"] and all(q["ok"] for q in r["per_request"])
    assert off["migrations"] == 0 and off["downtime_metric"]["count"] == 0
    # the smoke workload piles long requests on one decoder: the policy moves some, and the
    # gateway's log, its counter and its downtime histogram agree on how many
    assert on["migrations"] >= 1, on
    migrated = sum(
        v for k, v in on["metric_counts"].items() if k.endswith("/migrated") and not k.startswith("failover/")
    )
    assert migrated == on["migrations"] == on["downtime_metric"]["count"]
    moved = {m["request_id"] for m in on["moves"] if m["ok"] and m["reason"] != "failover"}
    assert on["max_gap_migrated_s"]["count"] == len(moved)  # every migrated stream found among the client's results
    assert on["switch_gap_s"]["count"] >= 1  # the gap at a move, found in the client's timings by the log's time
    assert sum(q["moves"] for q in on["per_request"]) == on["migrations"] + on["failovers"]
    assert "initial decode placement of the two runs: identical" in run.stdout
    assert assert_run_left_no_process(run.stdout) == 2
