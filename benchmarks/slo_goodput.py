#!/usr/bin/env python3
"""SLO goodput of the gateway under several scheduling policies, on replayed traces.

    python benchmarks/slo_goodput.py [--traces mooncake,azure-code,azure-conv]
        [--policies round-robin,least-loaded,prefix-affinity,slo-aware] [--requests-per-probe N]
        [--time-scale X] [--max-probes K] [--seed S] [--out results.json] [--quick]

**Goodput** (DistServe): the highest request rate at which at least 90 % of the requests meet
both their TTFT and their TPOT SLO; a rejected or failed request is a miss. For every trace and
every policy (a dict deep-merged into the gateway config, table ``POLICIES`` below) the rate is
searched with :func:`loadgen.sweep.sweep` (double until a probe misses, then bisect), the
policies interleaved round by round, and every policy gets the identical request list at a rate.

**Fleet**: two prefill and two decode simulated engines (vLLM flavour, profile
``h100-llama-3-8b``, KV events on), as ``configs/default.yaml``, and the gateway
(``pdgate serve``), all subprocesses. Every probe (policy, trace, rate) starts a fresh fleet and
gateway, so no cache or load-balancer state is carried from one probe to the next, and stops
them (process groups; also on Ctrl-C, SIGTERM or an error).

**Traces** (table ``TRACES``): a window of the trace, its own inter-arrival pattern scaled so
that the window's mean rate is the probed rate (burstiness kept), prompt and output lengths
from the trace (``ignore_eos``). See each entry for the window, the shaping and the SLOs; the
script prints the modelled unloaded TTFT and decode step next to the SLOs.

**Time**: the simulated engines can run ``time_scale`` times faster than real time (per trace;
``--time-scale`` overrides). The load generator then sends at ``rate * time_scale`` wall
requests/s, the gateway's SLO config and its scrape period are scaled alike, and every rate and
latency is reported in simulated (real-GPU) units. All traces default to time scale 1: the
gateway's own CPU per request (~7 ms for a 2k-token prompt on a 2-core VM: tokenizing, hashing,
two legs) is part of the TTFT a client sees and is only represented 1:1 at scale 1; the
decode-heavy trace already needs about a core for engines + gateway + client at its goodput,
so scale 2 would overload a 2-core host; scale 0.5 doubles the wall time, counts the gateway's
overhead at half (TTFT 10-20 % lower at the same load) and did not remove the engines' short
stalls, which came from other processes on the host. Each probe records the engines' lag (``/sim/state``), the load generator's lateness,
the CPU of the fleet, the gateway and the client, and what other processes took of the host;
a probe that may be distorted is flagged (``*`` in the table).

**Cost**: the default run (3 traces x 4 policies, up to 6 probes each) takes ~20 minutes on
the project's 2-core box; ``--quick`` (40 requests, 2 probes, two baselines) ~1.5 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import copy
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pdgate.common.perf_model import StepBatch, load_profile
from pdgate.common.runtime import run_async
from pdgate.common.tokenizer import load_tokenizer
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.launcher import launch_command, wait_http_ok
from pdgate.loadgen.client import Target
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.runner import LoadConfig, run_load
from pdgate.loadgen.slo import Slo, SloSpec
from pdgate.loadgen.stats import RunStats, summarize
from pdgate.loadgen.sweep import SweepConfig, SweepResult, sweep
from pdgate.loadgen.traces import block_sharing, parse_mooncake, read_azure, read_mooncake
from pdgate.loadgen.types import BenchRequest, RequestResult
from pdgate.simulate.fleet import resized
from pdgate.simulate.run import run_simulation, simulation_config

DATA = Path(os.environ.get("PDGATE_DATA", REPO_ROOT.parent / "shared" / "data"))
MODEL = "llama-3-8b"
PROFILE = "h100-llama-3-8b"
MAX_MODEL_LEN = 8192
TARGET_PCT = 90.0
KV_LINK_GBPS, KV_LINK_LATENCY_S = 25.0, 0.001  # the sim's defaults (pull time of the hand-off)

# --------------------------------------------------------------------------------------------
# Policies: each ``config`` is deep-merged into the base gateway config (``base_config``).
#   baseline       compared in the "vs best baseline" column
#   admission_off  add ``admission: {enabled: false}`` when the gateway config has that section
#   requires       top-level config sections the policy needs; without them it is skipped
# The strings SLO_TTFT_MS / SLO_TPOT_MS are replaced by the trace's SLOs in wall milliseconds.
# --------------------------------------------------------------------------------------------
SLO_TTFT_MS, SLO_TPOT_MS = "<trace ttft_ms>", "<trace tpot_ms>"

_FILTERS = [
    {"name": "healthy", "type": "health-filter"},
    {"name": "prefill-role", "type": "role-filter", "parameters": {"role": "prefill"}},
    {"name": "decode-role", "type": "role-filter", "parameters": {"role": "decode"}},
    {"name": "colocated-role", "type": "role-filter", "parameters": {"role": "both"}},
]


def _scheduling(
    plugins: list[dict[str, Any]],
    prefill: list[dict[str, Any]],
    decode: list[dict[str, Any]],
    colocated: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A scheduling section: the role filters, then each profile's own entries."""

    def role(name: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"pluginRef": "healthy"}, {"pluginRef": f"{name}-role"}, *entries]

    return {
        "plugins": [*_FILTERS, *plugins],
        "profiles": {
            "prefill": role("prefill", prefill),
            "decode": role("decode", decode),
            "colocated": role("colocated", colocated if colocated is not None else prefill),
        },
    }


