#!/usr/bin/env python3
"""What runtime migration does for tail latency under skewed decode load.

    python benchmarks/migration.py [--duration S] [--seed N] [--mechanism recompute|live|pd|auto]
        [--time-scale X] [--placement random|kv-usage|round-robin|default] [--num-gpu-blocks N]
        [--runs off,on] [--param NAME=VALUE ...] [--wait-quiet S] [--out FILE] [--keep-logs] [--smoke]

The same seeded workload runs twice, each time on a fresh fleet and gateway: **off**
(``migration.enabled: false``, policy ``no-migration``: requests never move, except by
failover) and **on** (policy ``load-balance``, its parameters printed, moves by
``--mechanism``, default ``recompute``). Printed per run: TTFT, TPOT and inter-token gaps as
the client measured them, SLO attainment, requests completed and failed, where the long
requests were placed, preemptions in the decode engines, migrations per minute and their
downtime: the gateway's ``pdgate_migration_downtime_seconds`` histogram (count, mean, bucket
percentiles) and, from the client, the largest inter-token gap of each migrated stream (the
gateway's log names the requests it moved; the client sends ``X-Request-Id``). Then the on/off
ratios. ``--out`` writes all of it, every move and every request, as JSON. The exit status is 1
when any request failed.

**Fleet**: one prefill and three decode simulated engines (vLLM flavour, KV hand-off from
prefill to decode), profile ``h100-llama-2-7b``, behind ``pdgate serve``, all subprocesses,
stopped at the end (process groups; also on Ctrl-C, SIGTERM or an error). Llama-2-7B has no
GQA, so its KV per token is 4x Llama-3-8B's and the decode step grows with the batch's context
(7.2 ms for one 512-token sequence, 16.5 ms for 24 of 2000). The decode engines' KV cache is
capped (``--num-gpu-blocks``, default 512 blocks of 16 tokens = 8k tokens, about 80 % of the
workload's mean KV demand per engine) so that load matters, as on a busy GPU: an engine whose
KV runs out preempts (vLLM: recompute) and queues new requests, and their streams stall.
Admission control is off (nothing is rejected).

**Workload** (simulated seconds; ``--seed`` fixes it): a Poisson background of short requests
(3/s, prompt 128-512 tokens, output 32-128) plus, every 8 s from 2 s, a burst of 6 long
requests (prompt 256-1024, output 1024-2048) sent within 0.25 s, over ``--duration`` (40 s).
Every request is a streamed ``/v1/completions`` with ``ignore_eos``, ``temperature: 0`` and
``stream_options.include_usage``, so both runs send the very same requests at the same times.

**Placement** (``--placement``), deliberately naive, as a picker that cannot know output
lengths is: ``random`` (default, seeded): the decode engine is drawn at random, so some engine
ends up with more long requests than the others; the draw is the same in both runs (the report
checks that the initial placements are identical), so migration is the only difference.
``kv-usage``: the engines' scraped KV usage only (stale between scrapes, and it differs
between the runs once requests move); ``round-robin``; ``default``: the gateway's own
load-aware decode profile (it sees ``max_tokens``, here the exact output length).

**Time**: the engines run ``--time-scale`` times faster than real time (default 1: ~55 s per
run, ~2 min in all); the load generator sends at that many times the rate, the gateway's scrape
period, migration interval, timeouts and the policy's time parameters are divided by it, and
every latency is reported in simulated (GPU) seconds. ``--smoke`` is a tiny configuration
(~6 s per run at time scale 2) for the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

REPO_ROOT = Path(__file__).resolve().parents[1]
for _extra in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(_extra) not in sys.path:
        sys.path.insert(0, str(_extra))

import slo_goodput as sg  # its fleet and process handling

from pdgate.common.perf_model import StepBatch, load_profile
from pdgate.common.runtime import run_async
from pdgate.common.tokenizer import load_tokenizer
from pdgate.gateway.config import GatewayConfig
from pdgate.loadgen.client import Target
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.runner import LoadConfig, run_load
from pdgate.loadgen.slo import Slo, SloSpec
from pdgate.loadgen.stats import RunStats, summarize
from pdgate.loadgen.types import BenchRequest, RequestResult
from pdgate.scheduler.plugins.migration import LoadBalanceParams

MODEL = "llama-2-7b"
PROFILE = "h100-llama-2-7b"
MAX_MODEL_LEN = 4096
DECODERS = 3
SHORT, LONG = "short", "long"
MECHANISMS = ("recompute", "live", "pd", "auto")
PLACEMENTS = ("random", "kv-usage", "round-robin", "default")

# The load-balance policy's parameters for the "on" run (time values in simulated seconds; the
# gateway gets them divided by the time scale). Unlisted ones keep their defaults (printed).
POLICY_PARAMS: dict[str, Any] = {}
POLICY_TIME_PARAMS = ("min_decoding_s", "defrag_cooldown_s", "retry_after_s")
SWITCH_SLACK_S = 0.05  # wall seconds between the gateway's log line of a move and the client's next token


@dataclass(frozen=True)
class Workload:
    """The workload's shape (sim seconds, tokens)."""

    duration_s: float = 40.0  # arrivals span
    short_rate: float = 3.0  # background requests per second (Poisson)
    short_prompt: tuple[int, int] = (128, 512)
    short_output: tuple[int, int] = (32, 128)
    burst_every_s: float = 8.0
    burst_size: int = 6
    burst_spread_s: float = 0.25
    first_burst_s: float = 2.0
    long_prompt: tuple[int, int] = (256, 1024)
    long_output: tuple[int, int] = (1024, 2048)
    ttft_slo_s: float = 1.0
    tpot_slo_s: float = 0.020


