"""SLO-aware admission, the request log and online refits, through a real gateway and real engines."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
from support.fleet import (
    MODEL,
    engine_flags,
    get_json,
    instance_entry,
    metric,
    start_gateway,
    write_config,
)
from support.procs import PdgateProcess, start_sim
from support.waiting import wait_until

LONG_PROMPT_WORDS = 700  # ~3k tokens with the builtin tokenizer: ~90 ms of H100 prefill


@dataclass
class Fleet:
    engines: list[PdgateProcess]
    entries: list[dict]


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """One prefill and one decode engine in real time (H100 / Llama-3-8B profile)."""
    procs: list[PdgateProcess] = []
    entries = []
    try:
        for role in ("prefill", "decode"):
            # the engine binds its KV-event port itself; each gateway of the module connects to it
            proc = start_sim(*engine_flags(role, kv_events=True), time_scale=1.0)
            procs.append(proc)
            entries.append(instance_entry(proc, role, "sim"))
        yield Fleet(procs, entries)
    finally:
        for proc in procs:
            proc.stop()


def gateway(fleet: Fleet, path: Path, **config) -> PdgateProcess:
    return start_gateway(write_config(path, fleet.entries, **config))


def prompt(n: int, words: int = LONG_PROMPT_WORDS) -> str:
    return f"request {n}: " + " ".join(f"w{(n * 7919 + i) % 5000}" for i in range(words))


async def _post(url: str, headers: dict[str, str], body: dict) -> tuple[int, dict[str, str], dict, float]:
    async with aiohttp.ClientSession() as session:
        t0 = time.monotonic()
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
            data = await resp.json()
            return resp.status, dict(resp.headers), data, time.monotonic() - t0


def test_infeasible_slo_is_rejected_early_with_429_and_reason(fleet, tmp_path):
    gw = gateway(fleet, tmp_path / "gw.yaml")
    try:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model=MODEL, prompt=prompt(1), max_tokens=4, extra_headers={"x-slo-ttft-ms": "5"})
        assert err.value.response.headers["x-pdgate-reject-reason"] == "ttft-infeasible"
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert "predicted TTFT" in err.value.body["message"]
        # the same request with a reachable SLO is served
        ok = client.completions.create(
            model=MODEL,
            prompt=prompt(1),
            max_tokens=4,
            extra_headers={"x-slo-ttft-ms": "2000"},
            extra_body={"ignore_eos": True},
        )
        assert ok.usage.completion_tokens == 4
        status, _, body, _ = asyncio.run(_post(gw.url, {"x-slo-ttft-ms": "fast"}, {"model": MODEL, "prompt": "hi"}))
        assert status == 400 and "x-slo-ttft-ms" in body["error"]["message"]
        status, _, body, _ = asyncio.run(
            _post(gw.url, {"x-slo-ttft-ms": "300", "x-llm-d-slo-ttft-ms": "900"}, {"model": MODEL, "prompt": "hi"})
        )
        assert status == 400 and "conflicting SLO headers" in body["error"]["message"]
        assert metric(gw.url, "pdgate_admission_decisions_total", outcome="reject", reason="ttft-infeasible") == 1
    finally:
        gw.stop()


async def _burst(url: str, n: int, ttft_ms: int, gap_s: float = 0.04, first: int = 100) -> list[tuple[int, float, str]]:
    """``n`` streamed requests, one every ``gap_s``; (status, TTFT or rejection time, reason) each."""

    async def one(i: int, session: aiohttp.ClientSession) -> tuple[int, float, str]:
        await asyncio.sleep(i * gap_s)  # the arrival schedule under test: one request every gap_s
        t0 = time.monotonic()
        body = {"model": MODEL, "prompt": prompt(first + i), "max_tokens": 8, "stream": True, "ignore_eos": True}
        async with session.post(f"{url}/v1/completions", json=body, headers={"x-slo-ttft-ms": str(ttft_ms)}) as resp:
            if resp.status != 200:
                await resp.read()
                return resp.status, time.monotonic() - t0, resp.headers.get("x-pdgate-reject-reason", "")
            await resp.content.readline()
            ttft = time.monotonic() - t0
            await resp.read()
            return 200, ttft, ""

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one(i, session) for i in range(n)))


def test_overload_sheds_what_cannot_make_it_and_the_admitted_meet_their_slo(fleet, tmp_path):
    # 40 prompts of ~3k tokens at 25 requests/s on one prefill instance that prefills ~10/s, TTFT SLO 800 ms
    gw = gateway(fleet, tmp_path / "gw.yaml")
    try:
        results = asyncio.run(_burst(gw.url, 40, 800))
        served = [ttft for status, ttft, _ in results if status == 200]
        rejected = [(t, reason) for status, t, reason in results if status == 429]
        assert len(served) + len(rejected) == 40
        assert 8 <= len(served) <= 32 and rejected
        assert {reason for _, reason in rejected} <= {"ttft-infeasible", "decode-saturated"}
        met = sum(ttft <= 0.8 for ttft in served) / len(served)
        assert met >= 0.8, sorted(served)
        assert max(t for t, _ in rejected) < 0.8  # turned away early, not after waiting out the SLO
    finally:
        gw.stop()
    # the same burst without admission: everything is served, most of it late
    gw = gateway(fleet, tmp_path / "off.yaml", admission={"enabled": False})
    try:
        results = asyncio.run(_burst(gw.url, 40, 800, first=200))  # new prompts: nothing cached
        assert all(status == 200 for status, _, _ in results)
        late = sum(ttft > 0.8 for _, ttft, _ in results)
        assert late >= 20
    finally:
        gw.stop()


def test_requests_are_logged_refit_online_and_the_model_is_loaded_at_restart(fleet, tmp_path):
    from pdgate.scheduler.costmodel.store import ModelStore

    model_dir = tmp_path / "cost-model"
    config = {"cost_model": {"dir": str(model_dir), "refit_interval_s": 1.0, "min_new_samples": 5}}
    gw = gateway(fleet, tmp_path / "gw.yaml", **config)
    try:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
        assert get_json(f"{gw.url}/cost-model")["version"] == "prior"
        for i in range(24):
            stream = client.completions.create(
                model=MODEL,
                prompt=prompt(i, 50 + 25 * i),
                max_tokens=6 + i,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            assert sum(len(c.choices) for c in stream) > 0
        # a request is recorded just after its last byte went out: wait for the 24th, then for a refit
        wait_until(
            lambda: metric(gw.url, "pdgate_prediction_ratio_count", quantity="ttft_s") >= 24,
            timeout=30,
            message="the gateway to record all 24 requests",
        )
        wait_until(
            lambda: ModelStore(model_dir).versions(), timeout=30, interval=0.1, message=lambda: f"a refit\n{gw.log}"
        )
        state = get_json(f"{gw.url}/cost-model")
        assert state["version"] != "prior" and state["refits"] >= 1
        assert metric(gw.url, "pdgate_prediction_ratio_count", quantity="ttft_s") >= 24
        assert metric(gw.url, "pdgate_cost_model_refits", result="ok") >= 1
    finally:
        gw.stop()
    rows = [json.loads(line) for line in (model_dir / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    row = rows[-1]
    assert row["output_tokens"] == 29 and row["prompt_tokens"] > 600
    assert "prompt_text" not in row and row["text_hash"]  # hashed n-grams, not the text
    assert row["timing"]["prefill_s"] > 0 and row["timing"]["tpot_s"] > 0
    assert row["predicted"]["ttft_s"] > 0 and row["placement"]["split"] is True
    # restart: the saved version is in force from the start
    gw = gateway(fleet, tmp_path / "gw2.yaml", **config)
    try:
        state = get_json(f"{gw.url}/cost-model")
        assert state["version"] == ModelStore(model_dir).versions()[-1]
        assert state["records"] == 24  # the log's tail is back in memory for the next refit
    finally:
        gw.stop()


def test_answers_teach_the_length_scale_and_the_log_says_which_scale_each_was_served_with(fleet, tmp_path):
    """Natural answers (no ignore_eos) move the answering model's length scale; a request served
    after that carries the scale in its log row (predicted.output_scale), its median over the scale
    is the model's own, and the row names the cost model that predicted it."""
    model_dir = tmp_path / "cost-model"
    gw = gateway(fleet, tmp_path / "gw.yaml", cost_model={"dir": str(model_dir), "refit_interval_s": 3600.0})

    async def burst(first: int, n: int) -> None:
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> None:
                body = {"model": MODEL, "prompt": prompt(first + i, 20), "max_tokens": 600}
                async with session.post(f"{gw.url}/v1/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()

            await asyncio.gather(*(one(i) for i in range(n)))

    def logged() -> list[dict]:
        log = model_dir / "requests.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    try:
        asyncio.run(burst(0, 40))  # all served at scale 1 before the first answer comes back
        wait_until(lambda: len(logged()) >= 40, timeout=30, message="the gateway to log the first 40 answers")
        scale = metric(gw.url, "pdgate_cost_model_length_scale", model=MODEL)
        assert (
            scale is not None and scale != 1.0 and 0.3 < scale < 4.0
        )  # the simulated model's lengths are not the prior's
        asyncio.run(burst(100, 10))
        wait_until(lambda: len(logged()) >= 50, timeout=30, message="the gateway to log the next 10")
    finally:
        gw.stop()
    rows = logged()
    assert not any("output_scale" in r["predicted"] for r in rows[:40])
    later = [r for r in rows[40:] if "output_scale" in r["predicted"]]
    assert later, [r["predicted"] for r in rows[40:]]
    for row in later:
        predicted = row["predicted"]
        assert predicted["output_median"] / predicted["output_scale"] == pytest.approx(128.0)  # the prior's median
        assert row["cost_model"] == "prior"
