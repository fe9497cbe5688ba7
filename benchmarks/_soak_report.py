"""The chaos soak's report (``benchmarks/soak.py``): gateway RSS and open file descriptors sampled
from ``/proc`` over time, latency during and outside faults, endings by cause, and the plot.
Not a benchmark itself."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

import _soak_check as check
import _soak_faults as faults

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_and_fds(pid: int) -> tuple[float, int] | None:
    """(resident MiB, open file descriptors) of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            resident = int(f.read().split()[1]) * PAGE / 2**20
        return resident, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class ResourceSampler:
    """Samples RSS and open fds of named processes every ``period_s`` (``pids`` is asked each
    time, so a restarted process is followed under its name)."""

    pids: Callable[[], Mapping[str, int | None]]
    period_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    samples: list[tuple[float, str, int, float, int]] = field(default_factory=list)  # t, name, pid, MiB, fds

    def sample(self) -> None:
        now = self.clock()
        for name, pid in self.pids().items():
            if pid is not None and (got := rss_and_fds(pid)) is not None:
                self.samples.append((now, name, pid, round(got[0], 2), got[1]))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            try:
                await asyncio.wait_for(stop.wait(), self.period_s)
            except TimeoutError:
                pass

    def summary(self, t0: float) -> dict[str, Any]:
        """Per name: first, last, max RSS and fds, pids seen, and the last minute's against the first
        minute's mean (a leak grows it) — per incarnation, so a restart does not read as a drop."""
        out: dict[str, Any] = {}
        for name in sorted({s[1] for s in self.samples}):
            rows = [s for s in self.samples if s[1] == name]
            longest = max(Counter(s[2] for s in rows).items(), key=lambda kv: kv[1])[0]
            life = [s for s in rows if s[2] == longest]
            head = [s for s in life if s[0] - life[0][0] <= 60]
            tail = [s for s in life if life[-1][0] - s[0] <= 60]
            out[name] = {
                "pids": list(dict.fromkeys(s[2] for s in rows)),
                "rss_mib": {"first": rows[0][3], "last": rows[-1][3], "max": max(s[3] for s in rows)},
                "fds": {"first": rows[0][4], "last": rows[-1][4], "max": max(s[4] for s in rows)},
                "longest_life": {
                    "pid": longest,
                    "seconds": round(life[-1][0] - life[0][0], 1),
                    "rss_mib_first_last_minute": [_mean(s[3] for s in head), _mean(s[3] for s in tail)],
                    "fds_first_last_minute": [_mean(s[4] for s in head), _mean(s[4] for s in tail)],
                },
            }
        return out


def _mean(values: Any) -> float:
    values = list(values)
    return round(float(np.mean(values)), 2) if values else 0.0


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max in milliseconds (None without values) and the count."""
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    arr = np.asarray(values) * 1e3
    return {
        "n": len(values),
        "p50_ms": round(float(np.percentile(arr, 50)), 1),
        "p99_ms": round(float(np.percentile(arr, 99)), 1),
        "max_ms": round(float(arr.max()), 1),
    }


def latency_split(
    spans: Sequence[tuple[float, float, float | None]], windows: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    """End-to-end latency and TTFT (streams) of answered requests, during a fault or outside
    any; ``spans``: (start, end, first token time or None); ``windows``: faults' (start, end)."""

    def during(start: float, end: float) -> bool:
        return any(ws <= end and we >= start for ws, we in windows)

    out: dict[str, Any] = {}
    for label, want in (("during_faults", True), ("outside_faults", False)):
        chosen = [s for s in spans if during(s[0], s[1]) == want]
        out[label] = {
            "e2e": percentiles([e - s for s, e, _ in chosen]),
            "ttft": percentiles([f - s for s, _, f in chosen if f is not None]),
        }
    return out