POLICIES: dict[str, dict[str, Any]] = {
    # One round-robin picker per profile: a picker shared by the prefill and decode profiles
    # makes both picks of a request from the same position and then advances twice (on_sent of
    # each decision), so with two instances per role it always picks the first of each.
    "round-robin": {
        "baseline": True,
        "admission_off": True,
        "config": {
            "scheduling": _scheduling(
                [
                    {"name": "rr-prefill", "type": "round-robin"},
                    {"name": "rr-decode", "type": "round-robin"},
                    {"name": "rr-colocated", "type": "round-robin"},
                ],
                prefill=[{"pluginRef": "rr-prefill"}],
                decode=[{"pluginRef": "rr-decode"}],
                colocated=[{"pluginRef": "rr-colocated"}],
            )
        },
    },
    "least-loaded": {
        "baseline": True,
        "admission_off": True,
        "config": {
            "scheduling": _scheduling(
                [{"name": "load", "type": "least-loaded"}, {"name": "pick", "type": "max-score"}],
                prefill=[{"pluginRef": "load", "weight": 1.0}, {"pluginRef": "pick"}],
                decode=[{"pluginRef": "load", "weight": 1.0}, {"pluginRef": "pick"}],
            )
        },
    },
    # Prefix affinity decides the prefill engine; least-loaded at weight 0.1 only breaks ties
    # (a prefix-hit difference above 10 % of the prompt always wins). Decode: least-loaded.
    "prefix-affinity": {
        "baseline": True,
        "admission_off": True,
        "config": {
            "scheduling": _scheduling(
                [
                    {"name": "prefix", "type": "prefix-affinity"},
                    {"name": "load", "type": "least-loaded"},
                    {"name": "pick", "type": "max-score"},
                ],
                prefill=[
                    {"pluginRef": "prefix", "weight": 1.0},
                    {"pluginRef": "load", "weight": 0.1},
                    {"pluginRef": "pick"},
                ],
                decode=[{"pluginRef": "load", "weight": 1.0}, {"pluginRef": "pick"}],
            )
        },
    },
    # The gateway's own default scheduling (no `scheduling` key) with the trace's SLO and
    # admission control on (its default).
    "slo-aware": {
        "baseline": False,
        "requires": ("slo", "admission"),
        "config": {"slo": {"default": {"ttft_ms": SLO_TTFT_MS, "tpot_ms": SLO_TPOT_MS}}},
    },
}
DEFAULT_POLICIES = ("round-robin", "least-loaded", "prefix-affinity", "slo-aware")


# --------------------------------------------------------------------------------------------
# Traces. Rates and SLOs in simulated (real-GPU) seconds.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceSpec:
    name: str
    path: str  # under DATA
    fmt: str  # mooncake | azure
    note: str  # how the window and the lengths were shaped (printed)
    ttft_s: float
    tpot_s: float
    start_rate: float  # first probed rate, req/s
    time_scale: float  # simulated seconds per wall second
    requests: int = 120  # requests per probe (at least)
    min_probe_s: float = 0.0  # simulated seconds of arrivals per probe (at least): more requests at high rates
    max_requests: int = 600
    offset: int = 0  # first record of the window
    anchor_end: bool = False  # the window is the trace's last N records (instead of N from offset)
    scale: float = 1.0  # Mooncake: every 512-token block becomes 512 * scale tokens
    truncate: int | None = 7168  # cap on prompt tokens (prompt + output must fit max_model_len 8192)
    max_output: int = 1024  # records with longer outputs are dropped