SMOKE = Workload(
    duration_s=4.0,
    short_rate=2.0,
    short_output=(8, 24),
    burst_every_s=2.0,
    burst_size=3,
    first_burst_s=0.5,
    long_prompt=(64, 256),
    long_output=(96, 160),
)


def build_requests(w: Workload, seed: int) -> list[BenchRequest]:
    """The run's requests in arrival order (``slo_class`` short or long), identical for a seed."""
    rng = random.Random(seed)
    builder = PromptBuilder(load_tokenizer("builtin"), seed=seed)
    specs: list[tuple[float, str, int, int]] = []
    t = rng.expovariate(w.short_rate) if w.short_rate > 0 else math.inf
    while t < w.duration_s:
        specs.append((t, SHORT, rng.randint(*w.short_prompt), rng.randint(*w.short_output)))
        t += rng.expovariate(w.short_rate)
    b = w.first_burst_s
    while b < w.duration_s:
        for _ in range(w.burst_size):
            specs.append(
                (b + rng.uniform(0.0, w.burst_spread_s), LONG, rng.randint(*w.long_prompt), rng.randint(*w.long_output))
            )
        b += w.burst_every_s
    specs.sort(key=lambda s: s[0])
    out = []
    for i, (at, cls, prompt, output) in enumerate(specs):
        out.append(
            BenchRequest(
                index=i,
                api="completions",
                max_tokens=output,
                prompt=builder.text(prompt),
                prompt_tokens=prompt,
                arrival_s=round(at, 6),
                slo_class=cls,
                extra={"ignore_eos": True, "temperature": 0},
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Gateway config
# --------------------------------------------------------------------------------------------
def scheduling(placement: str, seed: int) -> dict[str, Any] | None:
    """The scheduling section: one prefill engine (any picker does), the decode profile as ``placement``."""
    if placement == "default":
        return None
    decode_plugins = {
        "kv-usage": (
            [{"name": "kv", "type": "kv-usage"}, {"name": "pick", "type": "max-score", "parameters": {"seed": seed}}],
            [{"pluginRef": "kv", "weight": 1.0}, {"pluginRef": "pick"}],
        ),
        "random": ([{"name": "pick", "type": "random", "parameters": {"seed": seed}}], [{"pluginRef": "pick"}]),
        "round-robin": ([{"name": "pick", "type": "round-robin"}], [{"pluginRef": "pick"}]),
    }[placement]
    plugins, decode = decode_plugins
    return {
        "plugins": [
            {"name": "healthy", "type": "health-filter"},
            {"name": "prefill-role", "type": "role-filter", "parameters": {"role": "prefill"}},
            {"name": "decode-role", "type": "role-filter", "parameters": {"role": "decode"}},
            {"name": "colocated-role", "type": "role-filter", "parameters": {"role": "both"}},
            {"name": "first", "type": "round-robin"},
            {"name": "first-colocated", "type": "round-robin"},
            *plugins,
        ],
        "profiles": {
            "prefill": [{"pluginRef": "healthy"}, {"pluginRef": "prefill-role"}, {"pluginRef": "first"}],
            "decode": [{"pluginRef": "healthy"}, {"pluginRef": "decode-role"}, *decode],
            "colocated": [{"pluginRef": "healthy"}, {"pluginRef": "colocated-role"}, {"pluginRef": "first-colocated"}],
        },
    }


def policy_params(args: argparse.Namespace) -> dict[str, Any]:
    """The load-balance parameters of the "on" run, in simulated seconds (all of them, defaults filled in)."""
    params = {**POLICY_PARAMS, **args.params}
    return LoadBalanceParams(**params).model_dump()


def gateway_config(
    ports: Sequence[int], gateway_port: int, args: argparse.Namespace, migration: bool
) -> dict[str, Any]:
    ts = args.time_scale
    roles = ["prefill"] + ["decode"] * DECODERS
    instances = []
    for n, (role, port) in enumerate(zip(roles, ports, strict=True)):
        engine_args: dict[str, Any] = {"max_model_len": MAX_MODEL_LEN, "seed": args.seed}
        if role == "decode":
            engine_args.update(num_gpu_blocks=args.num_gpu_blocks, max_num_seqs=args.max_num_seqs)
        instances.append(
            {
                "id": "prefill-0" if role == "prefill" else f"decode-{n - 1}",
                "url": f"http://127.0.0.1:{port}",
                "kind": "sim",
                "role": role,
                "model": MODEL,
                "launch": {"profile": PROFILE, "time_scale": ts, "args": engine_args},
            }
        )
    params = policy_params(args)
    for name in POLICY_TIME_PARAMS:
        params[name] = params[name] / ts
    config: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": gateway_port,
        "models": [{"name": MODEL, "tokenizer": "builtin", "max_model_len": MAX_MODEL_LEN}],
        "instances": instances,
        "scrape_interval_s": 1.0 / ts,
        "stale_after_s": 5.0 / ts,
        "admission": {"enabled": False},
        "logging": {"format": "json", "access_log": True},
        # stall_timeout_s 60 s (not 30): a stream stalled by a long preemption in the "off" run must
        # not be failed over by the watchdog, which would move it after all
        "migration": {
            "enabled": migration,
            "policy": "load-balance" if migration else "no-migration",
            "parameters": params if migration else {},
            "interval_s": args.interval / ts,
            "mechanism": args.mechanism,
            "max_concurrent": args.max_concurrent,
            "timeout_s": 30.0 / ts,
            "stall_timeout_s": 60.0 / ts,
        },
    }
    sched = scheduling(args.placement, args.seed)
    if sched is not None:
        config["scheduling"] = sched
    GatewayConfig.model_validate(config)  # fail here, with pydantic's message, rather than in the child
    return config


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------
class TaggedTarget(Target):
    """Sends every request with ``X-Request-Id: <tag>-<index>``, so the gateway's log of moves
    (which names request ids) can be matched with what the client saw.

    :func:`loadgen.client.send` calls ``target.path(request)`` and reads ``target.headers`` in
    the same expression, with no await in between, so the index stored by ``path`` is the one
    of the request whose headers are read next."""

    def __init__(self, name: str, url: str, model: str, tag: str) -> None:
        self._base_headers: dict[str, str] = {}
        self._current = 0
        self.tag = tag
        super().__init__(name, url, model)

    @property  # type: ignore[override]
    def headers(self) -> dict[str, str]:
        return {**self._base_headers, "X-Request-Id": f"{self.tag}-{self._current}"}

    @headers.setter
    def headers(self, value: dict[str, str]) -> None:
        self._base_headers = value

    def path(self, request: BenchRequest) -> str:
        self._current = request.index
        return super().path(request)


class Fleet(sg.Fleet):
    async def metrics(self) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp,
        ):
            return await resp.text()