def endings_table(endings: Sequence[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """kind -> cause (numbers and ids blurred out so that like causes group) -> count."""
    out: dict[str, Counter[str]] = {}
    for kind, cause in endings:
        out.setdefault(kind, Counter())[_blur(cause)] += 1
    return {k: dict(v.most_common()) for k, v in sorted(out.items())}


def _blur(cause: str) -> str:
    cause = re.sub(r"\b(cmpl|chatcmpl)-[0-9a-f]+", r"\1-…", cause)
    return re.sub(r"(?<![a-z])\d+(\.\d+)? (s|tokens|events)\b", r"N \2", cause)


# ------------------------------------------------------------------------------ the plot
FAULT_COLOURS = {
    "engine_kill": "tab:red",
    "engine_stop": "tab:orange",
    "conn_reset": "tab:pink",
    "engine_stall": "tab:brown",
    "kv_stall": "tab:olive",
    "drain": "tab:cyan",
    "replica_kill": "tab:purple",
    "nats_kill": "tab:gray",
}


def plot_resources(
    samples: Sequence[tuple[float, str, int, float, int]],
    faults: Sequence[tuple[str, float, float]],
    t0: float,
    out_png: Path,
) -> Path:
    """RSS (MiB) and open fds of each gateway replica over the run, faults shaded by kind."""
    fig = Figure(figsize=(10, 6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    names = sorted({s[1] for s in samples})
    for ax, col, label in ((axes[0], 3, "RSS (MiB)"), (axes[1], 4, "open file descriptors")):
        for n, name in enumerate(names):
            rows = [s for s in samples if s[1] == name]
            for k, pid in enumerate(dict.fromkeys(s[2] for s in rows)):  # one line per process: a restart breaks it
                life = [s for s in rows if s[2] == pid]
                ax.plot(
                    [s[0] - t0 for s in life],
                    [s[col] for s in life],
                    ".-",
                    color=f"C{n}",
                    markersize=2,
                    linewidth=1,
                    label=name if k == 0 and ax is axes[0] else None,
                )
        shown: set[str] = set()
        for kind, start, end in faults:
            colour = FAULT_COLOURS.get(kind, "tab:gray")
            ax.axvspan(
                start - t0,
                max(end, start + 0.3) - t0,
                color=colour,
                alpha=0.15,
                linewidth=0,
                label=kind if kind not in shown and ax is axes[0] else None,
            )
            shown.add(kind)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_xlabel("seconds since the load started")
    fig.suptitle("gateway replicas during the chaos soak (faults shaded; a restart breaks a line)")
    fig.legend(fontsize="small", ncol=5, loc="outside lower center")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, dpi=100)
    fig.clear()
    return out_png


# ------------------------------------------------------------------------------ logs and engines
def scan_gateway_logs(paths: Sequence[Path], top: int = 12) -> dict[str, Any]:
    """The replicas' JSON logs: lines by level, failovers and broken streams, the most frequent
    warnings and errors (numbers blurred), and any traceback."""
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    failovers = broken = 0
    tracebacks: list[str] = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                if "Traceback" in line or "Error" in line:
                    tracebacks.append(f"{path.name}: {line[:200]}")
                continue
            level, message = str(entry.get("level")), str(entry.get("message", ""))
            levels[level] += 1
            failovers += message.startswith("failed ") and " over from " in message
            broken += "broke mid-way" in message
            if entry.get("exc_info") or entry.get("traceback"):
                tracebacks.append(f"{path.name}: {message[:200]}")
            if level in ("warning", "error", "critical"):
                messages[f"{level}: {re.sub(r'[0-9]+', 'N', message)[:140]}"] += 1
    return {
        "levels": dict(levels),
        "failovers": failovers,
        "broke_mid_stream": broken,
        "top": dict(messages.most_common(top)),
        "tracebacks": tracebacks[:20],
    }


def engine_leftovers(states: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What each engine still holds once every client is done: running or waiting requests (a
    request the gateway left behind), migration reservations, held KV (a PD prefill or a live
    move whose other side never took it; freed after the engine's ``kv_hold_timeout_s``)."""
    out = {}
    for name, st in states.items():
        if "error" in st:
            out[name] = {"error": st["error"]}
            continue
        out[name] = {
            "running": st.get("num_running"),
            "waiting": st.get("num_waiting"),
            "held_kv": len(st.get("held_kv") or []),
            "migration_reservations": st.get("migration_reservations"),
            "migrations_in_flight": st.get("migrations_in_flight"),
        }
    return out


# ------------------------------------------------------------------------------ the report
@dataclass
class Outcome:
    """Everything a report is made of (times ``time.monotonic``; ``t0`` the start of the load)."""

    requests: list[check.Request]
    seen: list[check.Seen]
    endings: list[check.Ending]
    faults: list[faults.Fault]
    sampler: ResourceSampler
    counters: dict[str, Any]
    logs: dict[str, Any]
    engines: dict[str, Any]
    t0: float
    load_wall_s: float


def _count(items: Sequence[str]) -> dict[str, int]:
    return dict(Counter(items).most_common())


def summarise(o: Outcome, settings: Mapping[str, Any], host: Mapping[str, Any]) -> dict[str, Any]:
    """The report as JSON-ready data; ``bugs`` lists every request that did not end as documented."""
    windows = [(f.start, f.end or f.start) for f in o.faults]
    spans = [(x.start, x.end, x.first_token) for x, e in zip(o.seen, o.endings, strict=True) if e.kind == "identical"]
    bugs = [
        {
            "request_id": r.request_id,
            "kind": e.kind,
            "cause": e.cause,
            "replicas_tried": x.tried,
            "path": r.path,
            "chat": r.chat,
            "stream": r.stream,
            "start_s": round(x.start - o.t0, 2),
            "end_s": round(x.end - o.t0, 2),
            "faults_then": [
                f"{f.kind} {f.target} @{f.start - o.t0:.1f}s" for f in o.faults if f.overlaps(x.start - 1, x.end + 1)
            ],
        }
        for x, e, r in zip(o.seen, o.endings, o.requests, strict=True)
        if not e.documented
    ]
    leftover = {k: v for k, v in o.engines.items() if v.get("running") or v.get("waiting") or "error" in v}
    return {
        "benchmark": "soak",
        "settings": dict(settings),
        "host": dict(host),
        "requests": len(o.requests),
        "load_wall_s": round(o.load_wall_s, 1),
        "faults": {
            "total": len(o.faults),
            "by_kind": _count([f.kind for f in o.faults]),
            "failed_to_apply": [f"{f.kind} {f.target}: {f.detail['failed']}" for f in o.faults if "failed" in f.detail],
            "log": [
                {
                    "kind": f.kind,
                    "target": f.target,
                    "start_s": round(f.start - o.t0, 2),
                    "end_s": round((f.end or f.start) - o.t0, 2),
                    **f.detail,
                }
                for f in o.faults
            ],
        },
        "endings": _count([e.kind for e in o.endings]),
        "endings_by_cause": endings_table([(e.kind, e.cause) for e in o.endings]),
        "tokens": {
            "lost": sum(e.lost for e in o.endings),
            "duplicated": sum(e.duplicated for e in o.endings),
            "different": sum(e.mismatched for e in o.endings),
        },
        "latency": latency_split(spans, windows),
        "gateway_resources": o.sampler.summary(o.t0),
        "gateway_moves": o.counters,
        "gateway_logs": o.logs,
        "engines_after": o.engines,
        "engines_left_busy": leftover,
        "bugs": bugs,
    }


def failed(r: Mapping[str, Any]) -> bool:
    """A run fails on any bug ending, lost/duplicated/different token, fault not carried out, or
    request an engine still runs after every client is done."""
    t = r["tokens"]
    return bool(
        r["bugs"]
        or t["lost"]
        or t["duplicated"]
        or t["different"]
        or r["faults"]["failed_to_apply"]
        or r["engines_left_busy"]
    )


def print_report(r: Mapping[str, Any]) -> None:
    print(f"\nrequests: {r['requests']} (load {r['load_wall_s']} s)")
    f = r["faults"]
    print(f"faults injected: {f['total']} ({', '.join(f'{k} {v}' for k, v in sorted(f['by_kind'].items()))})")
    for failure in f["failed_to_apply"]:
        print(f"  fault not carried out: {failure}")
    t = r["tokens"]
    print(f"tokens lost: {t['lost']}, duplicated: {t['duplicated']}, different: {t['different']} (goal 0)")
    print("endings:")
    for kind, causes in r["endings_by_cause"].items():
        print(f"  {kind}: {r['endings'][kind]}{'' if kind in check.DOCUMENTED else '  <- bug'}")
        for cause, n in list(causes.items())[:8]:
            if cause:
                print(f"    {n:>5}  {cause}")
    print("latency of identical answers (ms, wall clock):")
    for label, figures in r["latency"].items():
        e2e, ttft = figures["e2e"], figures["ttft"]
        print(
            f"  {label.replace('_', ' ')}: n={e2e['n']}, e2e p50 {e2e['p50_ms']} / p99 {e2e['p99_ms']} / max "
            f"{e2e['max_ms']}; TTFT (streams) p50 {ttft['p50_ms']} / p99 {ttft['p99_ms']}"
        )
    for name, g in r["gateway_resources"].items():
        life = g["longest_life"]
        print(
            f"{name}: RSS {g['rss_mib']['first']:.0f} -> {g['rss_mib']['last']:.0f} MiB (max {g['rss_mib']['max']:.0f}), "
            f"fds {g['fds']['first']} -> {g['fds']['last']} (max {g['fds']['max']}), pids {g['pids']}; its longest "
            f"life ({life['seconds']} s): RSS first/last minute {life['rss_mib_first_last_minute']} MiB, fds "
            f"{life['fds_first_last_minute']}"
        )
    for name, counts in r["gateway_moves"].items():
        moves = ", ".join(f"{k} {v:g}" for k, v in sorted(counts.items())) or "none"
        print(f"{name} moves since its last start: {moves}")
    logs = r["gateway_logs"]
    print(
        f"gateway logs: {logs['levels']}; failovers {logs['failovers']}, streams broken mid-way "
        f"{logs['broke_mid_stream']}, tracebacks {len(logs['tracebacks'])}"
    )
    for message, n in list(logs["top"].items())[:8]:
        print(f"    {n:>5}  {message}")
    print(f"engines after the run: {r['engines_after']}")
    for bug in r["bugs"][:20]:
        then = ", ".join(bug["faults_then"]) or "none"
        print(f"  BUG {bug['request_id']}: {bug['kind']}: {bug['cause']} (faults then: {then})")
