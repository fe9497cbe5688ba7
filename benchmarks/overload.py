#!/usr/bin/env python3
"""Overload: what the gateway does with 2x, 5x and 10x the load its fleet can serve (issue 21).

    python benchmarks/overload.py [--factors 2,5,10] [--phase-s 30] [--warmup-s 30]
        [--recovery-factor 0.5] [--recovery-s 45] [--window-s 5]
        [--capacity measure|model|RATE] [--probe-s 12] [--max-probes 4]
        [--time-scale 0.1] [--prompt-tokens 768:1280] [--output-tokens 16]
        [--ttft-ms 200] [--tpot-ms 25] [--min-admitted-pct 85] [--seed 0]
        [--set KEY=VALUE ...] [--wait-quiet S] [--out results.json] [--plot overload.png]
        [--keep-logs] [--quick]

**Fleet**: one prefill and one decode simulated engine (``pdgate engine sim``, H100 /
Llama-3-8B profile, vLLM flavour) and ``pdgate serve --workers 1`` with the SLO of ``--ttft-ms``
/ ``--tpot-ms`` and SLO-aware admission on (the gateway's defaults: ``on_infeasible: reject``,
``max_queue: 1024``), all subprocesses in their own process groups, stopped at the end (also on
Ctrl-C, SIGTERM or an error).

**Time**: the engines run ``--time-scale`` simulated seconds per wall second (0.1: ten times
slower than the GPU), so that the fleet's capacity is a few wall requests per second and 10x
of it (tens of requests/s of ~1k-token prompts) stays within what the gateway, the client and
the engines can drive on a 2-core host without the client becoming the bottleneck. The SLO is
given in simulated milliseconds and the gateway is configured with its wall equivalent
(``ms / time_scale``); **every rate and latency in the report is wall-clock**, since what is
measured is the gateway process under a real request rate (simulated rate = wall rate /
time scale).

**Workload**: completions with prompts of ``--prompt-tokens`` tokens (uniform, random text, no
shared prefixes) and ``--output-tokens`` output tokens (``ignore_eos``): prefill-bound, so the
prefill engine is what saturates. Open-loop Poisson arrivals (seeded), one continuous run through
the phases: ``1x`` (``--warmup-s``, the reference), then each ``--factors`` multiple of the
capacity for ``--phase-s``, then ``--recovery-factor`` for ``--recovery-s``.

**Capacity** (``--capacity``): ``measure`` (default) searches for it on the same fleet before the
phases: DistServe's goodput as docs/slo.md defines it, the highest Poisson rate at which >= 90 %
of the requests meet both SLOs with admission on (a 429 is a miss); probes of ``--probe-s``
seconds, geometric bisection from the model's estimate, at most ``--max-probes``. ``model``
takes the estimate alone: ``MODEL_UTILIZATION`` of the prefill engine's saturated throughput
for the mean prompt (the calibrated step time of a full 8192-token chunked-prefill step), which
the measurement found to be close on this box. A number is taken as the wall rate.

**Per phase**: offered rate (intended, and what the client actually sent, with its lateness),
answers 2xx / 429 / 503 / other, the share of rejections carrying ``Retry-After`` and their
reasons (``x-pdgate-reject-reason``), p50 / p99 time to a rejection, SLO attainment of the
admitted (2xx) requests (TTFT, TPOT, both), goodput (SLO-met requests per second), the gateway
process's peak RSS (``/proc/<pid>/status`` VmRSS, sampled every 100 ms) and open fds, and the
CPU other processes took of the host meanwhile (``*``: the phase may be distorted by them or by
a late client). **Recovery**: the time from the drop to ``--recovery-factor`` until every later
``--window-s`` window is back at the 1x phase's level (attainment no more than
``RECOVERY_TOLERANCE`` below it, rejections no more than that above it), and when the last
rejection came.

**Invariants** (exit 1 when one breaks; each is printed with its figures):

* no answer other than 2xx, 429 and a documented 503, no request without an answer and no
  2xx stream that broke off (a 5xx for overload is a bug);
* every 429 and 503 carries ``Retry-After``;
* rejections are fast: p50 within 10 % and p99 within 25 % of the TTFT SLO
  (``FAST_REJECT_P50``, ``FAST_REJECT_P99``), over all the run's rejections and in each phase
  with at least ``MIN_REJECTIONS`` of them. A request is refused either on arrival (the
  gateway's own few ms: parse, tokenize, assess) or, when the admitter first queued it as
  still feasible, once the queue shows it can no longer make its deadline: that wait is in
  engine time, so it grows with 1 / time scale like the SLO does, hence bounds relative to it;
* the admitted requests keep their SLOs: attainment of the 2xx answers >= ``--min-admitted-pct``
  in every phase (default 85: the goodput target of 90 % less 5 points for the cost model's
  per-request scatter and the engines' stalls on a shared 2-core host; admission admits only
  what it predicts will fit within 0.9 of the SLO);
* the gateway sheds: at the highest factor at least half of the requests are refused;
* memory is bounded: no phase's peak RSS above ``RSS_GROWTH_LIMIT`` (2x) that of the 1x phase.
  The RSS includes the cost model's in-memory request log, which grows with every *served*
  request (~50 KB each for these prompts: their hashed n-grams) up to ``cost_model.max_records``;
  ``--set cost_model.max_records=100`` leaves what the overload itself costs;
* it recovers within the recovery phase.

**Output**: a markdown table on stdout, everything as JSON in ``--out`` (default:
``overload.json`` in a new temporary directory, never the repository), and with ``--plot`` a
figure over time: requests/s by answer, TTFT of the admitted requests against the SLO, time to
a rejection, the gateway's RSS and fds. ``--keep-logs`` keeps the engines' and the gateway's
logs (``logs: DIR``). ``--set KEY=VALUE`` changes a gateway config value (dotted key, YAML
value); ``--wait-quiet S`` waits up to S s for other processes on the host to calm down first.

**Cost**: the default run (capacity search of 4 probes of 12 s, then 30 + 3 x 30 + 45 s of
phases) takes ~4 minutes; ``--quick`` (model capacity, time scale 0.25, phases of 3-6 s, 19 s in
all) about 30 s, for the test (tests/test_overload_bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _host import describe_host, host_cpu_s, machine, other_load, proc_cpu_s, process_tree, wait_quiet
from slo_goodput import Fleet, _stop_all, code_version, free_ports

from pdgate.common.http_client import Origin, UpstreamPool, UpstreamResponse
from pdgate.common.perf_model import StepBatch, load_profile
from pdgate.common.runtime import run_async
from pdgate.common.tokenizer import load_tokenizer
from pdgate.gateway.config import GatewayConfig
from pdgate.loadgen.client import Target
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.runner import LoadConfig, run_load
from pdgate.loadgen.slo import Slo, meets
from pdgate.loadgen.types import BenchRequest, RequestResult
from pdgate.loadgen.workloads import synthetic

MODEL = "llama-3-8b"
PROFILE = "h100-llama-3-8b"
MAX_MODEL_LEN = 8192
TOKEN_BUDGET = 8192  # the sim's --max-num-batched-tokens default
TARGET_PCT = 90.0  # goodput's attainment target (docs/slo.md)
MODEL_UTILIZATION = 0.75  # --capacity model: this share of the prefill engine's saturated throughput
INDEX_HEADER = "x-overload-index"  # each request's index, so its answer's headers can be kept
KEPT_HEADERS = ("retry-after", "x-pdgate-reject-reason")
REJECTED = (429, 503)
FAST_REJECT_P50 = 0.10  # of the TTFT SLO: the median rejection comes within this share of it
FAST_REJECT_P99 = 0.25  # ... and the 99th percentile within this
MIN_REJECTIONS = 20  # a phase's own percentiles are checked from this many rejections on (all pooled always)
RSS_GROWTH_LIMIT = 2.0
RECOVERY_TOLERANCE = 0.10  # attainment / rejection share within 10 points of the 1x phase's
SHED_AT_TOP_MIN = 0.5  # at the highest factor at least this share is refused
OTHER_LOAD_WARN = 0.5  # cores other processes took: the phase's figures may be distorted
LATE_WARN_MS = 50.0  # client lateness p99 above this: the client may have been the bottleneck
SAMPLE_S = 0.1


# ----------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Phase:
    name: str
    factor: float  # of the capacity
    duration_s: float  # wall


@dataclass(frozen=True)
class Settings:
    time_scale: float
    prompt_tokens: tuple[int, int]  # uniform, inclusive
    output_tokens: int
    ttft_ms: float  # simulated
    tpot_ms: float  # simulated
    phases: tuple[Phase, ...]
    capacity: str  # measure | model | a wall rate
    probe_s: float
    max_probes: int
    window_s: float
    min_admitted_pct: float
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()  # --set: dotted gateway config keys and their values

    @property
    def slo(self) -> Slo:
        """The SLO in wall seconds (what the gateway is told and the client measures)."""
        return Slo(ttft_s=self.ttft_ms / 1e3 / self.time_scale, tpot_s=self.tpot_ms / 1e3 / self.time_scale)

    @property
    def mean_prompt(self) -> float:
        return sum(self.prompt_tokens) / 2


def phases_from(args: argparse.Namespace) -> tuple[Phase, ...]:
    factors = [float(f) for f in args.factors.split(",") if f.strip()]
    return (
        Phase("1x", 1.0, args.warmup_s),
        *(Phase(f"{f:g}x", f, args.phase_s) for f in factors),
        Phase(f"recovery {args.recovery_factor:g}x", args.recovery_factor, args.recovery_s),
    )


# ----------------------------------------------------------------------------------- capacity
def saturated_prefill_rps(mean_prompt: float, time_scale: float) -> float:
    """Prompts per wall second one prefill engine finishes when every step is a full chunked
    batch of TOKEN_BUDGET tokens (the calibrated step time)."""
    profile = load_profile(PROFILE)
    per_step = TOKEN_BUDGET / mean_prompt
    pairs = int(per_step * mean_prompt * (mean_prompt + 1) / 2)
    step = profile.step_time(StepBatch(prefill_tokens=TOKEN_BUDGET, prefill_attn_pairs=pairs))
    return per_step / step * time_scale


def model_capacity(settings: Settings) -> float:
    """The wall rate ``--capacity model`` takes: MODEL_UTILIZATION of the saturated prefill rate
    (decode never binds at these output lengths: one engine keeps >100 streams within the TPOT)."""
    return MODEL_UTILIZATION * saturated_prefill_rps(settings.mean_prompt, settings.time_scale)


def next_probe(good: float | None, bad: float | None, step: float = 1.5) -> float:
    """The next rate of a goodput search: up or down by ``step`` until bracketed, then the
    geometric middle of the bracket."""
    if good is not None and bad is not None:
        return math.sqrt(good * bad)
    if bad is None:
        assert good is not None
        return good * step
    return bad / step


# ----------------------------------------------------------------------------------- workload
def arrival_plan(phases: Sequence[Phase], capacity: float, seed: int) -> list[tuple[float, int]]:
    """Poisson arrivals through the phases, each at its factor of ``capacity``: (wall time, phase)."""
    rng = np.random.default_rng(seed)
    plan: list[tuple[float, int]] = []
    start = 0.0
    for i, phase in enumerate(phases):
        rate, end = phase.factor * capacity, start + phase.duration_s
        t = start + rng.exponential(1.0 / rate)
        while t < end:
            plan.append((t, i))
            t += rng.exponential(1.0 / rate)
        start = end
    return plan


def build_requests(times: Sequence[float], settings: Settings, seed: int) -> list[BenchRequest]:
    """One completion per arrival time, each naming its index in INDEX_HEADER."""
    lo, hi = settings.prompt_tokens
    builder = PromptBuilder(load_tokenizer("builtin"), seed=seed)
    built = synthetic(len(times), f"uniform:{lo}:{hi}", settings.output_tokens, builder, seed=seed)
    return [
        dataclasses.replace(r, index=i, arrival_s=t, headers={INDEX_HEADER: str(i)})
        for i, (r, t) in enumerate(zip(built, times))
    ]


class HeaderRecorder:
    """An :class:`~pdgate.common.http_client.Upstream` over a real pool that keeps, per request
    index (INDEX_HEADER), the KEPT_HEADERS of its answer (the load generator keeps no headers)."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.headers: dict[int, dict[str, str]] = {}

    async def request(
        self, origin: Origin, method: str, path: str, body: bytes, *, headers: dict[str, str], timeout_s: float
    ) -> UpstreamResponse:
        response = await self.pool.request(origin, method, path, body, headers=headers, timeout_s=timeout_s)
        index = headers.get(INDEX_HEADER)
        if index is not None:
            self.headers[int(index)] = {k: v for k, v in response.headers.items() if k in KEPT_HEADERS}
        return response

    async def close(self) -> None:
        await self.pool.close()