@dataclass
class Move:
    request_id: str
    source: str
    target: str
    reason: str
    mechanism: str
    tokens: int | None
    ok: bool
    error: str | None = None
    at: float | None = None  # when the gateway logged it (epoch seconds, ms resolution)


_MOVED = re.compile(r"^migrated (\S+) from (\S+) to (\S+) \((\w+), (\w+)\) after (\d+) tokens")
_FAILED = re.compile(r"^migration of (\S+) from (\S+) to (\S+) \((\w+), (\w+)\) failed: (.*)$")
_FAILOVER = re.compile(r"^failed (\S+) over from (\S+) to (\S+) after (\d+) tokens")


def parse_gateway_log(path: Path) -> tuple[list[Move], dict[str, str], list[str]]:
    """The moves the gateway logged, each request's first decode instance (access log), and
    warnings/errors (other than the moves)."""
    moves: list[Move] = []
    placed: dict[str, str] = {}
    problems: list[str] = []
    if not path.exists():
        return moves, placed, problems
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the start-up banner
        if not isinstance(entry, dict):
            continue
        message = str(entry.get("message", ""))
        try:
            at = datetime.fromisoformat(str(entry["ts"])).timestamp()
        except (KeyError, ValueError):
            at = None
        if (m := _MOVED.match(message)) is not None:
            moves.append(Move(m[1], m[2], m[3], m[4], m[5], int(m[6]), True, at=at))
        elif (m := _FAILED.match(message)) is not None:
            moves.append(Move(m[1], m[2], m[3], m[4], m[5], None, False, m[6], at=at))
        elif (m := _FAILOVER.match(message)) is not None:
            moves.append(Move(m[1], m[2], m[3], "failover", "failover", int(m[4]), True, at=at))
        elif entry.get("logger") == "pdgate.access":
            if entry.get("request_id") and entry.get("decode"):
                placed[str(entry["request_id"])] = str(entry["decode"])
        elif entry.get("level") in ("warning", "error", "critical"):
            problems.append(message[:300])
    return moves, placed, problems