TRACES: dict[str, TraceSpec] = {
    # Mooncake's synthetic trace, its last records: within that window 66 % of the prompt blocks
    # repeat an earlier block of the window, as over the whole trace (the head shares only ~5 %,
    # and with a fresh fleet per probe only sharing inside the window counts). Blocks shrunk from
    # 512 to 64 tokens (scale 1/8, sharing structure kept), so prompts average ~2.9k tokens
    # instead of ~23k and fit the 8k context; prompts cut at 7168 tokens (trailing blocks
    # dropped). Outputs ~40 tokens: prefill-bound and prefix-heavy.
    # SLO: TTFT 400 ms = 4x the modelled unloaded TTFT of the mean prompt (~100 ms), 1.7x that
    # of the p90 prompt; TPOT 20 ms = 2.5x the unloaded decode step (7.9 ms).
    "mooncake": TraceSpec(
        "mooncake",
        "mooncake/synthetic_trace.jsonl",
        "mooncake",
        "the trace's last N records, blocks scaled 512 -> 64 tokens, prompts cut at 7168 tokens",
        ttft_s=0.400,
        tpot_s=0.020,
        start_rate=16.0,
        time_scale=1.0,
        requests=200,
        anchor_end=True,
        scale=1 / 8,
    ),
    # Azure code: prefill-heavy (prompts ~2.2k tokens, outputs ~30). The whole trace's
    # inter-arrival CV is 13, mostly from idle minutes between bursts; scaled to a mean rate, a
    # window holding such a gap would sit idle most of the time and take the rest as one
    # compressed burst. The window from record 610 has no idle gap over ~20 % of its span and an
    # inter-arrival CV of ~3: still bursty.
    # SLO: TTFT 400 ms = 5x the unloaded TTFT of the mean prompt (~80 ms), 1.8x the p90 one
    # (7k-token prompts take ~310 ms end to end unloaded); TPOT 20 ms.
    "azure-code": TraceSpec(
        "azure-code",
        "azure-llm-inference/AzureLLMInferenceTrace_code.csv",
        "azure",
        "records 610.. (inter-arrival CV ~3), prompts cut at 7168 tokens",
        ttft_s=0.400,
        tpot_s=0.020,
        start_rate=8.0,
        time_scale=1.0,
        requests=200,
        offset=610,
    ),
    # Azure conversation: prompts ~0.9k tokens, outputs ~290 tokens (decode-heavy). A request
    # decodes for several seconds, so a probe has at least 10 simulated seconds of arrivals (more
    # requests at high rates) to reach a steady decode batch.
    # SLO: TTFT 200 ms = 5x the unloaded TTFT of the mean prompt (~40 ms); TPOT 20 ms.
    "azure-conv": TraceSpec(
        "azure-conv",
        "azure-llm-inference/AzureLLMInferenceTrace_conv.csv",
        "azure",
        "records 400.. (inter-arrival CV ~1), at least 10 s of arrivals per probe",
        ttft_s=0.200,
        tpot_s=0.020,
        start_rate=16.0,
        time_scale=1.0,
        requests=150,
        min_probe_s=10.0,
        max_requests=800,
        offset=400,
    ),
}


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------
class TraceWorkload:
    """A trace's window as :class:`BenchRequest` lists with arrival times scaled to a rate."""

    def __init__(self, spec: TraceSpec, seed: int) -> None:
        self.spec = spec
        self.builder = PromptBuilder(load_tokenizer("builtin"), seed=seed)
        path = DATA / spec.path
        if spec.fmt == "mooncake":
            records = parse_mooncake(path)
            if spec.anchor_end:
                records = records[-spec.max_requests :]
            else:
                records = records[spec.offset : spec.offset + spec.max_requests]
            self.pool = read_mooncake(
                records,
                self.builder,
                scale=spec.scale,
                truncate_input_tokens=spec.truncate,
                max_output_tokens=spec.max_output,
            )
        else:
            self.pool = read_azure(
                path,
                self.builder,
                seed=seed,
                truncate_input_tokens=spec.truncate,
                offset=spec.offset,
                limit=spec.max_requests,
                max_output_tokens=spec.max_output,
            )
        if len(self.pool) < 2:
            raise ValueError(f"{spec.name}: the window has {len(self.pool)} requests")
        self._cache: dict[tuple[int, float], list[BenchRequest]] = {}

    def window(self, n: int) -> list[BenchRequest]:
        n = min(n, len(self.pool))
        return self.pool[-n:] if self.spec.anchor_end else self.pool[:n]

    def requests(self, n: int, rate: float) -> list[BenchRequest]:
        """The window's ``n`` requests, its arrival pattern scaled to a mean of ``rate`` req/s
        (``(n - 1) / span``), times in simulated seconds from 0."""
        key = (n, rate)
        if key not in self._cache:
            reqs = self.window(n)
            t0 = reqs[0].arrival_s or 0.0
            span = (reqs[-1].arrival_s or 0.0) - t0
            factor = (len(reqs) - 1) / (rate * span) if span > 0 else 0.0
            self._cache[key] = [
                dataclasses.replace(r, index=i, arrival_s=((r.arrival_s or 0.0) - t0) * factor)
                for i, r in enumerate(reqs)
            ]
        return self._cache[key]

    def describe(self, n: int) -> dict[str, Any]:
        reqs = self.window(n)
        times = np.array([r.arrival_s or 0.0 for r in reqs])
        gaps = np.diff(times)
        inputs = np.array([r.prompt_tokens for r in reqs])
        outputs = np.array([r.max_tokens for r in reqs])
        ttft = np.array([unloaded_ttft(int(p)) for p in inputs])
        info = {
            "pool": len(self.pool),
            "requests": len(reqs),
            "native_rate": (len(reqs) - 1) / (times[-1] - times[0]) if times[-1] > times[0] else None,
            "interarrival_cv": float(gaps.std() / gaps.mean()) if gaps.size and gaps.mean() > 0 else None,
            "input_mean": float(inputs.mean()),
            "input_p50": float(np.median(inputs)),
            "input_p90": float(np.percentile(inputs, 90)),
            "input_max": int(inputs.max()),
            "output_mean": float(outputs.mean()),
            "output_p50": float(np.median(outputs)),
            "output_p90": float(np.percentile(outputs, 90)),
            "unloaded_ttft_p50_s": float(np.median(ttft)),
            "unloaded_ttft_p90_s": float(np.percentile(ttft, 90)),
            "unloaded_ttft_p99_s": float(np.percentile(ttft, 99)),
            "unloaded_decode_step_s": unloaded_decode_step(int(np.median(inputs))),
        }
        if self.spec.fmt == "mooncake":
            info["block_hit_rate"] = block_sharing(reqs, self.builder.tokenizer, 16).hit_rate
        return info


_PROFILE = None


def _profile():
    global _PROFILE
    if _PROFILE is None:
        _PROFILE = load_profile(PROFILE)
    return _PROFILE


def unloaded_ttft(prompt_tokens: int, budget: int = 8192) -> float:
    """Modelled TTFT of a lone request through PD, no cache hit: the prefill (chunks of the
    token budget) + the KV pull + the decode engine's first step (recomputing the last token)."""
    profile = _profile()
    t, done = 0.0, 0
    while done < prompt_tokens:
        chunk = min(budget, prompt_tokens - done)
        t += profile.step_time(StepBatch(prefill_tokens=chunk, prefill_attn_pairs=chunk * (done + chunk)))
        done += chunk
    pull = KV_LINK_LATENCY_S + profile.kv_bytes_per_token * prompt_tokens / (KV_LINK_GBPS * 1e9)
    return t + pull + profile.step_time(StepBatch(prefill_tokens=1, prefill_attn_pairs=prompt_tokens))


def unloaded_decode_step(context_tokens: int) -> float:
    return _profile().step_time(StepBatch(decode_seqs=1, decode_kv_tokens=context_tokens))


# --------------------------------------------------------------------------------------------
# Gateway config
# --------------------------------------------------------------------------------------------
def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def gateway_sections() -> set[str]:
    return set(GatewayConfig.model_fields)


def policy_available(name: str) -> str | None:
    """``None`` when the policy can run with this gateway, else why not."""
    policy = POLICIES[name]
    missing = [s for s in policy.get("requires", ()) if s not in gateway_sections()]
    return f"the gateway config has no {', '.join(missing)} section yet" if missing else None


def _substitute(value: Any, table: Mapping[str, Any]) -> Any:
    if isinstance(value, str) and value in table:
        return table[value]
    if isinstance(value, Mapping):
        return {k: _substitute(v, table) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, table) for v in value]
    return value


def base_config(ports: Sequence[int], zmq_ports: Sequence[int], gateway_port: int, time_scale: float) -> dict[str, Any]:
    """The 2P2D fleet of configs/default.yaml on the given ports, its engines at ``time_scale``."""
    roles = ["prefill", "prefill", "decode", "decode"]
    instances = []
    for n, (role, port, zport) in enumerate(zip(roles, ports, zmq_ports, strict=True)):
        instances.append(
            {
                "id": f"{role}-{n % 2}",
                "url": f"http://127.0.0.1:{port}",
                "kind": "sim",
                "role": role,
                "model": MODEL,
                "kv_events": {"endpoint": f"tcp://127.0.0.1:{zport}"},
                "launch": {"profile": PROFILE, "time_scale": time_scale},
            }
        )
    return {
        "host": "127.0.0.1",
        "port": gateway_port,
        "models": [{"name": MODEL, "tokenizer": "builtin", "max_model_len": MAX_MODEL_LEN}],
        "instances": instances,
        # the engines' load is scraped as often in simulated time as at time scale 1
        "scrape_interval_s": 1.0 / time_scale,
        "stale_after_s": 5.0 / time_scale,
    }