@dataclass
class Answer:
    """One request as measured: the client's result and its answer's kept headers."""

    result: RequestResult
    headers: dict[str, str]
    phase: int = 0


async def send_all(url: str, requests: Sequence[BenchRequest], drain_s: float) -> list[Answer]:
    """Send ``requests`` at their arrival times (open loop) and wait for every answer."""
    if not requests:
        return []
    recorder = HeaderRecorder(UpstreamPool(idle_timeout_s=4.0))
    span = max((r.arrival_s or 0.0) for r in requests)
    config = LoadConfig(arrivals="trace", timeout_s=drain_s, duration_s=span + 1.0, drain_s=drain_s)
    try:
        results, _ = await run_load(Target("pdgate", url, MODEL), requests, config, upstream=recorder)
    finally:
        await recorder.close()
    return [Answer(r, recorder.headers.get(r.index, {})) for r in results]


# ----------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class MemSample:
    t: float
    rss_kb: int
    fds: int


@dataclass(frozen=True)
class CpuMark:
    t: float
    host_busy_s: float
    steal_s: float
    ours_s: float


def rss_kb(pid: int) -> int:
    """VmRSS of a process (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def cpu_mark(t: float, roots: Sequence[int]) -> CpuMark:
    """The host's busy and steal CPU seconds and those of ``roots`` and their descendants."""
    busy, steal = host_cpu_s()
    pids = {os.getpid()}
    for root in roots:
        pids |= set(process_tree(root))
    ours = 0.0
    for pid in pids:
        try:
            ours += proc_cpu_s(pid)
        except OSError:
            pass
    return CpuMark(t, busy, steal, ours)


