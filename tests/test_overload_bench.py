"""benchmarks/overload.py: a fleet offered 2x, 5x and 10x what it can serve.

The quick run starts a real 1P1D simulated fleet and gateway and drives it through the phases;
the gateway must refuse what it cannot serve (429 with Retry-After, fast), keep its SLO for what
it admits, keep its memory bounded and recover, and the run must leave no process behind. The
other tests feed the report's own functions answers as a client would see them, so that a broken
gateway (a 500, a 429 without Retry-After, no recovery) is known to fail the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support.scripts import BENCHMARKS, assert_run_left_no_process, load_benchmark

from pdgate.loadgen.slo import Slo
from pdgate.loadgen.types import RequestResult

bench = load_benchmark("overload")
SLO = Slo(ttft_s=1.0, tpot_s=0.1)


def test_quick_run_sheds_at_10x_and_keeps_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "overload.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "overload.py"), "--quick", "--out", str(out), "--keep-logs"],
        capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    phases = {p["phase"]: p for p in data["phases"]}
    assert list(phases) == ["1x", "2x", "5x", "10x", "recovery 0.5x"]
    top = phases["10x"]
    # not vacuous: the fleet was overloaded, and most of it was refused, every refusal with Retry-After
    assert top["requests"] >= 5 * phases["1x"]["requests"]
    assert top["answers"]["429"] + top["answers"]["503"] >= top["requests"] / 2
    assert top["retry_after_share"] == 1.0
    assert top["admitted"] > 0 and top["admitted_attainment"] >= 0.85
    assert phases["1x"]["admitted_attainment"] >= 0.85
    assert data["recovery"]["recovered_after_s"] is not None
    assert all(check["ok"] for check in data["invariants"]), data["invariants"]
    assert "| 10x" in run.stdout and "every rejection carries Retry-After" in run.stdout
    assert assert_run_left_no_process(run.stdout) == 1  # no engine or gateway of the run survives it


def _answer(index: int, at: float, status: int, *, ttft: float = 0.2, took: float = 0.005, headers=None):
    """An answer as the client saw it: a 16-token stream for a 200, else an error ``took`` s after sending."""
    if status == 200:
        result = RequestResult(
            index=index, target="t", slo_class="default", scheduled_s=at, sent_s=at, end_s=at + ttft + 0.75,
            first_token_s=at + ttft, output_tokens=16, status=200,
        )  # fmt: skip
    else:
        result = RequestResult(
            index=index, target="t", slo_class="default", scheduled_s=at, sent_s=at, end_s=at + took,
            status=status, error=f"HTTP {status}",
        )  # fmt: skip
    default = {"retry-after": "1", "x-pdgate-reject-reason": "ttft-infeasible"} if status in (429, 503) else {}
    return bench.Answer(result, default if headers is None else headers)


def _figures(phase, start, answers):
    memory = [bench.MemSample(start + 0.5, 100_000, 40)]
    return bench.phase_figures(phase, start, answers, 2.0, SLO, memory, None)


def _run(overload_answers, recovery_answers):
    """Invariants over a 1x phase of ten served requests, an overload phase and a recovery phase."""
    phases = [bench.Phase("1x", 1.0, 10.0), bench.Phase("10x", 10.0, 10.0), bench.Phase("recovery 0.5x", 0.5, 10.0)]
    base = [_answer(i, float(i), 200) for i in range(10)]
    figures = [_figures(phases[0], 0.0, base), _figures(phases[1], 10.0, overload_answers)]
    figures.append(_figures(phases[2], 20.0, recovery_answers))
    rec = bench.recovery(recovery_answers, 20.0, 10.0, 2.0, SLO, figures[0])
    refused = [1e3 * a.result.e2e_s for a in [*overload_answers, *recovery_answers] if a.result.status in (429, 503)]
    checks = bench.invariants(figures, rec, SLO, 85.0, refused)
    return {c.name.split(" (")[0]: c for c in checks}, rec


def _overload(n=20):
    return [_answer(i, 10 + i / 2, 200 if i % 5 == 0 else 429) for i in range(n)]


def test_a_healthy_overload_passes_every_invariant() -> None:
    checks, rec = _run(_overload(), [_answer(i, 20 + i, 200) for i in range(10)])
    assert all(c.ok for c in checks.values()), checks
    assert rec["recovered_after_s"] == 0.0


def test_a_5xx_or_a_rejection_without_retry_after_fails_the_run() -> None:
    answers = _overload()
    answers[1] = _answer(1, 10.5, 500)
    answers[2] = _answer(2, 11.0, 429, headers={"x-pdgate-reject-reason": "ttft-infeasible"})
    checks, _ = _run(answers, [_answer(i, 20 + i, 200) for i in range(10)])
    assert not checks["answers are 2xx, 429 or a 503 with Retry-After"].ok
    assert "5xx: 1" in checks["answers are 2xx, 429 or a 503 with Retry-After"].detail
    assert not checks["every rejection carries Retry-After"].ok


def test_slow_rejections_and_missed_slos_of_admitted_requests_fail_the_run() -> None:
    answers = [_answer(i, 10 + i / 2, 429, took=0.5) for i in range(20)]  # every refusal half a second late
    answers[0] = _answer(0, 10.0, 200, ttft=1.5)  # admitted, and past its TTFT SLO
    checks, _ = _run(answers, [_answer(i, 20 + i, 200) for i in range(10)])
    assert not checks["rejections are fast"].ok
    assert not checks["admitted requests meet their SLO"].ok


def test_refusing_until_the_end_of_the_recovery_phase_is_no_recovery() -> None:
    recovering = [_answer(i, 20 + i, 429 if i in (2, 9) else 200) for i in range(10)]  # refused 8-10 s after the drop
    checks, rec = _run(_overload(), recovering)
    assert not checks["it recovers when the load drops"].ok
    assert rec["recovered_after_s"] is None and rec["last_rejection_s"] == 9.0
    settled = [_answer(i, 20 + i, 429 if i < 3 else 200) for i in range(10)]  # refused for the first 3 s only
    checks, rec = _run(_overload(), settled)
    assert checks["it recovers when the load drops"].ok and rec["recovered_after_s"] == 4.0


def test_arrivals_follow_each_phase_rate() -> None:
    phases = [bench.Phase("1x", 1.0, 200.0), bench.Phase("10x", 10.0, 100.0)]
    plan = bench.arrival_plan(phases, 2.0, seed=3)
    first = [t for t, p in plan if p == 0]
    second = [t for t, p in plan if p == 1]
    assert 340 < len(first) < 460 and 1800 < len(second) < 2200  # 2 and 20 req/s, Poisson
    assert max(first) < 200.0 <= min(second) and max(second) < 300.0
    assert plan == bench.arrival_plan(phases, 2.0, seed=3)  # seeded