def policy_config(name: str, base: Mapping[str, Any], slo: Slo, time_scale: float) -> dict[str, Any]:
    policy = POLICIES[name]
    extra = _substitute(
        policy["config"],
        {
            SLO_TTFT_MS: round(1e3 * (slo.ttft_s or 0) / time_scale, 3),
            SLO_TPOT_MS: round(1e3 * (slo.tpot_s or 0) / time_scale, 3),
        },
    )
    if policy.get("admission_off") and "admission" in gateway_sections():
        extra = deep_merge(extra, {"admission": {"enabled": False}})
    config = deep_merge(base, extra)
    GatewayConfig.model_validate(config)  # fail here, with pydantic's message, rather than in the child
    return config


# --------------------------------------------------------------------------------------------
# Processes: a fresh fleet and gateway per probe, always stopped
# --------------------------------------------------------------------------------------------
_LIVE: dict[int, subprocess.Popen] = {}  # pid -> process (each the leader of its own group)
STOP_GRACE_S = 5.0
OTHER_LOAD_WARN = 0.5  # cores other processes on the host took during a probe: its figures may be distorted


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
    _LIVE[proc.pid] = proc
    return proc


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM each process group, SIGKILL what is left after the grace period."""
    for proc in procs:
        if proc.poll() is None:
            _killpg(proc, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _killpg(proc, signal.SIGKILL)
            proc.wait(5)
        _killpg(proc, signal.SIGKILL)  # stragglers of an exited leader
        _LIVE.pop(proc.pid, None)


@atexit.register
def _stop_all() -> None:
    _stop(list(_LIVE.values()))


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def host_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole host from /proc/stat (Linux), else None."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return float(sum(values) - idle), float(sum(values))


class Fleet:
    """Four sim engines and a gateway for one probe: ``async with Fleet(config) as fleet``."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.engines: list[tuple[str, str, subprocess.Popen]] = []  # (id, url, process)
        self.gateway: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{config['port']}"
        self._cpu0: dict[int, float] = {}

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    async def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        parsed = GatewayConfig.model_validate(self.config)
        for inst in parsed.instances:
            spec = inst.spec()
            proc = _spawn(launch_command(inst), self.workdir / f"{spec.id}.log")
            self.engines.append((spec.id, inst.url, proc))
        gw_log = self.workdir / "gateway.log"
        self.gateway = _spawn(
            [sys.executable, "-m", "pdgate.cli", "serve", "--config", str(config_path), "--workers", "1"], gw_log
        )
        async with aiohttp.ClientSession() as session:
            for name, url, proc in self.engines:
                await wait_http_ok(
                    session, url + "/health", proc, self.workdir / f"{name}.log", f"engine {name}", 60, 0.05
                )
            await wait_http_ok(session, self.url + "/ready", self.gateway, gw_log, "gateway", 60, 0.05)
        self.mark_cpu()

    def mark_cpu(self) -> None:
        """Count CPU from now on (see :meth:`cpu_used`)."""
        for proc in self.processes:
            self._cpu0[proc.pid] = cpu_seconds(proc.pid) or 0.0

    @property
    def processes(self) -> list[subprocess.Popen]:
        return [p for _, _, p in self.engines] + ([self.gateway] if self.gateway else [])

    def cpu_used(self) -> dict[str, float | None]:
        """CPU seconds since :meth:`mark_cpu`: the engines together, and the gateway."""

        def used(proc: subprocess.Popen) -> float | None:
            now = cpu_seconds(proc.pid)
            return None if now is None else now - self._cpu0.get(proc.pid, 0.0)

        engines = [used(p) for _, _, p in self.engines]
        return {
            "engines": None if None in engines else sum(e for e in engines if e is not None),
            "gateway": used(self.gateway) if self.gateway else None,
        }

    async def warm_up(self, n: int = 4, model: str = MODEL) -> None:
        """A few tiny requests through the gateway, one after the other, so that the first
        requests of the probe do not pay one-time costs (connections, lazy imports). With a
        round-robin picker they reach every engine; their prompts share nothing with a trace."""
        async with aiohttp.ClientSession() as session:
            for i in range(n):
                body = {"model": model, "prompt": f"warm up {i} " * 8, "max_tokens": 2, "ignore_eos": True}
                async with session.post(
                    self.url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=30)
                ) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"warm-up request: HTTP {resp.status}: {(await resp.text())[:300]}")

    async def sim_states(self) -> dict[str, dict[str, Any]]:
        out = {}
        async with aiohttp.ClientSession() as session:
            for name, url, _ in self.engines:
                try:
                    async with session.get(url + "/sim/state", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        out[name] = await resp.json()
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    out[name] = {"error": str(exc)}
        return out

    async def gateway_figures(self) -> dict[str, Any]:
        """From the gateway's /metrics: the mean actual/predicted ratio per predicted quantity, and
        its admission outcomes by reason (what the scheduler believed, next to what happened)."""
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(self.url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return {"error": str(exc)}
        return prometheus_figures(text)

    def stop(self) -> None:
        procs = ([self.gateway] if self.gateway else []) + [p for _, _, p in self.engines]
        _stop(procs)  # the gateway first, so it does not see its engines vanish mid-request


def prometheus_figures(text: str) -> dict[str, Any]:
    """Mean ``pdgate_prediction_ratio`` per quantity and ``pdgate_admission_decisions`` per
    outcome/reason, from a gateway's Prometheus text."""
    sums: dict[str, list[float]] = {}
    admission: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("pdgate_prediction_ratio_sum", "pdgate_prediction_ratio_count"):
                pair = sums.setdefault(sample.labels["quantity"], [0.0, 0.0])
                pair[sample.name.endswith("_count")] += sample.value
            elif sample.name == "pdgate_admission_decisions_total" and sample.value:
                key = f"{sample.labels['outcome']}/{sample.labels['reason']}"
                admission[key] = admission.get(key, 0) + int(sample.value)
    ratios = {q: round(total / n, 3) for q, (total, n) in sorted(sums.items()) if n}
    return {"prediction_ratio_mean": ratios, "admission": dict(sorted(admission.items()))}


# --------------------------------------------------------------------------------------------
# One probe
# --------------------------------------------------------------------------------------------
def to_sim(result: RequestResult, time_scale: float) -> RequestResult:
    """``result`` with every time in simulated seconds."""
    s = time_scale
    return dataclasses.replace(
        result,
        scheduled_s=result.scheduled_s * s,
        sent_s=result.sent_s * s,
        end_s=result.end_s * s,
        first_token_s=None if result.first_token_s is None else result.first_token_s * s,
        chunk_times=[t * s for t in result.chunk_times],
    )


@dataclass
class Probe:
    policy: str
    rate: float
    requests: int
    stats: RunStats
    wall_s: float
    lag: dict[str, Any]
    cpu: dict[str, Any]
    rejected: int = 0  # answered 429 (admission control)
    errors: list[str] = field(default_factory=list)
    gateway: dict[str, Any] = field(default_factory=dict)  # prediction ratios, admission reasons

    @property
    def attainment(self) -> float:
        return self.stats.attainment or 0.0

    def summary(self) -> dict[str, Any]:
        s = self.stats
        ms = lambda v: None if v is None else round(v * 1e3, 2)
        return {
            "policy": self.policy,
            "rate": self.rate,
            "requests": self.requests,
            "attainment": s.attainment,
            "met": s.met,
            "failed": s.failed,
            "rejected_429": self.rejected,
            "goodput_rps": s.goodput_rps,
            "ttft_ms": {"p50": ms(s.ttft.p50), "p90": ms(s.ttft.p90), "p99": ms(s.ttft.p99)},
            "tpot_ms": {"p50": ms(s.tpot.p50), "p90": ms(s.tpot.p90), "p99": ms(s.tpot.p99)},
            "output_tps": s.output_tps,
            "input_tps": s.input_tps,
            "wall_s": round(self.wall_s, 2),
            "lag": self.lag,
            "cpu": self.cpu,
            "errors": self.errors[:5],
            "gateway": self.gateway,
        }


def lag_summary(states: Mapping[str, Mapping[str, Any]], sim_span: float) -> dict[str, Any]:
    ok = [s for s in states.values() if "error" not in s]
    steps = sum(s.get("steps", 0) for s in ok)
    prefill = [s for s in ok if s.get("role") == "prefill"]
    queries = sum(s.get("prefix_cache_queries", 0) for s in prefill)
    return {
        "lag_total_s": round(sum(s.get("lag_total_seconds", 0.0) for s in ok), 4),
        "lag_max_ms": round(1e3 * max((s.get("lag_max_seconds", 0.0) for s in ok), default=0.0), 2),
        "lag_pct_of_span": round(100 * max((s.get("lag_total_seconds", 0.0) for s in ok), default=0.0) / sim_span, 3)
        if sim_span > 0
        else None,
        "late_steps_pct": round(100 * sum(s.get("late_steps", 0) for s in ok) / steps, 1) if steps else None,
        "jitter_max_ms": round(1e3 * max((s.get("delivery_jitter_max_seconds", 0.0) for s in ok), default=0.0), 2),
        "prefill_prefix_hit": round(sum(s.get("prefix_cache_hits", 0) for s in prefill) / queries, 3)
        if queries
        else None,
        "preemptions": sum(s.get("num_preemptions", 0) for s in ok),
        "engines_unreachable": len(states) - len(ok),
        "lag_by_engine_s": {
            name: round(s.get("lag_total_seconds", 0.0), 4) for name, s in states.items() if "error" not in s
        },
    }


async def run_probe(
    policy: str,
    rate: float,
    requests: Sequence[BenchRequest],
    spec: TraceSpec,
    slo: SloSpec,
    time_scale: float,
    workdir: Path,
    attempts: int = 2,
) -> Probe:
    """One probe on a fresh fleet; a fleet that fails to start (a port taken meanwhile) is
    started again once on other ports."""
    for attempt in range(attempts):
        try:
            return await _run_probe(policy, rate, requests, spec, slo, time_scale, workdir / f"try{attempt}")
        except RuntimeError as exc:
            if attempt + 1 == attempts:
                raise
            print(f"  (probe {policy} at {rate:g} req/s: {str(exc).splitlines()[0]}; trying again)", flush=True)
    raise AssertionError("unreachable")


async def _run_probe(
    policy: str,
    rate: float,
    requests: Sequence[BenchRequest],
    spec: TraceSpec,
    slo: SloSpec,
    time_scale: float,
    workdir: Path,
) -> Probe:
    ports = free_ports(9)
    base = base_config(ports[:4], ports[4:8], ports[8], time_scale)
    config = policy_config(policy, base, slo.default, time_scale)
    started = time.monotonic()
    async with Fleet(config, workdir) as fleet:
        await fleet.warm_up()
        fleet.mark_cpu()
        target = Target(policy, fleet.url, MODEL)
        span_sim = requests[-1].arrival_s or 0.0
        load = LoadConfig(
            arrivals="trace",
            speedup=time_scale,
            timeout_s=600.0,
            # stop waiting for stragglers: unfinished requests are misses anyway
            duration_s=span_sim / time_scale + 1.0,
            drain_s=max(60.0, 3 * span_sim / time_scale),
        )
        cpu_client0, host0 = time.process_time(), host_cpu()
        wall0 = time.monotonic()
        results, _ = await run_load(target, requests, load)
        load_wall = time.monotonic() - wall0
        cpu_client, host1 = time.process_time() - cpu_client0, host_cpu()
        states = await fleet.sim_states()
        figures = await fleet.gateway_figures()
        cpu = fleet.cpu_used()
    lateness = [1e3 * (r.sent_s - r.scheduled_s) for r in results]
    sim_results = [to_sim(r, time_scale) for r in results]
    stats = summarize(sim_results, slo, duration_s=max(span_sim, 1e-6) + 1e-9)
    lag = lag_summary(states, max(span_sim, load_wall * time_scale))
    lag["client_late_p99_ms_wall"] = round(float(np.percentile(lateness, 99)), 2) if lateness else None
    cpu_info = {k: None if v is None else round(v, 2) for k, v in cpu.items()}
    cpu_info["client"] = round(cpu_client, 2)
    cpu_info["load_wall_s"] = round(load_wall, 2)
    ours = sum(v for v in cpu.values() if v is not None) + cpu_client
    cpu_info["cores_busy"] = round(ours / load_wall, 2) if load_wall > 0 else None
    if host0 is not None and host1 is not None and host1[1] > host0[1]:
        # the whole host's busy cores over the load, and what other processes took of it
        host_cores = (host1[0] - host0[0]) / (host1[1] - host0[1]) * (os.cpu_count() or 1)
        cpu_info["host_cores_busy"] = round(host_cores, 2)
        cpu_info["other_cores_busy"] = round(max(0.0, host_cores - ours / load_wall), 2) if load_wall > 0 else None
    errors = sorted({(r.error or f"HTTP {r.status}")[:160] for r in results if not r.ok})
    rejected = sum(1 for r in results if r.status == 429)
    return Probe(
        policy, rate, len(requests), stats, time.monotonic() - started, lag, cpu_info, rejected, errors, figures
    )


async def run_virtual_probe(
    policy: str, rate: float, requests: Sequence[BenchRequest], slo: SloSpec, instances: int, seed: int
) -> Probe:
    """One probe in virtual time (``pdgate simulate``, in a worker thread: its own event loop) on
    the 2P2D fleet resized to ``instances`` (half prefill, half decode), the policy's gateway config."""
    base = base_config([8101, 8102, 8103, 8104], [5601, 5602, 5603, 5604], 8000, 1.0)
    config = simulation_config(
        resized(GatewayConfig.model_validate(policy_config(policy, base, slo.default, 1.0)), instances)
    )
    span_sim = requests[-1].arrival_s or 0.0
    load = LoadConfig(
        arrivals="trace", timeout_s=600.0, duration_s=span_sim + 1.0, drain_s=max(60.0, 3 * span_sim), seed=seed
    )
    result = await asyncio.to_thread(run_simulation, config, requests, load, seed=seed)
    stats = summarize(result.results, slo, duration_s=max(span_sim, 1e-6) + 1e-9)
    lag = {
        "lag_total_s": 0.0,
        "lag_max_ms": 0.0,
        "lag_pct_of_span": 0.0,
        "client_late_p99_ms_wall": 0.0,
        "prefill_prefix_hit": None,
        "engines_unreachable": 0,
    }
    cpu = {"cores_busy": None, "load_wall_s": round(result.wall_s, 2), "speedup": round(result.speedup, 2)}
    errors = sorted({(r.error or f"HTTP {r.status}")[:160] for r in result.results if not r.ok})
    rejected = sum(1 for r in result.results if r.status == 429)
    return Probe(policy, rate, len(requests), stats, result.wall_s, lag, cpu, rejected, errors)


# --------------------------------------------------------------------------------------------
# The search, per trace
# --------------------------------------------------------------------------------------------
@dataclass
class TraceResult:
    spec: TraceSpec
    time_scale: float
    slo: SloSpec
    workload: dict[str, Any]
    sweeps: dict[str, SweepResult] = field(default_factory=dict)
    probes: dict[str, dict[float, Probe]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    instances: int | None = None  # --scale: virtual time on this many instances (else the real-time 2P2D)


def distorted(p: Probe) -> bool:
    """Engines lost over 1 % of the probe's time, the load generator sent late, or other
    processes took a good share of the host's CPU."""
    return (
        (p.lag["lag_pct_of_span"] or 0) > 1
        or (p.lag["client_late_p99_ms_wall"] or 0) > 10
        or (p.cpu.get("other_cores_busy") or 0) > OTHER_LOAD_WARN
    )


def fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.3g}" if rate < 100 else f"{rate:.0f}"


async def run_trace(
    spec: TraceSpec, policies: Sequence[str], args: argparse.Namespace, workdir: Path, log: Callable[[str], None]
) -> TraceResult:
    instances = getattr(args, "instances", None)  # virtual time on a fleet of this size (--scale)
    factor = instances / 4 if instances else 1.0
    time_scale = 1.0 if instances else args.time_scale or spec.time_scale
    requests_per_probe = round((args.requests_per_probe or spec.requests) * factor)
    if instances:
        spec = dataclasses.replace(spec, max_requests=max(round(spec.max_requests * factor), requests_per_probe))
    min_probe_s = spec.min_probe_s if args.min_probe_seconds is None else args.min_probe_seconds
    workload = TraceWorkload(spec, args.seed)
    slo = SloSpec(default=Slo(ttft_s=spec.ttft_s, tpot_s=spec.tpot_s))
    info = workload.describe(requests_per_probe)
    result = TraceResult(spec, time_scale, slo, info, instances=instances)
    log(f"\n## {spec.name}: {spec.note}")
    log(
        f"  window: {info['requests']} requests per probe (pool {info['pool']}), native rate "
        f"{fmt_rate(info['native_rate'])} req/s, inter-arrival CV {info['interarrival_cv']:.2f}; prompt tokens "
        f"mean {info['input_mean']:.0f} p50 {info['input_p50']:.0f} p90 {info['input_p90']:.0f}; output tokens mean "
        f"{info['output_mean']:.0f} p50 {info['output_p50']:.0f} p90 {info['output_p90']:.0f}"
        + (
            f"; prompt blocks repeated within the window {100 * info['block_hit_rate']:.0f} %"
            if "block_hit_rate" in info
            else ""
        )
    )
    log(
        f"  SLO: TTFT <= {1e3 * spec.ttft_s:.0f} ms (modelled unloaded TTFT p50 "
        f"{1e3 * info['unloaded_ttft_p50_s']:.0f} ms, p90 {1e3 * info['unloaded_ttft_p90_s']:.0f} ms, p99 "
        f"{1e3 * info['unloaded_ttft_p99_s']:.0f} ms), TPOT <= {1e3 * spec.tpot_s:.0f} ms (unloaded decode step "
        f"{1e3 * info['unloaded_decode_step_s']:.1f} ms); {TARGET_PCT:.0f} % must meet both"
    )
    if instances:
        log(f"  virtual time (pdgate simulate): {instances} instances, half prefill, half decode")
    else:
        log(f"  time scale {time_scale:g} (simulated s per wall s); rates and latencies below are simulated")
    runnable = []
    for name in policies:
        why = policy_available(name)
        if why:
            result.skipped[name] = why
            log(f"  policy {name}: skipped ({why})")
        else:
            runnable.append(name)
    config = SweepConfig(
        target_pct=TARGET_PCT,
        start_rate=(args.start_rate or spec.start_rate) * factor,
        min_rate=0.25,
        max_rate=1000.0,
        point_duration_s=min_probe_s,
        min_requests=requests_per_probe,
        tolerance=args.tolerance,
        max_probes=args.max_probes,
    )
    started = time.monotonic()
    probes: dict[str, dict[float, Probe]] = {name: {} for name in runnable}
    counter = iter(range(1_000_000))

    def build(n: int, rate: float) -> list[BenchRequest]:
        return workload.requests(min(n, spec.max_requests), rate)

    async def probe(name: str, rate: float, requests: Sequence[BenchRequest]) -> list[RequestResult]:
        if instances:
            p = await run_virtual_probe(name, rate, requests, slo, instances, args.seed)
        else:
            p = await run_probe(
                name, rate, requests, spec, slo, time_scale, workdir / f"{spec.name}-{name}-{next(counter)}"
            )
        probes[name][rate] = p
        s, lag = p.stats, p.lag
        flag = "  [distorted?]" if distorted(p) else ""
        rejected = f" (429: {p.rejected})" if p.rejected else ""
        log(
            f"  {name:<16} {fmt_rate(rate):>6} req/s  n={p.requests:<4} attained {100 * p.attainment:5.1f} %  "
            f"TTFT p50/p99 {_ms(s.ttft.p50)}/{_ms(s.ttft.p99)} ms  TPOT p50/p99 {_ms(s.tpot.p50)}/{_ms(s.tpot.p99)} ms  "
            f"failed {s.failed}{rejected}  lag {lag['lag_total_s']:.3f} s (max {lag['lag_max_ms']:.0f} ms)  "
            f"late p99 {lag['client_late_p99_ms_wall']} ms  cores {p.cpu['cores_busy']}"
            f" (+{p.cpu.get('other_cores_busy', '?')} others)  "
            f"hit {lag['prefill_prefix_hit']}  {p.wall_s:.0f} s{flag}"
        )
        ratios = p.gateway.get("prediction_ratio_mean")
        if ratios:
            log(f"      actual/predicted: {ratios}; admission: {p.gateway.get('admission')}")
        for err in p.errors[:2]:
            log(f"      error: {err}")
        return []

    # the sweep asks for a probe's attainment right after running it
    last: dict[str, float] = {}

    async def probe_and_remember(name: str, rate: float, requests: Sequence[BenchRequest]) -> list[RequestResult]:
        await probe(name, rate, requests)
        last["value"] = probes[name][rate].attainment
        return []

    if runnable:
        result.sweeps = await sweep(runnable, build, probe_and_remember, lambda _r, _rate: last["value"], config)
    result.probes = probes
    result.wall_s = time.monotonic() - started
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}" if value >= 0.0995 else f"{value * 1e3:.1f}"


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def markdown(result: TraceResult) -> str:
    spec = result.spec
    baselines = [n for n, s in result.sweeps.items() if POLICIES[n].get("baseline")]
    best = max((result.sweeps[n].best_rate or 0.0 for n in baselines), default=0.0)
    title = (
        f"### {spec.name}: TTFT <= {1e3 * spec.ttft_s:.0f} ms, TPOT <= {1e3 * spec.tpot_s:.0f} ms, "
        f"{TARGET_PCT:.0f} % attainment "
        + (
            f"({result.instances} instances in virtual time)"
            if result.instances
            else f"(time scale {result.time_scale:g}; simulated units)"
        )
    )
    header = (
        "| policy | goodput (req/s) | vs best baseline | attainment % at probed rates (req/s: %) "
        "| TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) |"
    )
    lines = [title, "", header, "|---|---:|---:|---|---:|---:|"]
    for name, sw in result.sweeps.items():
        by_rate = result.probes[name]
        points = " ".join(
            f"{fmt_rate(r)}:{100 * a:.3g}" + ("*" if r in by_rate and distorted(by_rate[r]) else "")
            for r, a in sorted(sw.points)
        )
        good = sw.best_rate
        ratio = f"{good / best:.2f}x" if good and best else "-"
        p = result.probes[name].get(good) if good is not None else None
        ttft = f"{_ms(p.stats.ttft.p50)} / {_ms(p.stats.ttft.p99)}" if p else "-"
        tpot = f"{_ms(p.stats.tpot.p50)} / {_ms(p.stats.tpot.p99)}" if p else "-"
        if good is None:  # even the lowest probed rate missed
            goodput = f"< {fmt_rate(min(r for r, _ in sw.points))}"
        else:  # ">=": the search ran out of probes before any rate missed
            goodput = fmt_rate(good) if sw.bad is not None else f">= {fmt_rate(good)}"
        lines.append(f"| {name} | {goodput} | {ratio} | {points} | {ttft} | {tpot} |")
    for name, why in result.skipped.items():
        lines.append(f"| {name} | (skipped: {why}) | | | | |")
    all_probes = [p for by_rate in result.probes.values() for p in by_rate.values()]
    if all_probes:
        lag_pct = max((p.lag["lag_pct_of_span"] or 0.0) for p in all_probes)
        lag_max = max(p.lag["lag_max_ms"] for p in all_probes)
        late = max((p.lag["client_late_p99_ms_wall"] or 0.0) for p in all_probes)
        cores = max((p.cpu["cores_busy"] or 0.0) for p in all_probes)
        others = max((p.cpu.get("other_cores_busy") or 0.0) for p in all_probes)
        flagged = sum(1 for p in all_probes if distorted(p))
        lines += [
            "",
            (
                f"{len(all_probes)} probes in {result.wall_s / 60:.1f} min; worst probe: engine lag "
                f"{lag_pct:.2f} % of the probe (max {lag_max:.0f} ms simulated), load-generator lateness "
                f"p99 {late:.1f} ms wall, {cores:.2f} cores busy (engines + gateway + client), "
                f"{others:.2f} cores taken by other processes on the host; {flagged} probe(s) flagged "
                "(*) as possibly distorted."
            ),
        ]
    return "\n".join(lines)


def to_json(result: TraceResult) -> dict[str, Any]:
    return {
        "trace": dataclasses.asdict(result.spec),
        "instances": result.instances,
        "time_scale": result.time_scale,
        "slo": result.slo.to_dict(),
        "workload": result.workload,
        "wall_s": result.wall_s,
        "skipped": result.skipped,
        "policies": {
            name: {
                "goodput_rps": sw.best_rate,
                "points": sw.points,
                "probes": [p.summary() for _, p in sorted(result.probes[name].items())],
            }
            for name, sw in result.sweeps.items()
        },
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--traces", default=",".join(TRACES), help=f"comma-separated, of {', '.join(TRACES)}")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help=f"comma-separated, of {', '.join(POLICIES)}")
    ap.add_argument("--requests-per-probe", type=int, help="requests per probe (default: per trace, 150-200)")
    ap.add_argument(
        "--min-probe-seconds",
        type=float,
        help="at least this many simulated seconds of arrivals per probe (default: per trace)",
    )
    ap.add_argument("--time-scale", type=float, help="simulated seconds per wall second (default: per trace)")
    ap.add_argument("--max-probes", type=int, default=6, help="probes per (trace, policy)")
    ap.add_argument("--tolerance", type=float, default=0.1, help="stop when the bracket is this narrow (relative)")
    ap.add_argument("--start-rate", type=float, help="first probed rate, req/s (default: per trace)")
    ap.add_argument("--ttft-ms", type=float, help="every trace's TTFT SLO (default: per trace)")
    ap.add_argument("--tpot-ms", type=float, help="every trace's TPOT SLO (default: per trace)")
    ap.add_argument("--seed", type=int, default=0, help="prompt texts (the lengths and times come from the trace)")
    ap.add_argument(
        "--scale",
        metavar="N1,N2,...",
        help="instead of the real-time 2P2D fleet: the same comparison in virtual time (pdgate simulate) on "
        "fleets of these sizes (half prefill, half decode); rates, requests per probe and the first rate grow "
        "with the fleet (x N/4)",
    )
    ap.add_argument("--out", help="write every probe and the tables as JSON to this file")
    ap.add_argument("--keep-logs", action="store_true", help="keep the engines' and gateway's logs (printed path)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 40 requests per probe, 2 probes, policies round-robin and least-loaded "
        "unless --policies is given (< 3 min)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.requests_per_probe = args.requests_per_probe or 40
        args.min_probe_seconds = 0.0 if args.min_probe_seconds is None else args.min_probe_seconds
        args.max_probes = min(args.max_probes, 2)
        if not any(
            a == "--policies" or a.startswith("--policies=") for a in (argv if argv is not None else sys.argv[1:])
        ):
            args.policies = "round-robin,least-loaded"
    args.trace_list = [t.strip() for t in args.traces.split(",") if t.strip()]
    args.scale_list = [int(n) for n in args.scale.split(",")] if args.scale else []
    if any(n < 2 for n in args.scale_list):
        ap.error("--scale: every fleet needs at least 2 instances (one prefill, one decode)")
    args.policy_list = [p.strip() for p in args.policies.split(",") if p.strip()]
    for t in args.trace_list:
        if t not in TRACES:
            ap.error(f"unknown trace {t!r}; known: {', '.join(TRACES)}")
    for p in args.policy_list:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r}; known: {', '.join(POLICIES)}")
    return args


async def main_async(args: argparse.Namespace) -> list[TraceResult]:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="pdgate-slo-goodput-"))
    results = []
    try:
        for instances in args.scale_list or [None]:
            args.instances = instances
            for name in args.trace_list:
                results.append(
                    await run_trace(
                        trace_spec(name, args), args.policy_list, args, workdir, lambda s: print(s, flush=True)
                    )
                )
    finally:
        if args.keep_logs:
            print(f"logs: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def trace_spec(name: str, args: argparse.Namespace) -> TraceSpec:
    """The trace's spec with the SLOs given on the command line (``--ttft-ms``, ``--tpot-ms``)."""
    spec = TRACES[name]
    if args.ttft_ms is not None:
        spec = dataclasses.replace(spec, ttft_s=args.ttft_ms / 1000)
    if args.tpot_ms is not None:
        spec = dataclasses.replace(spec, tpot_s=args.tpot_ms / 1000)
    return spec


def code_version() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified": None if status is None else bool(status)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [TRACES[t].path for t in args.trace_list if not (DATA / TRACES[t].path).exists()]
    if missing:
        print(f"missing trace files under {DATA} (set PDGATE_DATA): {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    print(
        f"SLO goodput: {len(args.trace_list)} trace(s) x {len(args.policy_list)} policies; fleet 2 prefill + 2 decode "
        f"sim engines ({PROFILE}, vLLM flavour) behind `pdgate serve`, fresh per probe; "
        f"host {platform.machine()} with {os.cpu_count()} CPUs",
        flush=True,
    )
    try:
        results = run_async(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        _stop_all()
        print("interrupted; every engine and gateway stopped", file=sys.stderr)
        return 130
    finally:
        _stop_all()
    print()
    for result in results:
        print(markdown(result))
        print()
    total = time.monotonic() - started
    print(f"total {total / 60:.1f} min")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "benchmark": "slo_goodput",
                    "target_pct": TARGET_PCT,
                    "profile": PROFILE,
                    "fleet": "2P2D sim, vLLM flavour",
                    "host": {
                        "machine": platform.machine(),
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                    },
                    "args": dict(vars(args)),
                    "code": code_version(),
                    "wall_s": total,
                    "traces": {
                        r.spec.name + (f"@{r.instances}" if r.instances else ""): {
                            **to_json(r),
                            "markdown": markdown(r),
                        }
                        for r in results
                    },
                },
                indent=1,
                default=str,
            )
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