class Sampler:
    """The gateway's RSS and fds every SAMPLE_S, and CPU marks at the phase boundaries, on a
    clock whose 0 is the run's start."""

    def __init__(self, gateway_pid: int, roots: Sequence[int], clock: Callable[[], float]) -> None:
        self.gateway_pid = gateway_pid
        self.roots = list(roots)
        self.clock = clock
        self.memory: list[MemSample] = []
        self.marks: list[CpuMark] = []

    async def memory_loop(self) -> None:
        while True:
            self.memory.append(MemSample(self.clock(), rss_kb(self.gateway_pid), open_fds(self.gateway_pid)))
            await asyncio.sleep(SAMPLE_S)

    async def marks_at(self, boundaries: Sequence[float]) -> None:
        for at in boundaries:
            await asyncio.sleep(max(0.0, at - self.clock()))
            self.marks.append(cpu_mark(self.clock(), self.roots))


# ----------------------------------------------------------------------------------- figures
def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def outcome(a: Answer) -> str:
    """ok | broken (a 2xx whose stream failed) | 429 | 503 | 4xx | 5xx | none (no answer)."""
    r = a.result
    if r.status == 200:
        return "ok" if r.ok else "broken"
    if r.status in REJECTED:
        return str(r.status)
    if r.status == 0:
        return "none"
    return "4xx" if r.status < 500 else "5xx"


def has_retry_after(a: Answer) -> bool:
    value = a.headers.get("retry-after", "")
    return value.isdigit() and int(value) >= 1


def other_cores(first: CpuMark, last: CpuMark) -> tuple[float | None, float | None]:
    """Cores other processes took between two marks, and steal."""
    wall = last.t - first.t
    if wall <= 0:
        return None, None
    host = last.host_busy_s - first.host_busy_s
    return max(0.0, host - (last.ours_s - first.ours_s)) / wall, (last.steal_s - first.steal_s) / wall


