#!/usr/bin/env python3
"""Adaptive prefill/decode (issue 17): static splits against the per-request decision and the
full adaptive loop, on a workload whose mix shifts.

    python benchmarks/adaptive_pd.py [--phase-s 120] [--rates a,b,c] [--rate-scale X]
        [--phases prefill-heavy,decode-heavy,prefix-sharing]
        [--variants 1P3D,2P2D,3P1D,4C,per-request,adaptive[,balancer-only]] [--admission on,off]
        [--ttft-ms 400] [--tpot-ms 15] [--interval-s S] [--min-dwell-s S] [--window-s 5] [--poll-s 1]
        [--drain-s 60] [--time-scale X] [--seed S] [--wait-quiet S] [--out results.json]
        [--plot attainment.png] [--keep-logs] [--quick]

**Workload**: three phases back to back, ``--phase-s`` simulated seconds each, built from the real
traces in ../shared/data (``PDGATE_DATA``) with ``benchmarks/slo_goodput.py``'s trace windows
(``TraceWorkload``; table ``PHASES`` below says which window and what was shaped):

* ``prefill-heavy``: Azure code (prompts ~2k tokens, outputs ~27);
* ``decode-heavy``: Azure conversation (prompts ~1.2k, outputs ~260);
* ``prefix-sharing``: Mooncake (blocks 512 -> 64 tokens as slo_goodput shapes it, ~2k-token
  prompts of which ~2/3 of the blocks repeat, outputs ~130).

Each phase's arrivals follow its trace's own pattern scaled to the phase's rate (``--rates``, req/s,
times ``--rate-scale``); prompt and output lengths come from the trace (``ignore_eos``). One
request list (``--seed``) is sent, identically, to every variant.

Default rates (30, 32, 32 req/s) put each phase near the knee of its best static split (~90-100 %
attainment there with admission on, on this box), where the other splits already fall behind.
Azure code has idle minutes between bursts: cut to 2 s (``PHASES``). 120-s phases need 3,840
Mooncake records of the trace's 3,993: at most ~33 req/s there.

**SLO**: one class, TTFT <= ``--ttft-ms`` (400) and mean TPOT <= ``--tpot-ms`` (15); a request
meets it when it completes within both; a rejected (429) or failed request is a miss. TPOT 15 ms
(~2x the unloaded decode step, 7.8 ms) rather than 25: at 25 ms one simulated decode instance
keeps ~200 streams, more than this 2-core host can drive, so no phase would need a second decode
instance and 3P1D would be best everywhere; at 15 ms it keeps ~80, and the conversation phase needs
two.

**Variants**, each on a fresh fleet of 4 simulated engines (``pdgate engine sim``, H100 /
Llama-3-8B, vLLM flavour, KV events) and a fresh ``pdgate serve`` (slo_goodput's ``Fleet``),
stopped after the run: ``1P3D``, ``2P2D``, ``3P1D`` (static roles, ``pd-split``), ``4C`` (four
colocated ``both`` instances), ``per-request`` (``pd-adaptive`` over 2P2D flex instances, no
role balancer: a request is served whole on its decode instance when that is predicted faster)
and ``adaptive`` (the same plus ``role_balancer`` with ``--interval-s`` / ``--min-dwell-s``,
default min(2 s, phase/15) and phase/12: the flex instances change roles as the mix shifts); not
by default, ``balancer-only`` (the role balancer with ``pd-split``: its effect alone). Every variant
runs with the gateway's SLO admission on and off (``--admission``; off is
``admission: {enabled: false}``), the default scheduling otherwise.

**Measured**, per variant and admission setting, per phase and over the run: goodput (SLO-met
requests per second), token goodput (prompt + output tokens of SLO-met requests per second:
admission sheds mostly long prompts, so requests alone flatter it), attainment, TTFT and TPOT
p50 / p90, 429s and failures; for the flex variants the serving roles (``GET /admin/instances``
every second), the role balancer's plans (``GET /admin/plan``), ``pdgate_role_changes_total``,
``pdgate_pd_decisions_total`` (split vs colocated), ``GET /cost-model`` at the end; role changes
per minute. The ratios to the best static split (over the run, and per phase against that
phase's best static split) end the report, with an ``oracle`` row: the best static split of
each phase, switching free, the most any adaptive scheme could gain on this workload. ``--plot``: attainment over time in ``--window-s`` windows per variant, phase
boundaries shaded, the adaptive loop's role changes marked. Every run also records the
engines' lag, the load generator's lateness and the CPU of fleet, gateway, client and of other
processes on the host (``*``: possibly distorted, as in slo_goodput): this box is shared, and
``--wait-quiet S`` waits up to S seconds before each run for other processes to calm down.

**Time**: simulated seconds; ``--time-scale`` (default 1) as in slo_goodput.

**Cost**: each variant and admission setting takes the phases' length plus ~10 s (start, drain,
stop). The default (3 x 120 s, 6 variants, admission on and off: 12 runs) takes ~75 minutes on
the project's 2-core box; ``--phase-s 40`` 26 minutes; ``--quick`` (3 x 8 s at 0.2x the rates,
2P2D and adaptive, admission on) ~1 minute.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import math
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for extra in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import slo_goodput as sg
from _host import TreeCpu, describe_host, host_cpu_s, machine, other_load, wait_quiet
from prometheus_client.parser import text_string_to_metric_families

from pdgate.common.runtime import run_async
from pdgate.gateway.config import DEFAULT_SCHEDULING, GatewayConfig
from pdgate.loadgen.client import Target
from pdgate.loadgen.runner import LoadConfig, run_load
from pdgate.loadgen.slo import Slo, SloSpec
from pdgate.loadgen.stats import GroupStats
from pdgate.loadgen.types import BenchRequest, RequestResult
from pdgate.simulate.fleet import resized
from pdgate.simulate.run import run_simulation, simulation_config

MODEL = sg.MODEL


# --------------------------------------------------------------------------------------------
# Phases: which slo_goodput trace, its window, and the default rate (req/s, simulated)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhaseSpec:
    name: str
    trace: str  # a key of slo_goodput.TRACES
    rate: float  # default req/s
    note: str
    window: Mapping[str, Any] = field(default_factory=dict)  # TraceSpec fields replaced (offset, ...)
    max_gap_s: float | None = None  # native inter-arrival gaps cut to this (the trace's idle minutes)


PHASES: dict[str, PhaseSpec] = {
    # Azure code from record 5000: whole minutes without a request sit between its bursts (60-70 %
    # of any window of a few thousand records); scaled to a mean rate, the phase would idle most of
    # its time and take the rest as one compressed burst, so native gaps over 2 s are cut to 2 s
    # (the bursts' own pattern kept: inter-arrival CV ~2).
    "prefill-heavy": PhaseSpec(
        "prefill-heavy",
        "azure-code",
        30.0,
        "Azure code from record 5000, idle gaps cut to 2 s (CV ~2), prompts cut at 7168",
        window={"offset": 5000},
        max_gap_s=2.0,
    ),
    "decode-heavy": PhaseSpec(
        "decode-heavy", "azure-conv", 32.0, "Azure conversation from record 400 (CV ~1), prompts cut at 7168"
    ),
    "prefix-sharing": PhaseSpec(
        "prefix-sharing",
        "mooncake",
        32.0,
        "Mooncake's last N records, blocks 512 -> 64 tokens, prompts cut at 7168",
    ),
}

# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------
STATIC = ("1P3D", "2P2D", "3P1D", "4C")


@dataclass(frozen=True)
class Variant:
    name: str
    roles: tuple[str, str, str, str]  # the role each instance serves in at the start
    note: str
    flex: bool = False  # role: flex (serving: the role above)
    pd_adaptive: bool = False  # profile handler pd-adaptive (else the default pd-split)
    balancer: bool = False  # role_balancer.enabled


VARIANTS: dict[str, Variant] = {
    "1P3D": Variant("1P3D", ("prefill", "decode", "decode", "decode"), "static 1 prefill + 3 decode"),
    "2P2D": Variant("2P2D", ("prefill", "prefill", "decode", "decode"), "static 2 prefill + 2 decode"),
    "3P1D": Variant("3P1D", ("prefill", "prefill", "prefill", "decode"), "static 3 prefill + 1 decode"),
    "4C": Variant("4C", ("both", "both", "both", "both"), "4 colocated (role both)"),
    "per-request": Variant(
        "per-request",
        ("prefill", "prefill", "decode", "decode"),
        "pd-adaptive over 2P2D flex instances, no role balancer",
        flex=True,
        pd_adaptive=True,
    ),
    "adaptive": Variant(
        "adaptive",
        ("prefill", "prefill", "decode", "decode"),
        "pd-adaptive + role balancer, flex instances starting 2P2D",
        flex=True,
        pd_adaptive=True,
        balancer=True,
    ),
    # not in the default set: the role balancer alone (pd-split), to tell its effect from pd-adaptive's
    "balancer-only": Variant(
        "balancer-only",
        ("prefill", "prefill", "decode", "decode"),
        "role balancer with pd-split, flex instances starting 2P2D",
        flex=True,
        balancer=True,
    ),
}
DEFAULT_VARIANTS = ("1P3D", "2P2D", "3P1D", "4C", "per-request", "adaptive")


def variant_config(
    variant: Variant,
    admission: bool,
    ports: Sequence[int],
    slo: Slo,
    time_scale: float,
    interval_s: float,
    min_dwell_s: float,
) -> dict[str, Any]:
    """The gateway config of one run: slo_goodput's fleet on ``ports`` (4 engines, 4 KV-event
    ports, the gateway), with the variant's roles, handler and balancer; times in wall seconds."""
    config = sg.base_config(ports[:4], ports[4:8], ports[8], time_scale)
    for n, (inst, role) in enumerate(zip(config["instances"], variant.roles, strict=True)):
        inst["id"] = f"sim-{n}"
        if variant.flex:
            inst.update(role="flex", serving=role)
        else:
            inst["role"] = role
    config["slo"] = {
        "default": {
            "ttft_ms": round(1e3 * (slo.ttft_s or 0) / time_scale, 3),
            "tpot_ms": round(1e3 * (slo.tpot_s or 0) / time_scale, 3),
        }
    }
    if not admission:
        config["admission"] = {"enabled": False}
    if variant.pd_adaptive:
        config["scheduling"] = {**copy.deepcopy(DEFAULT_SCHEDULING), "profileHandler": {"type": "pd-adaptive"}}
    if variant.balancer:
        config["role_balancer"] = {
            "enabled": True,
            "interval_s": interval_s / time_scale,
            "min_dwell_s": min_dwell_s / time_scale,
        }
    GatewayConfig.model_validate(config)  # fail here, with pydantic's message, rather than in the child
    return config


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    start_s: float
    end_s: float
    rate: float
    indices: range  # of the requests in the combined list
    info: dict[str, Any]