def gateway_migration_metrics(text: str) -> dict[str, Any]:
    """``pdgate_migrations_total`` by (reason, mechanism, outcome) and the downtime histogram."""
    counts: dict[str, float] = {}
    buckets: dict[float, float] = {}
    gap_sum = gap_count = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pdgate_migrations_total":
                key = f"{s.labels.get('reason')}/{s.labels.get('mechanism')}/{s.labels.get('outcome')}"
                counts[key] = counts.get(key, 0.0) + s.value
            elif s.name == "pdgate_migration_downtime_seconds_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value  # summed over reason and mechanism
            elif s.name == "pdgate_migration_downtime_seconds_sum":
                gap_sum += s.value
            elif s.name == "pdgate_migration_downtime_seconds_count":
                gap_count += s.value
    return {
        "counts": counts,
        "downtime_buckets": dict(sorted(buckets.items())),
        "downtime_sum_s": gap_sum,
        "downtime_count": int(gap_count),
    }


def bucket_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear within the bucket that holds the q-th sample
    (cumulative ``le -> count``); the largest finite bound when it falls in ``+Inf``."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    total = items[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in items:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class RunResult:
    name: str
    migration: bool
    results: list[RequestResult]  # times in simulated seconds
    stats: RunStats
    moves: list[Move]
    placed: dict[str, str]
    gateway: dict[str, Any]
    engines: dict[str, dict[str, Any]]
    lag: dict[str, Any]
    cpu: dict[str, Any]
    wall_s: float
    span_s: float  # simulated seconds from the first send to the last answer
    problems: list[str] = field(default_factory=list)
    tag: str = ""
    epoch0: float = 0.0  # time.time() when the load started (the client's clock 0)

    # ---- derived figures
    def migrated_ids(self) -> set[str]:
        return {m.request_id for m in self.moves if m.ok and m.reason != "failover"}

    def index_of(self, request_id: str) -> int | None:
        prefix = f"{self.tag}-"
        if request_id.startswith(prefix) and request_id[len(prefix) :].isdigit():
            return int(request_id[len(prefix) :])
        return None

    def switch_gaps(self) -> list[float]:
        """The client-seen gap of each move (sim s): the inter-token gap that ended closest after
        the gateway logged the move (it sends the continuation's first token right after that)."""
        by_index = {r.index: r for r in self.results}
        ts = self.cpu.get("time_scale", 1.0)
        out = []
        for m in self.moves:
            r = by_index.get(self.index_of(m.request_id))
            if not m.ok or m.at is None or r is None or len(r.chunk_times) < 2:
                continue
            t = (m.at - self.epoch0) * ts
            near = [(abs(c - t), i) for i, c in enumerate(r.chunk_times) if i > 0 and c >= t - SWITCH_SLACK_S * ts]
            if near:
                dist, i = min(near)
                if dist <= SWITCH_SLACK_S * ts:
                    out.append(r.chunk_times[i] - r.chunk_times[i - 1])
        return out

    def max_gaps(self, migrated: bool | None, cls: str | None = None) -> list[float]:
        """Each stream's largest inter-token gap at the client (sim s): of migrated streams, or of the others."""
        ids = {self.index_of(r) for r in self.migrated_ids()}
        out = []
        for r in self.results:
            if not r.ok or len(r.chunk_times) < 2 or (cls is not None and r.slo_class != cls):
                continue
            if migrated is None or (r.index in ids) == migrated:
                out.append(max(r.inter_chunk_s))
        return out

    def per_request(self) -> list[dict[str, Any]]:
        moved = Counter(self.index_of(m.request_id) for m in self.moves if m.ok)
        out = []
        for r in self.results:
            gaps = r.inter_chunk_s
            worst = int(np.argmax(gaps)) if gaps else None
            out.append(
                {
                    "index": r.index,
                    "class": r.slo_class,
                    "ok": r.ok,
                    "error": r.error,
                    "sent_s": round(r.sent_s, 4),
                    "ttft_s": r.ttft_s,
                    "tpot_s": r.tpot_s,
                    "output_tokens": r.output_tokens,
                    "max_gap_s": gaps[worst] if worst is not None else None,
                    "max_gap_at_s": r.chunk_times[worst] if worst is not None else None,  # when it began (run clock)
                    "decode": self.placed.get(f"{self.tag}-{r.index}"),
                    "moves": moved.get(r.index, 0),
                }
            )
        return out

    def summary(self) -> dict[str, Any]:
        moved = [m for m in self.moves if m.ok and m.reason != "failover"]
        failed_moves = [m for m in self.moves if not m.ok]
        minutes = self.span_s / 60.0
        buckets = self.gateway.get("downtime_buckets", {})
        ts = self.cpu.get("time_scale", 1.0)

        def q(p: float) -> float | None:
            v = bucket_quantile(p, buckets)
            return None if v is None else v * ts

        def dist(values: Sequence[float]) -> dict[str, float | None]:
            if not values:
                return {"count": 0, "p50": None, "p99": None, "max": None}
            return {
                "count": len(values),
                "p50": float(np.percentile(values, 50)),
                "p99": float(np.percentile(values, 99)),
                "max": float(max(values)),
            }

        per_decoder = Counter(
            self.placed.get(f"{self.tag}-{r.index}", "?") for r in self.results if r.slo_class == LONG
        )
        s = self.stats
        return {
            "name": self.name,
            "migration": self.migration,
            "requests": s.total,
            "completed": s.ok,
            "failed": s.failed,
            "attainment": s.attainment,
            "ttft_s": {"p50": s.ttft.p50, "p90": s.ttft.p90, "p99": s.ttft.p99, "max": s.ttft.max},
            "tpot_s": {"p50": s.tpot.p50, "p90": s.tpot.p90, "p99": s.tpot.p99, "max": s.tpot.max},
            "itl_s": {"p50": s.itl.p50, "p99": s.itl.p99, "p999": s.itl.p999, "max": s.itl.max},
            "classes": {
                name: {
                    "requests": g.total,
                    "failed": g.failed,
                    "attainment": g.attainment,
                    "ttft_s": {"p50": g.ttft.p50, "p99": g.ttft.p99},
                    "tpot_s": {"p50": g.tpot.p50, "p99": g.tpot.p99},
                }
                for name, g in s.classes.items()
            },
            "migrations": len(moved),
            "migrations_failed": len(failed_moves),
            "failovers": sum(1 for m in self.moves if m.reason == "failover"),
            "migrations_per_min": len(moved) / minutes if minutes > 0 else None,
            "moves_by": dict(Counter(f"{m.reason}/{m.mechanism}" for m in moved)),
            "failed_moves_by": dict(Counter(f"{m.reason}/{m.mechanism}: {(m.error or '')[:80]}" for m in failed_moves)),
            "metric_counts": self.gateway.get("counts", {}),
            "downtime_metric": {
                "count": self.gateway.get("downtime_count", 0),
                "mean": (
                    self.gateway["downtime_sum_s"] * ts / self.gateway["downtime_count"]
                    if self.gateway.get("downtime_count")
                    else None
                ),
                "p50": q(0.5),
                "p90": q(0.9),
                "p99": q(0.99),
            },
            "switch_gap_s": dist(self.switch_gaps()),
            "max_gap_migrated_s": dist(self.max_gaps(True)),
            "max_gap_other_long_s": dist(self.max_gaps(False, LONG)),
            "long_requests_per_decoder": dict(sorted(per_decoder.items())),
            "preemptions": self.lag.get("preemptions"),
            "lag": self.lag,
            "cpu": self.cpu,
            "span_s": self.span_s,
            "wall_s": self.wall_s,
            "problems": self.problems[:10],
        }