def phase_figures(
    phase: Phase,
    start: float,
    answers: Sequence[Answer],
    capacity: float,
    slo: Slo,
    memory: Sequence[MemSample],
    marks: tuple[CpuMark, CpuMark] | None,
) -> dict[str, Any]:
    """Everything the report says of one phase (wall seconds, rates in requests/s)."""
    end = start + phase.duration_s
    results = [a.result for a in answers]
    kinds = [outcome(a) for a in answers]
    rejected = [a for a, k in zip(answers, kinds) if k in ("429", "503")]
    admitted = [a.result for a, k in zip(answers, kinds) if k in ("ok", "broken")]
    ok = [r for r in admitted if r.ok]
    met = [r for r in results if meets(r, slo)]
    ttft_met = [r for r in ok if r.ttft_s is not None and slo.ttft_s is not None and r.ttft_s <= slo.ttft_s]
    tpot_met = [r for r in ok if r.tpot_s is None or slo.tpot_s is None or r.tpot_s <= slo.tpot_s]
    reject_ms = [1e3 * a.result.e2e_s for a in rejected]
    lateness_ms = [1e3 * (r.sent_s - r.scheduled_s) for r in results]
    window = [m for m in memory if start <= m.t <= end]
    reasons: dict[str, int] = {}
    for a in rejected:
        reason = a.headers.get("x-pdgate-reject-reason", f"({a.result.status}, no reason)")
        reasons[reason] = reasons.get(reason, 0) + 1
    counts = {k: kinds.count(k) for k in ("ok", "broken", "429", "503", "4xx", "5xx", "none")}
    others, steal = other_cores(*marks) if marks else (None, None)
    return {
        "phase": phase.name,
        "factor": phase.factor,
        "start_s": round(start, 3),
        "duration_s": phase.duration_s,
        "intended_rps": round(phase.factor * capacity, 3),
        "scheduled_rps": round(len(results) / phase.duration_s, 3),
        "sent_rps": round(sum(1 for r in results if start <= r.sent_s < end) / phase.duration_s, 3),
        "client_late_p99_ms": _round(pct(lateness_ms, 99), 2),
        "requests": len(results),
        "answers": counts,
        "rejected": len(rejected),
        "rejected_share": _round(share(len(rejected), len(results)), 4),
        "rejected_with_retry_after": sum(1 for a in rejected if has_retry_after(a)),
        "retry_after_share": _round(share(sum(1 for a in rejected if has_retry_after(a)), len(rejected)), 4),
        "reject_reasons": dict(sorted(reasons.items())),
        "reject_ms": {"p50": _round(pct(reject_ms, 50), 2), "p99": _round(pct(reject_ms, 99), 2)},
        "admitted": len(admitted),
        "admitted_attainment": _round(share(sum(1 for r in admitted if meets(r, slo)), len(admitted)), 4),
        "admitted_ttft_attainment": _round(share(len(ttft_met), len(admitted)), 4),
        "admitted_tpot_attainment": _round(share(len(tpot_met), len(admitted)), 4),
        "attainment": _round(share(len(met), len(results)), 4),
        "goodput_rps": round(len(met) / phase.duration_s, 3),
        "ttft_ms": {
            "p50": _ms(pct([r.ttft_s for r in ok if r.ttft_s], 50)),
            "p99": _ms(pct([r.ttft_s for r in ok if r.ttft_s], 99)),
        },
        "tpot_ms": {
            "p50": _ms(pct([r.tpot_s for r in ok if r.tpot_s], 50)),
            "p99": _ms(pct([r.tpot_s for r in ok if r.tpot_s], 99)),
        },
        "rss_start_mb": round(window[0].rss_kb / 1024, 1) if window else None,
        "rss_peak_mb": round(max((m.rss_kb for m in window), default=0) / 1024, 1),
        "rss_end_mb": round(window[-1].rss_kb / 1024, 1) if window else None,
        "fds_peak": max((m.fds for m in window), default=0),
        "fds_end": window[-1].fds if window else None,
        "other_cores": _round(others, 2),
        "steal_cores": _round(steal, 2),
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1e3 * seconds, 1)


def distorted(p: Mapping[str, Any]) -> bool:
    """Other processes took a good share of the host, or the client sent late."""
    return (p["other_cores"] or 0.0) > OTHER_LOAD_WARN or (p["client_late_p99_ms"] or 0.0) > LATE_WARN_MS


def recovery(
    answers: Sequence[Answer], start: float, duration_s: float, window_s: float, slo: Slo, level: Mapping[str, Any]
) -> dict[str, Any]:
    """When the recovery phase is back at the 1x phase's ``level``: the start (from the phase's
    start) of the first ``window_s`` window from which on every window has attainment no more
    than RECOVERY_TOLERANCE below the level's and a rejected share no more than that above it."""
    n = max(1, math.ceil(duration_s / window_s - 1e-9))
    windows: list[list[Answer]] = [[] for _ in range(n)]
    for a in answers:
        windows[min(n - 1, int((a.result.scheduled_s - start) / window_s))].append(a)
    want_att = (level["attainment"] or 0.0) - RECOVERY_TOLERANCE
    max_rej = (level["rejected_share"] or 0.0) + RECOVERY_TOLERANCE
    rows = []
    for i, w in enumerate(windows):
        att = share(sum(1 for a in w if meets(a.result, slo)), len(w))
        rej = share(sum(1 for a in w if a.result.status in REJECTED), len(w))
        at_level = not w or ((att or 0.0) >= want_att and (rej or 0.0) <= max_rej)
        rows.append(
            {
                "from_s": round(i * window_s, 2),
                "requests": len(w),
                "attainment": _round(att, 3),
                "rejected_share": _round(rej, 3),
                "at_level": at_level,
            }
        )
    first = n
    while first > 0 and rows[first - 1]["at_level"]:
        first -= 1
    rejected_at = [a.result.scheduled_s - start for a in answers if a.result.status in REJECTED]
    return {
        "window_s": window_s,
        "level_attainment_min": round(want_att, 3),
        "level_rejected_max": round(max_rej, 3),
        "recovered_after_s": round(first * window_s, 2) if first < n else None,
        "last_rejection_s": round(max(rejected_at), 3) if rejected_at else None,
        "windows": rows,
    }