@dataclass
class Workload:
    requests: list[BenchRequest]
    phases: list[Phase]

    @property
    def span_s(self) -> float:
        return self.phases[-1].end_s

    def tokens(self, index: int) -> int:
        """Prompt + output tokens of a request (``ignore_eos``: the output is ``max_tokens``)."""
        r = self.requests[index]
        return r.prompt_tokens + r.max_tokens


def clip_gaps(pool: Sequence[BenchRequest], max_gap_s: float) -> list[BenchRequest]:
    """``pool`` with every gap between consecutive arrivals cut to at most ``max_gap_s``."""
    out, t, prev = [], 0.0, None
    for r in pool:
        at = r.arrival_s or 0.0
        t += 0.0 if prev is None else min(max_gap_s, at - prev)
        prev = at
        out.append(dataclasses.replace(r, arrival_s=t))
    return out


def build_workload(names: Sequence[str], rates: Sequence[float], phase_s: float, seed: int) -> Workload:
    """The phases back to back, each ``phase_s`` long at its rate; indices renumbered 0..N-1."""
    requests: list[BenchRequest] = []
    phases = []
    for k, (name, rate) in enumerate(zip(names, rates, strict=True)):
        spec = PHASES[name]
        n = max(2, round(rate * phase_s))
        trace = dataclasses.replace(sg.TRACES[spec.trace], **{**spec.window, "max_requests": n})
        # a seed per phase: the two Azure phases would otherwise start from the same random text
        workload = sg.TraceWorkload(trace, seed * 100 + k)
        if len(workload.pool) < n:
            raise ValueError(
                f"phase {name}: {n} requests needed ({rate:g} req/s x {phase_s:g} s), the trace window has "
                f"{len(workload.pool)}: lower --rates / --rate-scale or --phase-s"
            )
        if spec.max_gap_s is not None:
            workload.pool = clip_gaps(workload.pool, spec.max_gap_s)
        info = workload.describe(n)
        start = k * phase_s
        first = len(requests)
        for r in workload.requests(n, rate):
            requests.append(dataclasses.replace(r, index=len(requests), arrival_s=start + (r.arrival_s or 0.0)))
        phases.append(Phase(name, start, start + phase_s, rate, range(first, len(requests)), info))
    return Workload(requests, phases)