async def run_one(
    name: str, migration: bool, requests: Sequence[BenchRequest], slo: SloSpec, args: argparse.Namespace, workdir: Path
) -> RunResult:
    ports = sg.free_ports(DECODERS + 2)
    config = gateway_config(ports[:-1], ports[-1], args, migration)
    ts = args.time_scale
    tag = f"{name}{args.seed}"
    started = time.monotonic()
    async with Fleet(config, workdir) as fleet:
        await fleet.warm_up(6, model=MODEL)
        fleet.mark_cpu()
        target = TaggedTarget(name, fleet.url, MODEL, tag)
        span_sim = requests[-1].arrival_s or 0.0
        load = LoadConfig(
            arrivals="trace", speedup=ts, timeout_s=600.0, duration_s=span_sim / ts + 1.0, drain_s=args.drain / ts
        )
        cpu_client0, host0 = time.process_time(), sg.host_cpu()
        wall0, epoch0 = time.monotonic(), time.time()
        results, _ = await run_load(target, requests, load)
        load_wall = time.monotonic() - wall0
        cpu_client, host1 = time.process_time() - cpu_client0, sg.host_cpu()
        metrics_text = await fleet.metrics()
        states = await fleet.sim_states()
        cpu = fleet.cpu_used()
    moves, placed, problems = parse_gateway_log(workdir / "gateway.log")
    sim_results = [sg.to_sim(r, ts) for r in results]
    end = max((r.end_s for r in sim_results), default=0.0)
    stats = summarize(sim_results, slo, duration_s=max(span_sim, 1e-6) + 1e-9)
    lag = sg.lag_summary(states, max(span_sim, load_wall * ts))
    ours = sum(v for v in cpu.values() if v is not None) + cpu_client
    cpu_info: dict[str, Any] = {k: None if v is None else round(v, 2) for k, v in cpu.items()}
    cpu_info.update(
        client=round(cpu_client, 2),
        load_wall_s=round(load_wall, 2),
        time_scale=ts,
        cores_busy=round(ours / load_wall, 2) if load_wall > 0 else None,
    )
    if host0 is not None and host1 is not None and host1[1] > host0[1]:
        host_cores = (host1[0] - host0[0]) / (host1[1] - host0[1]) * (os.cpu_count() or 1)
        cpu_info["other_cores_busy"] = round(max(0.0, host_cores - ours / load_wall), 2) if load_wall > 0 else None
    engines = {
        k: {f: v.get(f) for f in ("num_preemptions", "steps", "lag_total_seconds", "lag_max_seconds", "num_blocks")}
        for k, v in states.items()
        if "error" not in v
    }
    run = RunResult(
        name,
        migration,
        sim_results,
        stats,
        moves,
        placed,
        gateway_migration_metrics(metrics_text),
        engines,
        lag,
        cpu_info,
        time.monotonic() - started,
        end,
        problems,
        tag,
        epoch0,
    )
    return run


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f}" if v >= 0.0995 else f"{v * 1e3:.1f}"