# ----------------------------------------------------------------------------------- invariants
@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def invariants(
    phases: Sequence[Mapping[str, Any]],
    rec: Mapping[str, Any],
    slo: Slo,
    min_admitted_pct: float,
    reject_ms: Sequence[float],
) -> list[Check]:
    """The properties the gateway must keep under overload (module docstring); ``reject_ms``:
    the time to every rejection of the run."""
    bad = {k: sum(p["answers"][k] for p in phases) for k in ("broken", "4xx", "5xx", "none")}
    rejected = sum(p["rejected"] for p in phases)
    with_retry = sum(p["rejected_with_retry_after"] for p in phases)
    ttft_ms = 1e3 * (slo.ttft_s or math.inf)
    p50_ms, p99_ms = FAST_REJECT_P50 * ttft_ms, FAST_REJECT_P99 * ttft_ms
    pooled = {"p50": _round(pct(reject_ms, 50), 2), "p99": _round(pct(reject_ms, 99), 2)}
    slow = [
        f"{name}: p50 {q['p50']} / p99 {q['p99']} ms"
        for name, n, q in [
            ("all", len(reject_ms), pooled),
            *((p["phase"], p["rejected"], p["reject_ms"]) for p in phases),
        ]
        if n >= (1 if name == "all" else MIN_REJECTIONS) and (q["p50"] > p50_ms or q["p99"] > p99_ms)
    ]
    low = [
        f"{p['phase']}: {100 * p['admitted_attainment']:.1f} % of {p['admitted']}"
        for p in phases
        if p["admitted"] and 100 * p["admitted_attainment"] < min_admitted_pct
    ]
    top = max(phases, key=lambda p: p["factor"])
    base_rss = phases[0]["rss_peak_mb"] or 0.0
    grown = [
        f"{p['phase']}: {p['rss_peak_mb']} MB" for p in phases[1:] if p["rss_peak_mb"] > RSS_GROWTH_LIMIT * base_rss
    ]
    return [
        Check(
            "answers are 2xx, 429 or a 503 with Retry-After",
            not any(bad.values()),
            "none other" if not any(bad.values()) else ", ".join(f"{k}: {v}" for k, v in bad.items() if v),
        ),
        Check("every rejection carries Retry-After", with_retry == rejected, f"{with_retry} of {rejected}"),
        Check(
            f"rejections are fast (p50 <= {p50_ms:.0f} ms, p99 <= {p99_ms:.0f} ms: "
            f"{100 * FAST_REJECT_P50:.0f} and {100 * FAST_REJECT_P99:.0f} % of the TTFT SLO; all pooled, and "
            f"each phase with >= {MIN_REJECTIONS})",
            not slow,
            "; ".join(slow) or f"all: p50 {pooled['p50']} / p99 {pooled['p99']} ms; every phase",
        ),
        Check(
            f"admitted requests meet their SLO (>= {min_admitted_pct:g} % in every phase)",
            not low,
            "; ".join(low) or "every phase",
        ),
        Check(
            f"the gateway sheds at {top['phase']} (>= {100 * SHED_AT_TOP_MIN:.0f} % refused)",
            (top["rejected_share"] or 0.0) >= SHED_AT_TOP_MIN,
            f"{100 * (top['rejected_share'] or 0.0):.1f} % refused",
        ),
        Check(
            f"memory is bounded (peak RSS <= {RSS_GROWTH_LIMIT:g}x the 1x phase's {base_rss} MB)",
            not grown,
            "; ".join(grown) or f"highest {max(p['rss_peak_mb'] for p in phases)} MB",
        ),
        Check(
            "it recovers when the load drops",
            rec["recovered_after_s"] is not None,
            f"back at the 1x level after {rec['recovered_after_s']} s"
            if rec["recovered_after_s"] is not None
            else "not back at the 1x level by the end of the phase",
        ),
    ]