# --------------------------------------------------------------------------------------------
# One run: a variant, admission on or off, the whole workload on a fresh fleet
# --------------------------------------------------------------------------------------------
@dataclass
class Run:
    variant: str
    admission: bool
    results: list[RequestResult]  # in simulated seconds, by request index
    roles: list[tuple[float, dict[str, str]]]  # (simulated s, instance -> serving role), polled
    plans: list[dict[str, Any]]  # the role balancer's plans, polled
    metrics: dict[str, Any]  # from /metrics at the end
    lag: dict[str, Any]
    cpu: dict[str, Any]
    wall_s: float
    scores: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.variant}/{'on' if self.admission else 'off'}"


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return await resp.json()


async def poll_roles(
    url: str, t0: float, time_scale: float, period_s: float, with_plan: bool, roles: list, plans: list
) -> None:
    """Every ``period_s`` (wall): each instance's serving role, and the balancer's plan."""
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                t = (time.monotonic() - t0) * time_scale
                data = await _get_json(session, url + "/admin/instances")
                roles.append((round(t, 2), {i["id"]: i["serving"] for i in data["data"]}))
                if with_plan:
                    for plan in (await _get_json(session, url + "/admin/plan"))["data"]:
                        if not plans or {**plans[-1], "t": None} != {**plan, "t": None}:
                            plans.append({"t": round(t, 2), **plan})
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError):
                pass
            await asyncio.sleep(period_s)


def gateway_counters(text: str) -> dict[str, Any]:
    """Role changes, PD decisions and admission decisions from the gateway's /metrics."""
    wanted = {
        "pdgate_role_changes": ("instance", "role", "reason"),
        "pdgate_pd_decisions": ("path", "reason"),
        "pdgate_admission_decisions": ("outcome", "reason"),
    }
    out: dict[str, dict[str, float]] = {name: {} for name in wanted}
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value:
                key = "|".join(sample.labels.get(label, "") for label in wanted[family.name])
                out[family.name][key] = out[family.name].get(key, 0.0) + sample.value
    return out