def _ratio(on: float | None, off: float | None) -> str:
    return f"{on / off:.2f}x" if on is not None and off else "-"


def table(runs: Sequence[RunResult]) -> str:
    sums = [r.summary() for r in runs]
    header = "| metric | " + " | ".join(s["name"] for s in sums) + (" | on/off |" if len(sums) == 2 else " |")
    lines = [header, "|---|" + "---:|" * (len(sums) + (1 if len(sums) == 2 else 0))]

    def row(label: str, values: list[str], ratio: str | None = None) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + (f" | {ratio or ''} |" if len(sums) == 2 else " |"))

    def metric_row(label: str, get, fmt=_ms, ratio: bool = True) -> None:
        values = [get(s) for s in sums]
        r = _ratio(values[1], values[0]) if ratio and len(values) == 2 else None
        row(label, [fmt(v) for v in values], r)

    row(
        "requests (short + long)",
        [
            f"{s['requests']} ({s['classes'].get(SHORT, {}).get('requests', 0)} + "
            f"{s['classes'].get(LONG, {}).get('requests', 0)})"
            for s in sums
        ],
    )
    row("completed / failed", [f"{s['completed']} / {s['failed']}" for s in sums])
    metric_row("TTFT p50 (ms)", lambda s: s["ttft_s"]["p50"])
    metric_row("**TTFT p99 (ms)**", lambda s: s["ttft_s"]["p99"])
    metric_row("TPOT p50 (ms)", lambda s: s["tpot_s"]["p50"])
    metric_row("**TPOT p99 (ms)**", lambda s: s["tpot_s"]["p99"])
    row(
        "inter-token gap p99 / p99.9 / max (ms)",
        [f"{_ms(s['itl_s']['p99'])} / {_ms(s['itl_s']['p999'])} / {_ms(s['itl_s']['max'])}" for s in sums],
    )
    for cls in (SHORT, LONG):
        for metric in ("ttft_s", "tpot_s"):
            got = [s["classes"].get(cls, {}).get(metric) for s in sums]
            ratio = _ratio(got[1]["p99"], got[0]["p99"]) if len(sums) == 2 and got[0] and got[1] else None
            row(
                f"{cls}: {metric[:4].upper()} p50 / p99 (ms)",
                [f"{_ms(g['p50'])} / {_ms(g['p99'])}" if g else "-" for g in got],
                ratio,
            )
    row(
        "SLO attainment (TTFT and TPOT)",
        [f"{100 * s['attainment']:.1f} %" if s["attainment"] is not None else "-" for s in sums],
    )
    row(
        "long requests placed per decoder",
        [" ".join(f"{k.split('-')[-1]}:{v}" for k, v in s["long_requests_per_decoder"].items()) for s in sums],
    )
    row("preemptions (decode engines)", [str(s["preemptions"]) for s in sums])
    row(
        "migrations (per min)",
        [
            f"{s['migrations']} ({s['migrations_per_min']:.1f})"
            if s["migrations_per_min"] is not None
            else str(s["migrations"])
            for s in sums
        ],
    )
    row("moves by reason/mechanism", [", ".join(f"{k} {v}" for k, v in s["moves_by"].items()) or "-" for s in sums])
    row("failed moves / failovers", [f"{s['migrations_failed']} / {s['failovers']}" for s in sums])
    row(
        "downtime, gateway histogram: n, mean, p50 / p99 from buckets (ms)",
        [
            f"{s['downtime_metric']['count']}, {_ms(s['downtime_metric']['mean'])}, {_ms(s['downtime_metric']['p50'])} / "
            f"{_ms(s['downtime_metric']['p99'])}"
            if s["downtime_metric"]["count"]
            else "-"
            for s in sums
        ],
    )
    row(
        "downtime, client: n, gap at each move p50 / p99 / max (ms)",
        [
            f"{s['switch_gap_s']['count']}, {_ms(s['switch_gap_s']['p50'])} / {_ms(s['switch_gap_s']['p99'])} / "
            f"{_ms(s['switch_gap_s']['max'])}"
            if s["switch_gap_s"]["count"]
            else "-"
            for s in sums
        ],
    )
    row(
        "migrated streams: max inter-token gap p50 / p99 / max (ms)",
        [
            f"{_ms(s['max_gap_migrated_s']['p50'])} / {_ms(s['max_gap_migrated_s']['p99'])} / {_ms(s['max_gap_migrated_s']['max'])}"
            if s["max_gap_migrated_s"]["count"]
            else "-"
            for s in sums
        ],
    )
    row(
        "other long streams: max inter-token gap p50 / p99 / max (ms)",
        [
            f"{_ms(s['max_gap_other_long_s']['p50'])} / {_ms(s['max_gap_other_long_s']['p99'])} / {_ms(s['max_gap_other_long_s']['max'])}"
            if s["max_gap_other_long_s"]["count"]
            else "-"
            for s in sums
        ],
    )
    row(
        "engine lag (max % of run) / cores busy (+ others)",
        [
            f"{s['lag']['lag_pct_of_span']} % / {s['cpu'].get('cores_busy')} (+{s['cpu'].get('other_cores_busy', '?')})"
            for s in sums
        ],
    )
    row("wall time (s)", [f"{s['wall_s']:.0f}" for s in sums])
    if len(runs) == 2:
        a, b = ({i: v for k, v in run.placed.items() if (i := run.index_of(k)) is not None} for run in runs)
        differ = sum(1 for i in set(a) | set(b) if a.get(i) != b.get(i))
        lines.append("")
        lines.append(
            f"initial decode placement of the two runs: {'identical' if not differ else f'{differ} requests differ'} "
            f"({len(a)} and {len(b)} requests logged)"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _param(text: str) -> tuple[str, Any]:
    name, _, value = text.partition("=")
    if not name or not _:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    return name.strip(), parsed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Workload()
    ap.add_argument("--duration", type=float, help=f"simulated seconds of arrivals (default {d.duration_s:g})")
    ap.add_argument("--seed", type=int, default=0, help="workload, prompts and pickers")
    ap.add_argument("--mechanism", choices=MECHANISMS, default="recompute", help="migration.mechanism of the 'on' run")
    ap.add_argument("--time-scale", type=float, help="simulated seconds per wall second (default 1; --smoke: 2)")
    ap.add_argument("--placement", choices=PLACEMENTS, default="random", help="the decode profile (see above)")
    ap.add_argument("--runs", default="off,on", help="comma-separated, of off, on (in this order)")
    ap.add_argument(
        "--param",
        dest="params",
        type=_param,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a load-balance parameter of the 'on' run (repeatable; time values in simulated s)",
    )
    ap.add_argument("--interval", type=float, default=0.5, help="migration.interval_s, simulated s")
    ap.add_argument("--max-concurrent", type=int, default=4, help="migration.max_concurrent")
    ap.add_argument("--num-gpu-blocks", type=int, default=512, help="KV blocks (16 tokens) per decode engine")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="running sequences per decode engine")
    ap.add_argument("--short-rate", type=float, help=f"background requests/s (default {d.short_rate:g})")
    ap.add_argument(
        "--burst-every", type=float, help=f"seconds between bursts of long requests (default {d.burst_every_s:g})"
    )
    ap.add_argument("--burst-size", type=int, help=f"long requests per burst (default {d.burst_size})")
    ap.add_argument("--ttft-slo", type=float, help=f"TTFT SLO, simulated s (default {d.ttft_slo_s:g})")
    ap.add_argument("--tpot-slo", type=float, help=f"TPOT SLO, simulated s (default {d.tpot_slo_s:g})")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run, wait up to S wall seconds for other processes to use < 0.2 cores",
    )
    ap.add_argument("--drain", type=float, default=120.0, help="simulated seconds the last requests get to finish")
    ap.add_argument("--out", help="write the runs (summaries, every move, the table) as JSON to this file")
    ap.add_argument("--keep-logs", action="store_true", help="keep the engines' and gateway's logs (path printed)")
    ap.add_argument("--smoke", action="store_true", help="a tiny configuration, a few seconds per run (for the tests)")
    args = ap.parse_args(argv)
    args.params = dict(args.params)
    base = SMOKE if args.smoke else d
    overrides = {
        "duration_s": args.duration,
        "short_rate": args.short_rate,
        "burst_every_s": args.burst_every,
        "burst_size": args.burst_size,
        "ttft_slo_s": args.ttft_slo,
        "tpot_slo_s": args.tpot_slo,
    }
    args.workload = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if args.smoke:
        args.drain = min(args.drain, 30.0)
    if args.time_scale is None:
        args.time_scale = 2.0 if args.smoke else 1.0
    args.run_list = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not args.run_list or any(r not in ("off", "on") for r in args.run_list):
        ap.error("--runs: a comma-separated list of off, on")
    try:
        policy_params(args)
    except ValidationError as exc:  # pydantic's message names the parameter
        ap.error(f"--param: {exc}")
    return args