# ----------------------------------------------------------------------------------- fleet
def fleet_config(settings: Settings) -> dict[str, Any]:
    """1 prefill + 1 decode sim engine on free ports and the gateway, with the SLO (wall ms)."""
    ports = free_ports(3)
    launch = {"profile": PROFILE, "time_scale": settings.time_scale}
    instances = [
        {
            "id": f"{role}-0",
            "url": f"http://127.0.0.1:{port}",
            "kind": "sim",
            "role": role,
            "model": MODEL,
            "launch": launch,
        }
        for role, port in zip(("prefill", "decode"), ports)
    ]
    slo = settings.slo
    config = {
        "host": "127.0.0.1",
        "port": ports[2],
        "models": [{"name": MODEL, "tokenizer": "builtin", "max_model_len": MAX_MODEL_LEN}],
        "instances": instances,
        "scrape_interval_s": 1.0 / settings.time_scale,  # as often in simulated time as at scale 1
        "stale_after_s": 5.0 / settings.time_scale,
        "slo": {
            "default": {"ttft_ms": round(1e3 * (slo.ttft_s or 0), 3), "tpot_ms": round(1e3 * (slo.tpot_s or 0), 3)}
        },
        "admission": {"enabled": True, "on_infeasible": "reject"},
    }
    for key, value in settings.overrides:
        set_dotted(config, key, value)
    GatewayConfig.model_validate(config)
    return config


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config[a][b] = value`` for the key ``a.b`` (sections made as needed)."""
    *path, last = key.split(".")
    for part in path:
        config = config.setdefault(part, {})
    config[last] = value


async def start_fleet(settings: Settings, workdir: Path, attempts: int = 2) -> Fleet:
    """A started fleet (a port taken meanwhile: started again once on other ports)."""
    for attempt in range(attempts):
        fleet = Fleet(fleet_config(settings), workdir / f"fleet{attempt}")
        try:
            await fleet.__aenter__()
            await fleet.warm_up(model=MODEL)
            return fleet
        except RuntimeError as exc:
            fleet.stop()
            if attempt + 1 == attempts:
                raise
            print(f"  (fleet did not start: {str(exc).splitlines()[0]}; trying again)", flush=True)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------- runs
async def probe(fleet: Fleet, settings: Settings, rate: float, seed: int) -> float:
    """Attainment (429s and failures are misses) of ``probe_s`` of Poisson arrivals at ``rate``."""
    phase = Phase("probe", 1.0, settings.probe_s)
    times = [t for t, _ in arrival_plan([phase], rate, seed)]
    answers = await send_all(fleet.url, build_requests(times, settings, seed), drain_s=60.0)
    slo = settings.slo
    return sum(1 for a in answers if meets(a.result, slo)) / len(answers) if answers else 0.0


async def find_capacity(fleet: Fleet, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """The capacity as ``--capacity`` says, and the probes that found it."""
    estimate = model_capacity(settings)
    info: dict[str, Any] = {"how": settings.capacity, "model_rps": round(estimate, 3), "probes": []}
    if settings.capacity == "model":
        info["rps"] = estimate
        return info
    if settings.capacity != "measure":
        info["rps"] = float(settings.capacity)
        return info
    good: float | None = None
    bad: float | None = None
    rate = estimate
    for n in range(settings.max_probes):
        attained = await probe(fleet, settings, rate, settings.seed + 1000 + n)
        info["probes"].append({"rps": round(rate, 3), "attainment": round(attained, 4)})
        log(f"  capacity probe {rate:.2f} req/s: {100 * attained:.1f} % within SLO")
        if 100 * attained >= TARGET_PCT:
            good = rate if good is None else max(good, rate)
        else:
            bad = rate if bad is None else min(bad, rate)
        rate = next_probe(good, bad)
    info["rps"] = good if good is not None else (bad or estimate) / 1.5
    if good is None:
        info["note"] = "no probe reached the target: the lowest probed rate / 1.5"
    return info


async def run_phases(fleet: Fleet, settings: Settings, capacity: float) -> dict[str, Any]:
    """The phases as one open-loop run; per-phase figures, recovery and the samples."""
    plan = arrival_plan(settings.phases, capacity, settings.seed)
    requests = build_requests([t for t, _ in plan], settings, settings.seed)
    starts = list(np.cumsum([0.0, *(p.duration_s for p in settings.phases)]))
    assert fleet.gateway is not None
    t0 = time.monotonic()
    sampler = Sampler(fleet.gateway.pid, [p.pid for p in fleet.processes], lambda: time.monotonic() - t0)
    tasks = [asyncio.create_task(sampler.memory_loop()), asyncio.create_task(sampler.marks_at(starts))]
    try:
        answers = await send_all(fleet.url, requests, drain_s=max(60.0, 5 * (settings.slo.ttft_s or 0)))
        sampler.marks.append(cpu_mark(sampler.clock(), sampler.roots))
        await asyncio.sleep(2 * SAMPLE_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for a, (_, phase) in zip(answers, plan):
        a.phase = phase
    slo = settings.slo
    marks = sampler.marks
    figures = [
        phase_figures(
            phase,
            starts[i],
            [a for a in answers if a.phase == i],
            capacity,
            slo,
            sampler.memory,
            (marks[i], marks[i + 1]) if i + 1 < len(marks) else None,
        )
        for i, phase in enumerate(settings.phases)
    ]
    last = len(settings.phases) - 1
    rec = recovery(
        [a for a in answers if a.phase == last],
        starts[last],
        settings.phases[last].duration_s,
        settings.window_s,
        slo,
        figures[0],
    )
    before = [a.result.end_s for a in answers if a.phase < last]
    # when the last answer to a request of the earlier phases came (the backlog the drop left), from the drop
    rec["backlog_done_s"] = round(max(before) - starts[last], 3) if before else None
    return {
        "phases": figures,
        "recovery": rec,
        "reject_ms": [round(1e3 * a.result.e2e_s, 2) for a in answers if outcome(a) in ("429", "503")],
        "timeline": timeline(answers, sampler.memory),
        "gateway_hwm_mb": hwm_mb(fleet.gateway.pid),
    }


def hwm_mb(pid: int) -> float | None:
    """VmHWM (peak RSS since start) of a process, MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def timeline(answers: Sequence[Answer], memory: Sequence[MemSample]) -> dict[str, Any]:
    """Per request (scheduled time, outcome, TTFT or time to rejection) and the memory samples,
    for the figure."""
    return {
        "requests": [
            [round(a.result.scheduled_s, 3), outcome(a), _round(a.result.ttft_s, 4), round(a.result.e2e_s, 4)]
            for a in answers
        ],
        "memory": [[round(m.t, 2), m.rss_kb, m.fds] for m in memory],
    }