class RunCpu:
    """CPU over a run: the engines, the gateway's process tree (its refit workers too), this
    client process, and what the rest of the host took."""

    def __init__(self, fleet: sg.Fleet) -> None:
        assert fleet.gateway is not None
        self.fleet = fleet
        self.tree = TreeCpu(fleet.gateway.pid)

    def __enter__(self) -> RunCpu:
        self.fleet.mark_cpu()
        self.tree.mark()
        self.host0, self.client0, self.t0 = host_cpu_s()[0], time.process_time(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self.t0
        engines = self.fleet.cpu_used()["engines"] or 0.0
        gateway = sum(self.tree.used().values())
        client = time.process_time() - self.client0
        host = host_cpu_s()[0] - self.host0
        ours = engines + gateway + client
        self.info = {
            "engines": round(engines, 2),
            "gateway": round(gateway, 2),
            "client": round(client, 2),
            "load_wall_s": round(wall, 2),
            "cores_busy": round(ours / wall, 2),
            "other_cores_busy": round(max(0.0, host - ours) / wall, 2),
        }


async def run_variant(
    variant: Variant, admission: bool, workload: Workload, slo: SloSpec, args: argparse.Namespace, workdir: Path
) -> Run:
    """One run on a fresh fleet; a fleet that fails to start (a port taken meanwhile) is started
    again once on other ports."""
    if args.scale:
        return await run_virtual(variant, admission, workload, slo, args)
    for attempt in range(2):
        config = variant_config(
            variant, admission, sg.free_ports(9), slo.default, args.time_scale, args.interval_s, args.min_dwell_s
        )
        fleet = sg.Fleet(config, workdir / f"try{attempt}")
        try:
            await fleet.__aenter__()
            await fleet.warm_up()
        except RuntimeError as exc:
            fleet.stop()
            if attempt:
                raise
            print(f"  ({variant.name}: {str(exc).splitlines()[0]}; trying again)", flush=True)
            continue
        try:
            return await _measure(fleet, variant, admission, workload, slo, args)
        finally:
            fleet.stop()
    raise AssertionError("unreachable")


async def run_virtual(
    variant: Variant, admission: bool, workload: Workload, slo: SloSpec, args: argparse.Namespace
) -> Run:
    """One run in virtual time (``pdgate simulate``, in a worker thread) on the variant's fleet
    resized to ``args.scale`` instances; roles from the simulation's fleet samples."""
    config = variant_config(
        variant, admission, list(range(8101, 8110)), slo.default, 1.0, args.interval_s, args.min_dwell_s
    )
    parsed = simulation_config(resized(GatewayConfig.model_validate(config), args.scale))
    load = LoadConfig(
        arrivals="trace", timeout_s=600.0, duration_s=workload.span_s + 1.0, drain_s=args.drain_s, seed=args.seed
    )
    result = await asyncio.to_thread(
        run_simulation, parsed, workload.requests, load, seed=args.seed, sample_interval_s=args.poll_s
    )
    by_time: dict[float, dict[str, str]] = {}
    for sample in result.samples:
        by_time.setdefault(sample.t, {})[sample.instance] = sample.role
    by_index = {r.index: r for r in result.results}
    ordered = [
        by_index.get(r.index)
        or RequestResult(
            r.index,
            variant.name,
            r.slo_class,
            r.arrival_s or 0.0,
            r.arrival_s or 0.0,
            workload.span_s,
            error="not sent",
        )
        for r in workload.requests
    ]
    lag = {"lag_pct_of_span": 0.0, "lag_max_ms": 0.0, "client_late_p99_ms_wall": 0.0, "engines_unreachable": 0}
    cpu = {"cores_busy": None, "other_cores_busy": None, "load_wall_s": round(result.wall_s, 2)}
    run = Run(
        variant.name,
        admission,
        ordered,
        sorted(by_time.items()),
        [],
        gateway_counters(result.gateway_metrics),
        lag,
        cpu,
        result.wall_s,
    )
    run.scores = score(run, workload, slo, args.window_s)
    return run


async def _measure(
    fleet: sg.Fleet, variant: Variant, admission: bool, workload: Workload, slo: SloSpec, args: argparse.Namespace
) -> Run:
    ts = args.time_scale
    span = workload.span_s
    load = LoadConfig(
        arrivals="trace",
        speedup=ts,
        timeout_s=600.0,
        duration_s=span / ts + 1.0,
        drain_s=args.drain_s / ts,  # unfinished by then: a miss
    )
    roles: list[tuple[float, dict[str, str]]] = []
    plans: list[dict[str, Any]] = []
    started = time.monotonic()
    with RunCpu(fleet) as cpu:
        poller = asyncio.create_task(
            poll_roles(fleet.url, time.monotonic(), ts, args.poll_s / ts, variant.balancer, roles, plans)
        )
        try:
            results, _ = await run_load(Target(variant.name, fleet.url, MODEL), workload.requests, load)
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
    async with aiohttp.ClientSession() as session:
        async with session.get(fleet.url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            metrics = gateway_counters(await resp.text())
        try:  # the latency fits in force at the end (what placement and admission believed)
            metrics["cost_model"] = await _get_json(session, fleet.url + "/cost-model")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            metrics["cost_model"] = {"error": str(exc)}
    states = await fleet.sim_states()
    lag = sg.lag_summary(states, max(span, cpu.info["load_wall_s"] * ts))
    lateness = [1e3 * (r.sent_s - r.scheduled_s) for r in results]
    lag["client_late_p99_ms_wall"] = round(float(np.percentile(lateness, 99)), 2) if lateness else None
    by_index = {r.index: sg.to_sim(r, ts) for r in results}
    missing = [
        RequestResult(
            r.index, variant.name, r.slo_class, r.arrival_s or 0.0, r.arrival_s or 0.0, span, error="not sent"
        )
        for r in workload.requests
        if r.index not in by_index
    ]
    ordered = sorted([*by_index.values(), *missing], key=lambda r: r.index)
    run = Run(variant.name, admission, ordered, roles, plans, metrics, lag, cpu.info, time.monotonic() - started)
    run.scores = score(run, workload, slo, args.window_s)
    return run


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def group_scores(
    results: Sequence[RequestResult], met: Sequence[bool], tokens: int, duration_s: float
) -> dict[str, Any]:
    """One phase's (or the run's) figures; ``tokens``: prompt + output tokens of the met requests."""
    stats = GroupStats.of(results, met, duration_s)
    ms = lambda v: None if v is None else round(1e3 * v, 2)
    rejected = sum(1 for r in results if r.status == 429)
    return {
        "duration_s": duration_s,
        "requests": stats.total,
        "met": stats.met,
        "rejected_429": rejected,
        "failed_other": stats.failed - rejected,
        "attainment_pct": round(100 * (stats.attainment or 0.0), 2),
        "goodput_rps": round(stats.goodput_rps, 4),
        "token_goodput_tps": round(tokens / duration_s, 1),
        "ttft_ms": {"p50": ms(stats.ttft.p50), "p90": ms(stats.ttft.p90)},
        "tpot_ms": {"p50": ms(stats.tpot.p50), "p90": ms(stats.tpot.p90)},
    }


def role_changes(run: Run) -> list[dict[str, Any]]:
    """Each change of an instance's serving role seen between two polls (at the later poll)."""
    out = []
    for (_, before), (t, after) in zip(run.roles, run.roles[1:]):
        for instance, role in sorted(after.items()):
            if before.get(instance, role) != role:
                split = sum(1 for r in after.values() if r == "prefill")
                out.append(
                    {
                        "t": t,
                        "instance": instance,
                        "from": before[instance],
                        "to": role,
                        "split": f"{split}P{len(after) - split}D",
                    }
                )
    return out


def score(run: Run, workload: Workload, slo: SloSpec, window_s: float) -> dict[str, Any]:
    met = [slo.meets(r) for r in run.results]
    changes = role_changes(run)
    phases: dict[str, Any] = {}
    for phase in workload.phases:
        idx = phase.indices
        phases[phase.name] = group_scores(
            [run.results[i] for i in idx],
            [met[i] for i in idx],
            sum(workload.tokens(i) for i in idx if met[i]),
            phase.end_s - phase.start_s,
        )
        phases[phase.name]["role_changes"] = sum(1 for c in changes if phase.start_s <= c["t"] < phase.end_s)
    overall = group_scores(run.results, met, sum(workload.tokens(i) for i, ok in enumerate(met) if ok), workload.span_s)
    overall["role_changes"] = len(changes)
    overall["role_changes_per_min"] = round(len(changes) / (workload.span_s / 60), 2)
    balancer_changes = sum(v for k, v in run.metrics.get("pdgate_role_changes", {}).items() if k.endswith("|balancer"))
    windows = []
    for k in range(math.ceil(workload.span_s / window_s)):
        lo, hi = k * window_s, (k + 1) * window_s
        inside = [i for i, r in enumerate(workload.requests) if lo <= (r.arrival_s or 0.0) < hi]
        windows.append(
            {
                "t": lo,
                "requests": len(inside),
                "attainment_pct": round(100 * sum(met[i] for i in inside) / len(inside), 1) if inside else None,
            }
        )
    paths: dict[str, float] = {}
    for key, value in run.metrics.get("pdgate_pd_decisions", {}).items():
        path = key.split("|", 1)[0]
        paths[path] = paths.get(path, 0.0) + value
    return {
        "phases": phases,
        "overall": overall,
        "role_changes": changes,
        "role_changes_metric_balancer": balancer_changes,
        "pd_paths": paths,
        "timeline": windows,
    }


ORACLE = "oracle"  # the best static split of each phase, switching free: what any adaptive scheme could reach


def _figure(run: Run, part: str, metric: str) -> float:
    return float((run.scores["overall"] if part == "overall" else run.scores["phases"][part])[metric])


def ratios(runs: Mapping[str, Run], phases: Sequence[Phase], admission: bool) -> dict[str, Any]:
    """For each non-static variant, and the oracle (the best static split of each phase): goodput
    (requests, tokens) / the best static split's, over the run and per phase (against that
    phase's best static split)."""
    mode = "on" if admission else "off"
    static = {v: runs[f"{v}/{mode}"] for v in STATIC if f"{v}/{mode}" in runs}
    if not static:
        return {}
    parts = [*(p.name for p in phases), "overall"]
    metrics = ("goodput_rps", "token_goodput_tps")
    best = {
        (part, metric): max(((_figure(r, part, metric), v) for v, r in static.items()), key=lambda x: x[0])
        for part in parts
        for metric in metrics
    }
    values: dict[str, dict[tuple[str, str], float]] = {
        name: {(part, metric): _figure(runs[f"{name}/{mode}"], part, metric) for part in parts for metric in metrics}
        for name in VARIANTS
        if name not in STATIC and f"{name}/{mode}" in runs
    }
    span = sum(p.end_s - p.start_s for p in phases)
    values[ORACLE] = {(p.name, m): best[(p.name, m)][0] for p in phases for m in metrics}
    for m in metrics:
        values[ORACLE][("overall", m)] = sum(best[(p.name, m)][0] * (p.end_s - p.start_s) for p in phases) / span
    out: dict[str, Any] = {}
    for name, figures in values.items():
        for (part, metric), value in figures.items():
            ref, which = best[(part, metric)]
            out.setdefault(name, {}).setdefault(part, {})[metric] = {
                "best_static": which,
                "best_static_value": ref,
                "value": round(value, 4),
                "ratio": round(value / ref, 3) if ref > 0 else None,
            }
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 99.5 else f"{value:.1f}"


def distorted(run: Run) -> bool:
    return (
        (run.lag["lag_pct_of_span"] or 0) > 1
        or (run.lag["client_late_p99_ms_wall"] or 0) > 10
        or (run.cpu.get("other_cores_busy") or 0) > sg.OTHER_LOAD_WARN
    )


def tables(runs: Mapping[str, Run], workload: Workload, slo: SloSpec, phase_s: float) -> str:
    names = [p.name for p in workload.phases]
    lines = [
        f"### Adaptive PD: {len(names)} phases x {phase_s:g} s, SLO TTFT <= {1e3 * (slo.default.ttft_s or 0):.0f} ms, "
        f"TPOT <= {1e3 * (slo.default.tpot_s or 0):.0f} ms (simulated units)",
        "",
        "Goodput: SLO-met requests/s; tok: SLO-met prompt+output tokens/s (thousands); att: attainment %.",
        "",
        "| variant | admission | "
        + " | ".join(f"{p} ({PHASES[p].trace}) req/s · ktok/s · att" for p in names)
        + " | overall req/s · ktok/s · att | 429 | role changes/min |",
        "|---|---|" + "---:|" * (len(names) + 3),
    ]

    def cell(s: Mapping[str, Any]) -> str:
        return f"{s['goodput_rps']:.2f} · {s['token_goodput_tps'] / 1e3:.1f} · {s['attainment_pct']:.1f}"

    for run in runs.values():
        sc = run.scores
        flag = "*" if distorted(run) else ""
        changes = f"{sc['overall']['role_changes_per_min']:.2f}" if VARIANTS[run.variant].balancer else "-"
        lines.append(
            f"| {run.variant}{flag} | {'on' if run.admission else 'off'} | "
            + " | ".join(cell(sc["phases"][p]) for p in names)
            + f" | {cell(sc['overall'])} | {sc['overall']['rejected_429']} | {changes} |"
        )
    lines += [
        "",
        "| variant | admission | part | requests | met | 429 | failed | TTFT p50 / p90 ms | TPOT p50 / p90 ms "
        "| colocated share | role changes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs.values():
        sc = run.scores
        paths = sc["pd_paths"]
        share = f"{100 * paths.get('colocated', 0) / sum(paths.values()):.0f} %" if sum(paths.values()) else "-"
        for part in (*names, "overall"):
            s = sc["overall"] if part == "overall" else sc["phases"][part]
            lines.append(
                f"| {run.variant} | {'on' if run.admission else 'off'} | {part} | {s['requests']} | {s['met']} | "
                f"{s['rejected_429']} | {s['failed_other']} | {_ms(s['ttft_ms']['p50'])} / {_ms(s['ttft_ms']['p90'])} | "
                f"{_ms(s['tpot_ms']['p50'])} / {_ms(s['tpot_ms']['p90'])} | {share if part == 'overall' else ''} | "
                f"{s['role_changes'] if VARIANTS[run.variant].flex else '-'} |"
            )
    for admission in (True, False):
        rs = ratios(runs, workload.phases, admission)
        if not rs:
            continue
        lines += [
            "",
            f"Admission {'on' if admission else 'off'}: goodput / the best static split's "
            "(requests · tokens; in brackets the best static split of that part)",
            "",
            "| variant | " + " | ".join([*names, "overall"]) + " |",
            "|---|" + "---:|" * (len(names) + 1),
        ]
        for name, entry in rs.items():
            cells = []
            for part in (*names, "overall"):
                req, tok = entry[part]["goodput_rps"], entry[part]["token_goodput_tps"]
                fmt = lambda r: "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
                cells.append(f"{fmt(req)} ({req['best_static']}) · {fmt(tok)} ({tok['best_static']})")
            label = "oracle: best static split per phase, switching free" if name == ORACLE else name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if "adaptive" in rs:
            a = rs["adaptive"]
            overall = a["overall"]["goodput_rps"]["ratio"]
            worst = min(((a[p]["goodput_rps"]["ratio"] or 0.0), p) for p in names)
            lines.append("")
            lines.append(
                f"Goal (adaptive >= 1.3x the best static split over the run, within 10 % of each phase's best): "
                f"over the run {overall if overall is not None else '-'}x "
                f"({'met' if overall is not None and overall >= 1.3 else 'NOT met'}); worst phase {worst[1]} "
                f"{worst[0]:.2f}x ({'met' if worst[0] >= 0.9 else 'NOT met'})."
            )
    lines += [
        "",
        "Runs (* possibly distorted): "
        + "; ".join(
            f"{r.key} lag {r.lag['lag_pct_of_span']} % late p99 {r.lag['client_late_p99_ms_wall']} ms cores "
            f"{r.cpu['cores_busy']} (+{r.cpu['other_cores_busy']} others) {r.wall_s:.0f} s"
            for r in runs.values()
        ),
    ]
    return "\n".join(lines)


def plot(runs: Mapping[str, Run], workload: Workload, path: Path, window_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r.admission for r in runs.values()}, reverse=True)
    fig, axes = plt.subplots(len(modes), 1, figsize=(13, 4.2 * len(modes)), sharex=True, squeeze=False)
    colours = dict(
        zip(VARIANTS, ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#ff7f0e", "#d62728", "#e377c2"), strict=True)
    )
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        for k, phase in enumerate(workload.phases):
            ax.axvspan(phase.start_s, phase.end_s, color="0.92" if k % 2 == 0 else "0.98", zorder=0)
            ax.text((phase.start_s + phase.end_s) / 2, 103, phase.name, ha="center", va="bottom", fontsize=9)
        for run in runs.values():
            if run.admission != mode:
                continue
            xs = [w["t"] + window_s / 2 for w in run.scores["timeline"]]
            ys = [np.nan if w["attainment_pct"] is None else w["attainment_pct"] for w in run.scores["timeline"]]
            colour = colours[run.variant]
            ax.plot(xs, ys, label=run.variant, color=colour, linewidth=2.2 if run.variant == "adaptive" else 1.2)
            if VARIANTS[run.variant].balancer:
                for c in run.scores["role_changes"]:
                    ax.axvline(c["t"], color=colour, linestyle=":", linewidth=1)
                    ax.text(c["t"], 2, f" {c['split']}", rotation=90, fontsize=7, color=colour, va="bottom")
        ax.set_ylim(0, 112)
        ax.set_ylabel(f"attainment % ({window_s:g} s windows)")
        ax.set_title(f"admission {'on' if mode else 'off'}; dotted: the role balancer's changes (the split after)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    axes[-1, 0].set_xlabel("simulated seconds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_json(run: Run) -> dict[str, Any]:
    return {
        "variant": run.variant,
        "admission": run.admission,
        **run.scores,
        "roles_polled": [{"t": t, "serving": roles} for t, roles in run.roles],
        "plans": run.plans,
        "metrics": run.metrics,
        "lag": run.lag,
        "cpu": run.cpu,
        "wall_s": round(run.wall_s, 1),
        "distorted": distorted(run),
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _names(text: str, known: Sequence[str], what: str, ap: argparse.ArgumentParser) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    for x in out:
        if x not in known:
            ap.error(f"unknown {what} {x!r}; known: {', '.join(known)}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--phase-s", type=float, help="simulated seconds per phase (default 120; --quick 8)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"in this order, of {', '.join(PHASES)}")
    ap.add_argument(
        "--rates",
        help="req/s per phase, in the order of --phases (default: "
        + ", ".join(f"{p.name} {p.rate:g}" for p in PHASES.values())
        + ")",
    )
    ap.add_argument("--rate-scale", type=float, help="every rate times this (default 1; --quick 0.2)")
    ap.add_argument(
        "--scale",
        type=int,
        metavar="N",
        help="instead of 4 engine processes in real time: N instances in virtual time (pdgate simulate), each "
        "variant's split scaled (1P3D: N/4 prefill, 3N/4 decode), every rate times N/4",
    )
    ap.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"of {', '.join(VARIANTS)} (default: all but balancer-only)",
    )
    ap.add_argument("--admission", default="on,off", help="on, off or on,off")
    ap.add_argument("--ttft-ms", type=float, default=400.0)
    ap.add_argument("--tpot-ms", type=float, default=15.0)
    ap.add_argument("--interval-s", type=float, help="role balancer interval, simulated (default min(2, phase/15))")
    ap.add_argument("--min-dwell-s", type=float, help="role balancer min dwell, simulated (default phase/12)")
    ap.add_argument("--window-s", type=float, default=5.0, help="attainment-over-time windows (simulated s)")
    ap.add_argument("--poll-s", type=float, default=1.0, help="how often the serving roles are polled (simulated s)")
    ap.add_argument("--drain-s", type=float, default=60.0, help="after the last arrival; unfinished then: a miss")
    ap.add_argument("--time-scale", type=float, default=1.0, help="simulated seconds per wall second")
    ap.add_argument("--seed", type=int, default=0, help="prompt texts (lengths and times come from the traces)")
    ap.add_argument("--out", help="write every figure as JSON to this file")
    ap.add_argument("--plot", help="attainment over time (PNG)")
    ap.add_argument(
        "--wait-quiet", type=float, default=0.0, help="before each run, wait up to this many seconds for a quiet host"
    )
    ap.add_argument("--keep-logs", action="store_true", help="keep the engines' and gateways' logs (printed path)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 8-s phases at 0.2x the rates, variants 2P2D and adaptive, admission on, "
        "unless given (~1.5 min)",
    )
    args = ap.parse_args(argv)
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    if args.quick:
        args.phase_s = args.phase_s or 8.0
        args.rate_scale = args.rate_scale or 0.2
        if "--variants" not in given:
            args.variants = "2P2D,adaptive"
        if "--admission" not in given:
            args.admission = "on"
    args.phase_s = args.phase_s or 120.0
    args.rate_scale = args.rate_scale or 1.0
    args.phase_list = _names(args.phases, list(PHASES), "phase", ap)
    args.variant_list = _names(args.variants, list(VARIANTS), "variant", ap)
    args.admission_list = [a == "on" for a in _names(args.admission, ["on", "off"], "admission setting", ap)]
    if args.rates:
        rates = [float(x) for x in args.rates.split(",") if x.strip()]
        if len(rates) != len(args.phase_list):
            ap.error(f"--rates: {len(args.phase_list)} values expected, one per phase")
    else:
        rates = [PHASES[p].rate for p in args.phase_list]
    if args.scale is not None and args.scale < 4:
        ap.error("--scale: at least 4 instances (the variants' splits are of 4)")
    fleet_factor = args.scale / 4 if args.scale else 1.0  # --scale: the rates grow with the fleet
    args.rate_list = [r * args.rate_scale * fleet_factor for r in rates]
    args.interval_s = args.interval_s or min(2.0, args.phase_s / 15)
    args.min_dwell_s = args.min_dwell_s if args.min_dwell_s is not None else args.phase_s / 12
    return args


async def main_async(
    args: argparse.Namespace, workload: Workload, slo: SloSpec, log: Callable[[str], None]
) -> dict[str, Run]:
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="pdgate-adaptive-pd-"))
    runs: dict[str, Run] = {}
    try:
        for admission in args.admission_list:
            for name in args.variant_list:
                key = f"{name}/{'on' if admission else 'off'}"
                if args.wait_quiet:
                    await asyncio.to_thread(wait_quiet, args.wait_quiet, 0.2, 2.0, False)
                run = await run_variant(VARIANTS[name], admission, workload, slo, args, workdir / key.replace("/", "-"))
                runs[key] = run
                o = run.scores["overall"]
                per_phase = "  ".join(
                    f"{p}: {s['attainment_pct']:.1f} % {s['goodput_rps']:.2f} req/s"
                    for p, s in run.scores["phases"].items()
                )
                changes = f"  role changes {o['role_changes']}" if VARIANTS[name].flex else ""
                log(
                    f"  {key:<16} attained {o['attainment_pct']:5.1f} %  goodput {o['goodput_rps']:.2f} req/s "
                    f"{o['token_goodput_tps'] / 1e3:.1f} ktok/s  429 {o['rejected_429']}  failed {o['failed_other']}  "
                    f"[{per_phase}]{changes}  lag {run.lag['lag_pct_of_span']} %  late p99 "
                    f"{run.lag['client_late_p99_ms_wall']} ms  cores {run.cpu['cores_busy']} "
                    f"(+{run.cpu['other_cores_busy']} others)  {run.wall_s:.0f} s"
                    + ("  [distorted?]" if distorted(run) else "")
                )
    finally:
        if args.keep_logs:
            print(f"logs: {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = sorted(
        {
            sg.TRACES[PHASES[p].trace].path
            for p in args.phase_list
            if not (sg.DATA / sg.TRACES[PHASES[p].trace].path).exists()
        }
    )
    if missing:
        print(f"missing trace files under {sg.DATA} (set PDGATE_DATA): {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    host, load = machine(), other_load()
    print(describe_host(host, load), flush=True)
    slo = SloSpec(default=Slo(ttft_s=args.ttft_ms / 1e3, tpot_s=args.tpot_ms / 1e3))
    try:
        workload = build_workload(args.phase_list, args.rate_list, args.phase_s, args.seed)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(
        f"Adaptive PD: {len(workload.requests)} requests in {len(workload.phases)} phases of {args.phase_s:g} s; "
        f"variants {', '.join(args.variant_list)}; admission {args.admission}; "
        + (
            f"{args.scale} instances in virtual time (pdgate simulate)"
            if args.scale
            else f"4 sim engines ({sg.PROFILE}) behind `pdgate serve`, fresh per run"
        )
        + f"; role balancer interval {args.interval_s:g} s, min dwell "
        f"{args.min_dwell_s:g} s; time scale {args.time_scale:g}",
        flush=True,
    )
    for phase in workload.phases:
        i = phase.info
        print(
            f"  {phase.name} [{phase.start_s:g}, {phase.end_s:g}) s: {PHASES[phase.name].note}; {len(phase.indices)} requests at "
            f"{phase.rate:.3g} req/s, inter-arrival CV {i['interarrival_cv']:.2f}; prompt tokens mean {i['input_mean']:.0f} "
            f"p90 {i['input_p90']:.0f}; output tokens mean {i['output_mean']:.0f} p90 {i['output_p90']:.0f}"
            + (f"; prompt blocks repeated {100 * i['block_hit_rate']:.0f} %" if "block_hit_rate" in i else ""),
            flush=True,
        )
    try:
        runs = run_async(main_async(args, workload, slo, lambda s: print(s, flush=True)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sg._stop_all()
        print("interrupted; every engine and gateway stopped", file=sys.stderr)
        return 130
    finally:
        sg._stop_all()
    report = tables(runs, workload, slo, args.phase_s)
    print()
    print(report)
    total = time.monotonic() - started
    print(f"\ntotal {total / 60:.1f} min")
    if args.plot:
        plot(runs, workload, Path(args.plot), args.window_s)
        print(f"wrote {args.plot}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "benchmark": "adaptive_pd",
            "profile": sg.PROFILE,
            "host": {**host, "other_load_before": load},
            "args": {k: v for k, v in vars(args).items()},
            "code": sg.code_version(),
            "wall_s": total,
            "slo": slo.to_dict(),
            "phases": [
                {
                    "name": p.name,
                    "trace": PHASES[p.name].trace,
                    "note": PHASES[p.name].note,
                    "start_s": p.start_s,
                    "end_s": p.end_s,
                    "rate": p.rate,
                    "requests": len(p.indices),
                    "workload": p.info,
                }
                for p in workload.phases
            ],
            "requests": len(workload.requests),
            "runs": {key: run_json(run) for key, run in runs.items()},
            "ratios": {("on" if a else "off"): ratios(runs, workload.phases, a) for a in args.admission_list},
            "markdown": report,
        }
        out.write_text(json.dumps(data, indent=1, default=str))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
