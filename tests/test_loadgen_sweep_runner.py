"""The sweep's search, the arrival processes, and the runner against a real simulated engine."""

from __future__ import annotations

import statistics

import pytest

from pdgate.loadgen.arrivals import arrival_times
from pdgate.loadgen.client import Target
from pdgate.loadgen.runner import LoadConfig, run_load
from pdgate.loadgen.sweep import SweepConfig, sweep
from pdgate.loadgen.types import BenchRequest, RequestResult


async def test_sweep_brackets_the_capacity_of_each_target() -> None:
    capacity = {"fast": 37.0, "slow": 6.0}  # a target meets its SLOs up to this rate

    async def probe(name: str, rate: float, requests) -> list[RequestResult]:
        ok = rate <= capacity[name]
        return [
            RequestResult(
                index=r.index,
                target=name,
                slo_class="default",
                scheduled_s=0,
                sent_s=0,
                end_s=1,
                status=200 if ok else 503,
            )
            for r in requests
        ]

    def attainment(results: list[RequestResult], rate: float) -> float:
        return sum(r.ok for r in results) / len(results)

    order: list[str] = []
    config = SweepConfig(start_rate=4, tolerance=0.05, max_probes=12, point_duration_s=1)
    found = await sweep(
        ["fast", "slow"],
        lambda n, rate: [BenchRequest(i, "completions", 4, prompt="x") for i in range(n)],
        probe,
        attainment,
        config,
        on_point=lambda name, rate, value: order.append(name),
    )
    for name, cap in capacity.items():
        assert found[name].best_rate is not None and cap * 0.95 <= found[name].best_rate <= cap
        assert found[name].bad is not None and found[name].bad > cap
    assert order[:4] == ["fast", "slow", "slow", "fast"]  # interleaved rounds, alternating who goes first


def test_arrival_processes_have_the_asked_rate_and_are_seeded() -> None:
    poisson = arrival_times("poisson", 4000, rate=50, seed=3)
    assert poisson == arrival_times("poisson", 4000, rate=50, seed=3) != arrival_times("poisson", 4000, rate=50, seed=4)
    assert 48 < 4000 / poisson[-1] < 52
    gaps = [b - a for a, b in zip(poisson, poisson[1:], strict=False)]
    assert 0.9 < statistics.stdev(gaps) / statistics.mean(gaps) < 1.1  # exponential: CV 1
    bursty = arrival_times("gamma", 4000, rate=50, burstiness=0.25, seed=3)
    bursty_gaps = [b - a for a, b in zip(bursty, bursty[1:], strict=False)]
    assert statistics.stdev(bursty_gaps) / statistics.mean(bursty_gaps) > 1.7  # CV 1/sqrt(0.25) = 2
    assert arrival_times("constant", 3, rate=4) == [0.0, 0.25, 0.5]
    trace = [BenchRequest(i, "completions", 1, prompt="x", arrival_s=t) for i, t in enumerate([0.0, 2.0, 3.0])]
    assert arrival_times("trace", 3, requests=trace, speedup=2) == [0.0, 1.0, 1.5]
    with pytest.raises(ValueError, match="positive rate"):
        arrival_times("poisson", 3)


async def test_runner_measures_streams_and_keeps_session_order(sim_factory) -> None:
    engine = sim_factory("--served-model-name", "m", "--time-scale", "1")
    requests = [
        BenchRequest(
            i,
            "chat" if i % 2 else "completions",
            12,
            prompt="the history of the city " * 8,
            messages=({"role": "user", "content": "hello " * 10},),
            extra={"ignore_eos": True},
            session="s" if i >= 6 else None,
            turn=i,
        )
        for i in range(10)
    ]
    results, overhead = await run_load(Target("sim", engine.url, "m"), requests, LoadConfig(rate=200, seed=0))
    assert [r.index for r in results] == list(range(10)) and all(r.ok for r in results), [r.error for r in results]
    for r in results:
        assert r.output_tokens == 12 and len(r.chunk_times) >= 2 and r.prompt_tokens
        assert 0 < r.ttft_s <= r.e2e_s and r.tpot_s > 0
        assert r.chunk_times == sorted(r.chunk_times) and r.first_token_s == r.chunk_times[0]
    session = [r for r in results if r.index >= 6]
    assert all(a.end_s <= b.sent_s for a, b in zip(session, session[1:], strict=False))  # turns in order
    assert overhead.requests == 10 and overhead.cpu_s > 0


async def test_runner_records_failures_instead_of_raising(sim_factory) -> None:
    engine = sim_factory("--served-model-name", "m")
    bad_model = Target("sim", engine.url, "no-such-model")
    results, _ = await run_load(bad_model, [BenchRequest(0, "completions", 4, prompt="x")], LoadConfig(rate=10))
    assert results[0].status == 404 and not results[0].ok and "404" in results[0].error
    down = Target("down", "http://127.0.0.1:9", "m")
    results, _ = await run_load(down, [BenchRequest(0, "completions", 4, prompt="x")], LoadConfig(rate=10))
    assert results[0].status == 0 and "connect" in results[0].error