def describe(args: argparse.Namespace, requests: Sequence[BenchRequest]) -> list[str]:
    w: Workload = args.workload
    profile = load_profile(PROFILE)
    longs = [r for r in requests if r.slo_class == LONG]
    shorts = [r for r in requests if r.slo_class == SHORT]
    step1 = profile.step_time(StepBatch(decode_seqs=1, decode_kv_tokens=512))
    step_hot = profile.step_time(StepBatch(decode_seqs=24, decode_kv_tokens=24 * 2000))
    kv_tokens = sum(r.prompt_tokens + r.max_tokens for r in longs[: w.burst_size])
    params = policy_params(args)
    fleet = (
        f"fleet: 1 prefill + {DECODERS} decode sim engines ({PROFILE}, vLLM flavour, PD hand-off), decode KV "
        f"{args.num_gpu_blocks} blocks x 16 = {16 * args.num_gpu_blocks} tokens, max_num_seqs {args.max_num_seqs}; "
        f"decode placement: {args.placement}; time scale {args.time_scale:g} (latencies below in simulated ms)"
    )
    workload = (
        f"workload (seed {args.seed}): {len(shorts)} short requests (Poisson {w.short_rate:g}/s, prompt "
        f"{w.short_prompt[0]}-{w.short_prompt[1]}, output {w.short_output[0]}-{w.short_output[1]}) + {len(longs)} long "
        f"({w.burst_size} every {w.burst_every_s:g} s from {w.first_burst_s:g} s, prompt {w.long_prompt[0]}-"
        f"{w.long_prompt[1]}, output {w.long_output[0]}-{w.long_output[1]}) over {w.duration_s:g} s; a burst's final "
        f"KV ~{kv_tokens} tokens"
    )
    model = (
        f"modelled decode step: {1e3 * step1:.1f} ms (1 x 512 tokens), {1e3 * step_hot:.1f} ms (24 x 2000); "
        f"SLO: TTFT <= {1e3 * w.ttft_slo_s:.0f} ms, TPOT <= {1e3 * w.tpot_slo_s:.0f} ms"
    )
    policy = (
        f"'on': migration.policy load-balance, mechanism {args.mechanism}, interval {args.interval:g} s, "
        f"max_concurrent {args.max_concurrent}; parameters: " + ", ".join(f"{k}={v}" for k, v in params.items())
    )
    return [fleet, workload, model, policy]


