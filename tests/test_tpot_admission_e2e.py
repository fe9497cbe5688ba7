"""TPOT-aware admission (issue 17, item 6): a decode-bound burst on a real gateway and real engines.

One prefill and one decode engine (A100 / Llama-2-7B profile: its decode step grows ~1 % per
stream, so a 14 ms TPOT SLO holds about 25 short-prompt streams), 60 long answers at once.
With admission the gateway admits what the decode batch can carry within the TPOT SLO and turns
the rest away at once (``tpot-infeasible``: no stream there ends before their first token is
due); without it, everyone joins one batch and misses the TPOT SLO."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import aiohttp
import pytest
from support.fleet import MODEL, engine_flags, instance_entry, metric, start_gateway, write_config
from support.procs import PdgateProcess, start_sim

PROFILE = "a100-llama-2-7b"
TOKENS = 240
SLO = {"x-slo-ttft-ms": "2000", "x-slo-tpot-ms": "14"}
BURST = 60


@pytest.fixture(scope="module")
def entries() -> Iterator[list[dict]]:
    procs: list[PdgateProcess] = []
    try:
        for role in ("prefill", "decode"):
            procs.append(start_sim(*engine_flags(role, extra=("--profile", PROFILE)), time_scale=1.0))
        yield [instance_entry(p, r, "sim", cost_profile=PROFILE) for p, r in zip(procs, ("prefill", "decode"))]
    finally:
        for proc in procs:
            proc.stop()


async def _burst(url: str, n: int) -> list[tuple[int, float, float | None, str]]:
    """``n`` streamed long answers sent at once: (status, seconds to the answer or the 429, mean
    TPOT, reject reason) each."""

    async def one(i: int, session: aiohttp.ClientSession) -> tuple[int, float, float | None, str]:
        body = {
            "model": MODEL,
            "prompt": f"request {i}: tell me a long story about the number {i * 7919}",
            "max_tokens": TOKENS,
            "stream": True,
            "ignore_eos": True,
        }
        t0 = time.monotonic()
        async with session.post(f"{url}/v1/completions", json=body, headers=SLO) as resp:
            if resp.status != 200:
                await resp.read()
                return resp.status, time.monotonic() - t0, None, resp.headers.get("x-pdgate-reject-reason", "")
            stamps = []
            async for line in resp.content:
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    stamps.append(time.monotonic())
            tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
            return 200, stamps[0] - t0 if stamps else 0.0, tpot, ""

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one(i, session) for i in range(n)))


def _run(entries: list[dict], path, **config) -> tuple[list[tuple[int, float, float | None, str]], float]:
    gw = start_gateway(write_config(path, entries, **config))
    try:
        results = asyncio.run(_burst(gw.url, BURST))
        shed = metric(gw.url, "pdgate_admission_decisions_total", outcome="reject", reason="tpot-infeasible")
        return results, shed
    finally:
        gw.stop()


def test_a_decode_bound_burst_admits_what_keeps_its_tpot_and_turns_the_rest_away_at_once(entries, tmp_path):
    results, shed = _run(entries, tmp_path / "on.yaml")
    served = [tpot for status, _, tpot, _ in results if status == 200]
    rejected = [(t, reason) for status, t, _, reason in results if status == 429]
    assert len(served) + len(rejected) == BURST and all(t is not None for t in served)
    assert 8 <= len(served) <= 40 and rejected, (len(served), len(rejected))
    assert {reason for _, reason in rejected} == {"tpot-infeasible"} and shed == len(rejected)
    assert max(t for t, _ in rejected) < 1.0  # at once, not after waiting out the TTFT SLO
    met = sum(tpot <= 0.014 for tpot in served) / len(served)
    assert met >= 0.9, sorted(served)
    # the same burst without admission: all of it served, in one batch too slow for the SLO
    results, _ = _run(entries, tmp_path / "off.yaml", admission={"enabled": False})
    assert all(status == 200 for status, _, _, _ in results)
    late = sum(tpot > 0.014 for _, _, tpot, _ in results if tpot is not None)
    assert late >= 45, sorted(t for _, _, t, _ in results if t is not None)