# ----------------------------------------------------------------------------------- report
def markdown(result: Mapping[str, Any]) -> str:
    s, cap = result["settings"], result["capacity"]
    slo = result["slo_wall_ms"]
    lines = [
        f"### Overload: 1P1D sim fleet at time scale {s['time_scale']:g}, capacity {cap['rps']:.2f} req/s "
        f"({cap['how']}; model estimate {cap['model_rps']:.2f}), SLO TTFT {slo['ttft']:.0f} ms / TPOT "
        f"{slo['tpot']:.0f} ms wall ({s['ttft_ms']:g} / {s['tpot_ms']:g} ms simulated)",
        "",
        "| phase | offered req/s: intended (scheduled / sent) | 2xx | 429 | 503 | other | Retry-After "
        "| to rejection p50 / p99 ms | admitted within SLO % (TTFT / TPOT) | goodput req/s "
        "| gateway RSS peak MB | fds peak | other load cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["phases"]:
        a = p["answers"]
        other = a["broken"] + a["4xx"] + a["5xx"] + a["none"]
        retry = "-" if not p["rejected"] else f"{100 * p['retry_after_share']:.0f} %"
        rej = "-" if not p["rejected"] else f"{p['reject_ms']['p50']:.1f} / {p['reject_ms']['p99']:.1f}"
        adm = "-"
        if p["admitted"]:
            both, ttft, tpot = (_pct(p[f"admitted_{k}attainment"]) for k in ("", "ttft_", "tpot_"))
            adm = f"{both} ({ttft} / {tpot})"
        flag = "*" if distorted(p) else ""
        lines.append(
            f"| {p['phase']}{flag} | {p['intended_rps']:.1f} ({p['scheduled_rps']:.1f} / {p['sent_rps']:.1f}) "
            f"| {a['ok']} | {a['429']} | {a['503']} | {other} | {retry} | {rej} | {adm} | {p['goodput_rps']:.2f} "
            f"| {p['rss_peak_mb']:.0f} | {p['fds_peak']} "
            f"| {_num(p['other_cores'])} |"
        )
    rec = result["recovery"]
    after = rec["recovered_after_s"]
    lines += [
        "",
        f"Recovery: back at the 1x level (attainment >= {100 * rec['level_attainment_min']:.0f} %, refused <= "
        f"{100 * rec['level_rejected_max']:.0f} % in every {rec['window_s']:g}-s window from then on) "
        + (f"{after:g} s after the drop" if after is not None else "NOT within the phase")
        + (
            f"; last rejection {rec['last_rejection_s']:.2f} s after it"
            if rec["last_rejection_s"] is not None
            else "; no rejection in the phase"
        )
        + f"; the last answer to the earlier phases' requests came {rec['backlog_done_s']} s after it.",
        f"Client: lateness p99 {max((p['client_late_p99_ms'] or 0) for p in result['phases']):.1f} ms at worst; "
        f"gateway peak RSS since its start (VmHWM) {result['gateway_hwm_mb']} MB. "
        "`*`: other processes took > "
        f"{OTHER_LOAD_WARN} cores or the client sent > {LATE_WARN_MS:g} ms late (p99).",
        "",
        "Reasons of the rejections: "
        + "; ".join(f"{p['phase']}: {p['reject_reasons']}" for p in result["phases"] if p["reject_reasons"]),
        "",
    ]
    for c in result["invariants"]:
        lines.append(f"- [{'x' if c['ok'] else ' '}] {c['name']}: {c['detail']}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(result: Mapping[str, Any], path: Path) -> None:
    """Four panels over the run's wall time, phases shaded (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["timeline"]["requests"]
    mem = np.array(result["timeline"]["memory"] or [[0, 0, 0]], dtype=float)
    end = sum(p["duration_s"] for p in result["phases"])
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    bins = np.arange(0.0, end + 1.0, 1.0)
    for kind, color in (("ok", "tab:green"), ("429", "tab:orange"), ("503", "tab:red")):
        counts, _ = np.histogram([r[0] for r in rows if r[1] == kind], bins=bins)
        axes[0].step(bins[:-1], counts, where="post", color=color, label=f"{kind} (by send time)")
    axes[0].set_ylabel("requests / s")
    slo = result["slo_wall_ms"]
    ok = [(r[0], 1e3 * r[2]) for r in rows if r[1] == "ok" and r[2] is not None]
    axes[1].scatter([t for t, _ in ok], [v for _, v in ok], s=4, color="tab:green", label="TTFT of 2xx")
    axes[1].axhline(slo["ttft"], color="black", linestyle="--", label="TTFT SLO")
    axes[1].set_ylabel("TTFT ms")
    rej = [(r[0], 1e3 * r[3]) for r in rows if r[1] in ("429", "503")]
    axes[2].scatter([t for t, _ in rej], [v for _, v in rej], s=4, color="tab:orange", label="time to a rejection")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("ms")
    axes[3].plot(mem[:, 0], mem[:, 1] / 1024, color="tab:blue", label="gateway RSS MB")
    twin = axes[3].twinx()
    twin.plot(mem[:, 0], mem[:, 2], color="tab:gray", label="open fds")
    twin.set_ylabel("open fds (gray)")
    axes[3].set_ylabel("MB")
    axes[3].set_xlabel("wall seconds")
    for ax in axes:
        for i, p in enumerate(result["phases"]):
            if i % 2:
                ax.axvspan(p["start_s"], p["start_s"] + p["duration_s"], color="0.93", zorder=0)
        ax.legend(loc="upper left", fontsize=8)
    for p in result["phases"]:
        axes[0].text(p["start_s"] + 0.5, axes[0].get_ylim()[1] * 0.9, p["phase"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--factors", default="2,5,10", help="overload phases, as multiples of the capacity")
    ap.add_argument("--phase-s", type=float, default=30.0, help="wall seconds of each overload phase")
    ap.add_argument("--warmup-s", type=float, default=30.0, help="wall seconds of the 1x phase (the reference)")
    ap.add_argument("--recovery-factor", type=float, default=0.5)
    ap.add_argument("--recovery-s", type=float, default=45.0)
    ap.add_argument("--window-s", type=float, default=5.0, help="recovery windows")
    ap.add_argument("--capacity", default="measure", help="measure | model | a wall rate in requests/s")
    ap.add_argument("--probe-s", type=float, default=12.0, help="wall seconds of arrivals per capacity probe")
    ap.add_argument("--max-probes", type=int, default=4)
    ap.add_argument("--time-scale", type=float, default=0.1, help="simulated seconds per wall second")
    ap.add_argument("--prompt-tokens", default="768:1280", help="LO:HI, uniform")
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--ttft-ms", type=float, default=200.0, help="TTFT SLO, simulated ms")
    ap.add_argument("--tpot-ms", type=float, default=25.0, help="TPOT SLO, simulated ms")
    ap.add_argument("--min-admitted-pct", type=float, default=85.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a gateway config value (dotted key, YAML value), e.g. cost_model.max_records=1000; repeatable",
    )
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to S s for other processes to calm down")
    ap.add_argument("--out", help="JSON results (default: overload.json in a new temporary directory)")
    ap.add_argument("--plot", help="a PNG of the run over time")
    ap.add_argument("--keep-logs", action="store_true", help="keep the engines' and gateway's logs (printed path)")
    ap.add_argument(
        "--quick", action="store_true", help="smoke test (~30 s): model capacity, time scale 0.25, short phases"
    )
    args = ap.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        quick = {
            "--capacity": "model",
            "--time-scale": 0.25,
            "--warmup-s": 4.0,
            "--phase-s": 3.0,
            "--recovery-s": 6.0,
            "--window-s": 2.0,
        }
        for flag, value in quick.items():
            if not any(g == flag or g.startswith(flag + "=") for g in given):
                setattr(args, flag[2:].replace("-", "_"), value)
    if args.capacity not in ("measure", "model"):
        try:
            if float(args.capacity) <= 0:
                raise ValueError
        except ValueError:
            ap.error("--capacity: measure, model or a positive rate")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    lo, _, hi = args.prompt_tokens.partition(":")
    return Settings(
        time_scale=args.time_scale,
        prompt_tokens=(int(lo), int(hi or lo)),
        output_tokens=args.output_tokens,
        ttft_ms=args.ttft_ms,
        tpot_ms=args.tpot_ms,
        phases=phases_from(args),
        capacity=args.capacity,
        probe_s=args.probe_s,
        max_probes=args.max_probes,
        window_s=args.window_s,
        min_admitted_pct=args.min_admitted_pct,
        seed=args.seed,
        overrides=tuple(_override(item) for item in args.set),
    )


def _override(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set {item!r}: use KEY=VALUE")
    return key.strip(), yaml.safe_load(value)


async def main_async(settings: Settings, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    started = time.monotonic()
    fleet = await start_fleet(settings, workdir)
    try:
        log(f"fleet up in {time.monotonic() - started:.1f} s: {fleet.url}")
        capacity = await find_capacity(fleet, settings, log)
        log(f"capacity {capacity['rps']:.2f} req/s ({capacity['how']}; model estimate {capacity['model_rps']:.2f})")
        phases = " -> ".join(
            f"{p.name} {p.factor * capacity['rps']:.1f} req/s for {p.duration_s:g} s" for p in settings.phases
        )
        log(f"phases: {phases}")
        run = await run_phases(fleet, settings, capacity["rps"])
    finally:
        fleet.stop()
    slo = settings.slo
    return {
        "capacity": capacity,
        "slo_wall_ms": {"ttft": 1e3 * (slo.ttft_s or 0), "tpot": 1e3 * (slo.tpot_s or 0)},
        **run,
        "invariants": [
            dataclasses.asdict(c)
            for c in invariants(run["phases"], run["recovery"], slo, settings.min_admitted_pct, run["reject_ms"])
        ],
        "wall_s": round(time.monotonic() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    workdir = Path(tempfile.mkdtemp(prefix="pdgate-overload-"))  # the logs; the JSON too unless --out
    out = Path(args.out) if args.out else workdir / "overload.json"
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    host = machine()
    load = other_load(1.0 if args.quick else 2.0)
    print(describe_host(host, load), flush=True)
    try:
        result = run_async(main_async(settings, workdir, lambda s: print(s, flush=True)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every engine and gateway stopped", file=sys.stderr)
        return 130
    finally:
        _stop_all()
        if args.keep_logs:
            print(f"logs: {workdir}")
        else:
            for logs in workdir.glob("fleet*"):
                shutil.rmtree(logs, ignore_errors=True)
    result = {
        "benchmark": "overload",
        "profile": PROFILE,
        "fleet": "1 prefill + 1 decode sim engine, vLLM flavour, pdgate serve --workers 1",
        "settings": {**dataclasses.asdict(settings), "phases": [dataclasses.asdict(p) for p in settings.phases]},
        "host": {**host, "other_load_before": load},
        "code": code_version(),
        **result,
    }
    print()
    print(markdown(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    if args.plot:
        plot(result, Path(args.plot))
        print(f"wrote {args.plot}")
    if not args.keep_logs and not any(workdir.iterdir()):
        workdir.rmdir()
    return 0 if all(c["ok"] for c in result["invariants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