async def wait_quiet(limit_s: float, threshold: float = 0.2, window_s: float = 3.0) -> None:
    """Wait (up to ``limit_s``) until the host's busy cores over ``window_s`` drop below ``threshold``
    (nothing of ours runs then but this process, which sleeps)."""
    deadline = time.monotonic() + limit_s
    while True:
        before = sg.host_cpu()
        await asyncio.sleep(window_s)
        after = sg.host_cpu()
        if before is None or after is None or after[1] <= before[1]:
            return
        busy = (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)
        if busy < threshold:
            print(f"  host quiet: {busy:.2f} cores busy", flush=True)
            return
        if time.monotonic() >= deadline:
            print(f"  host still busy after {limit_s:g} s ({busy:.2f} cores); going on", flush=True)
            return


async def main_async(args: argparse.Namespace) -> list[RunResult]:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    w: Workload = args.workload
    requests = build_requests(w, args.seed)
    slo = SloSpec(default=Slo(ttft_s=w.ttft_slo_s, tpot_s=w.tpot_slo_s))
    for line in describe(args, requests):
        print(line, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="pdgate-migration-bench-"))
    runs: list[RunResult] = []
    try:
        for name in args.run_list:
            if args.wait_quiet > 0:
                await wait_quiet(args.wait_quiet)
            run = await run_one(name, name == "on", requests, slo, args, workdir / name)
            s = run.summary()
            print(
                f"  {name:<3}: {s['completed']}/{s['requests']} completed, {s['failed']} failed; TTFT p99 "
                f"{_ms(s['ttft_s']['p99'])} ms, TPOT p99 {_ms(s['tpot_s']['p99'])} ms; {s['migrations']} migrations "
                f"({s['migrations_failed']} failed); preemptions {s['preemptions']}; {run.wall_s:.0f} s",
                flush=True,
            )
            for problem in run.problems[:3]:
                print(f"      gateway: {problem}", flush=True)
            runs.append(run)
    finally:
        if args.keep_logs:
            print(f"logs: {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    print(
        f"migration benchmark: host {platform.machine()} with {os.cpu_count()} CPUs, commit "
        f"{sg.code_version().get('commit')}",
        flush=True,
    )
    try:
        runs = run_async(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sg._stop_all()
        print("interrupted; every engine and gateway stopped", file=sys.stderr)
        return 130
    finally:
        sg._stop_all()
    print()
    text = table(runs)
    print(text)
    total = time.monotonic() - started
    print(f"\ntotal {total:.0f} s")
    failed = sum(r.stats.failed for r in runs)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "benchmark": "migration",
                    "profile": PROFILE,
                    "fleet": f"1P{DECODERS}D sim, vLLM flavour",
                    "host": {
                        "machine": platform.machine(),
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                    },
                    "args": {k: v for k, v in vars(args).items() if k != "workload"},
                    "workload": dataclasses.asdict(args.workload),
                    "policy_parameters": policy_params(args),
                    "code": sg.code_version(),
                    "wall_s": total,
                    "table": text,
                    "runs": {
                        r.name: {
                            **r.summary(),
                            "moves": [dataclasses.asdict(m) for m in r.moves],
                            "per_request": r.per_request(),
                        }
                        for r in runs
                    },
                },
                indent=1,
                default=str,
            )
        )
        print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
