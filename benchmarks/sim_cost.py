#!/usr/bin/env python3
"""CPU cost of the simulated engine, and how many instances a small host can run without
distorting simulated time.

    python benchmarks/sim_cost.py [--profile h100-llama-3-8b] [--batches 1,16,64,256]
        [--engines 1,2,4,8] [--concurrency 32] [--prompt-len 256] [--output-len 256]
        [--warmup 3] [--duration 12] [--repeat 3] [--skip-core] [--skip-http]

(a) In process: CPU time (``time.process_time``) of :class:`engines.sim.core.EngineCore` alone
    (``schedule`` + ``step_time`` + ``update``) per simulated step and per generated token, for
    steps decoding ``--batches`` concurrent requests (1024-token prompts), for prefill-heavy steps
    (8 new 1024-token prompts filling the 8192-token budget) and for ``add_request`` (prompt
    hashing); each figure is the best of ``--repeat`` runs. "CPU/model" is the CPU time over
    the step's modelled duration: the share of one core the core logic needs to keep up at time
    scale 1.

(b) Whole processes over HTTP: for each K in ``--engines`` start K real ``pdgate engine sim``
    processes (time scale 1), drive each with ``--concurrency`` closed-loop streaming
    completions (``--output-len`` tokens, ``ignore_eos``; streams start spread over the first
    half of the warm-up and their first request is shortened, so arrivals and finishes are
    staggered) from this one aiohttp client process, and after ``--warmup`` seconds measure
    over ``--duration`` wall seconds, per engine: its CPU time (utime + stime from
    ``/proc/PID/stat``) per step and per generated token, its CPU utilisation, and the time
    distortion from ``/sim/state``: ``lag`` (simulated time lost because the engine fell behind
    by more than its catch-up window) as a share of simulated time, the maximum lag and the
    maximum delivery jitter since start (how late a step's tokens went out after its modelled
    end), the share of late steps (tokens out > 1 ms late), and "slowdown" = elapsed simulated
    time / modelled busy time - 1 (the engine is never idle under this load, so this is how
    much slower than modelled it really ran). The client's own CPU share is printed with each
    K. Ends with the largest K at which every engine's lag stays under 1% of simulated time
    with a maximum lag under 5 ms. Engine processes are stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pdgate.engines.sim.build import build_state
from pdgate.engines.sim.config import SimEngineConfig
from pdgate.engines.sim.core import EngineCore
from pdgate.engines.sim.request import SamplingParams, SimRequest

LAG_SHARE_LIMIT = 0.01  # lag below 1% of simulated time ...
LAG_MAX_LIMIT = 0.005  # ... and never more than 5 ms lost at once: "negligible"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


# ------------------------------------------------------- (a) EngineCore alone
def _core(profile: str) -> tuple[EngineCore, int]:
    """A fresh core configured as ``pdgate engine sim --profile PROFILE``, and its vocabulary size."""
    state = build_state(SimEngineConfig(profile=profile))
    return state.core, state.tokenizer.vocab_size


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, length).tolist() for _ in range(n)]


def _run_steps(core: EngineCore, now: float, min_cpu: float, max_steps: int) -> tuple[int, int, float, float, float]:
    """Step until ``min_cpu`` CPU seconds or ``max_steps``; returns (steps, tokens, cpu, modelled, now)."""
    steps = tokens = 0
    modelled = 0.0
    cpu0 = time.process_time()
    while steps < max_steps and core.has_unfinished():
        step = core.schedule(now)
        dt = core.step_time(step)
        now += dt
        modelled += dt
        tokens += len(core.update(step, now))
        steps += 1
        if steps % 64 == 0 and time.process_time() - cpu0 >= min_cpu:
            break
    return steps, tokens, time.process_time() - cpu0, modelled, now


PROMPT_LEN = 1024


@dataclass
class CoreCost:
    steps: int
    cpu: float  # CPU seconds over the measured steps
    tokens: int  # decoded (or, for prefill steps, prefilled) tokens
    modelled: float  # modelled seconds of those steps

    def cells(self) -> list[str]:
        return [
            str(self.steps),
            f"{1e6 * self.cpu / self.steps:.1f}",
            f"{1e6 * self.cpu / self.tokens:.3f}",
            f"{1e3 * self.modelled / self.steps:.2f}",
            f"{100 * self.cpu / self.modelled:.2f}",
        ]


def decode_cost(profile: str, batch: int, min_cpu: float) -> CoreCost:
    """Steps in which ``batch`` requests each decode one token (their prefill is not measured)."""
    core, vocab = _core(profile)
    max_tokens = core.config.max_model_len - PROMPT_LEN - 1
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    for i, prompt in enumerate(_prompts(batch, PROMPT_LEN, vocab, batch)):
        core.add_request(SimRequest(f"r{i}", prompt, sampling, arrival_time=0.0))
    now = 0.0
    while any(r.num_output_tokens == 0 for r in core.running) or core.num_waiting:
        step = core.schedule(now)
        now += core.step_time(step)
        core.update(step, now)
    steps, tokens, cpu, modelled, _ = _run_steps(core, now, min_cpu, max_tokens - 2)
    return CoreCost(steps, cpu, tokens, modelled)


def prefill_cost(profile: str) -> tuple[CoreCost, float]:
    """Steps that each prefill 8 new prompts (the whole 8192-token budget); and add_request CPU per prompt."""
    core, vocab = _core(profile)
    n = 8 * 48
    prompts = _prompts(n, PROMPT_LEN, vocab, 7)
    sampling = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    cpu0 = time.process_time()
    for i, prompt in enumerate(prompts):
        core.add_request(SimRequest(f"p{i}", prompt, sampling, arrival_time=0.0))
    add_cpu = (time.process_time() - cpu0) / n
    steps, _, cpu, modelled, _ = _run_steps(core, 0.0, float("inf"), 10 * n)
    return CoreCost(steps, cpu, n * PROMPT_LEN, modelled), add_cpu


def core_costs(profile: str, batches: list[int], min_cpu: float, repeat: int) -> None:
    """Each figure is the best (least CPU) of ``repeat`` runs: the host's noise only ever adds time."""
    rows = []
    for batch in batches:
        best = min((decode_cost(profile, batch, min_cpu) for _ in range(repeat)), key=lambda c: c.cpu / c.steps)
        rows.append([f"decode x{batch}", *best.cells()])
    runs = [prefill_cost(profile) for _ in range(repeat)]
    best_prefill = min((c for c, _ in runs), key=lambda c: c.cpu / c.steps)
    add_cpu = min(a for _, a in runs)
    rows.append(["prefill 8192 tok (per prompt token)", *best_prefill.cells()])
    print(f"### (a) EngineCore alone ({profile}, {PROMPT_LEN}-token prompts), CPU time per step, best of {repeat}\n")
    print_table(["step kind", "steps", "CPU µs/step", "CPU µs/token", "modelled ms/step", "CPU/model %"], rows)
    print(
        f"\nadd_request (prompt hashing, not in the steps above): {1e6 * add_cpu:.0f} µs per {PROMPT_LEN}-token "
        f"prompt ({1e6 * add_cpu / PROMPT_LEN:.3f} µs per prompt token)"
    )


# ------------------------------------------------ (b) whole processes over HTTP
def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


@dataclass
class Snapshot:
    wall: float
    cpu: float
    tokens: int
    state: dict[str, Any]


@dataclass
class EngineLoad:
    url: str
    pid: int
    tokens: int = 0  # streamed tokens received so far


async def _stream(session: aiohttp.ClientSession, load: EngineLoad, prompt: list[int], max_tokens: int) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    async with session.post(f"{load.url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: {"):  # one SSE chunk per generated token
                load.tokens += 1


async def _worker(
    session: aiohttp.ClientSession, load: EngineLoad, index: int, args: argparse.Namespace, vocab: int
) -> None:
    rng = np.random.default_rng([index, load.pid])
    await asyncio.sleep(index * args.warmup / (2 * args.concurrency))  # no burst of simultaneous prefills
    max_tokens = max(1, (index + 1) * args.output_len // args.concurrency)  # stagger the finishes
    while True:
        await _stream(session, load, rng.integers(0, vocab, args.prompt_len).tolist(), max_tokens)
        max_tokens = args.output_len


async def _snapshot(session: aiohttp.ClientSession, load: EngineLoad) -> Snapshot:
    async with session.get(f"{load.url}/sim/state") as resp:
        state = await resp.json()
    return Snapshot(time.monotonic(), proc_cpu_seconds(load.pid), load.tokens, state)


async def drive(
    loads: list[EngineLoad], args: argparse.Namespace, vocab: int
) -> tuple[list[tuple[Snapshot, Snapshot]], float]:
    """Run the load; returns per-engine (start, end) snapshots of the window and the client's CPU share."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = [
            asyncio.create_task(_worker(session, load, i, args, vocab))
            for load in loads
            for i in range(args.concurrency)
        ]
        try:
            await asyncio.sleep(args.warmup)
            first = await asyncio.gather(*(_snapshot(session, load) for load in loads))
            cpu0, wall0 = time.process_time(), time.monotonic()
            await asyncio.sleep(args.duration)
            client_share = (time.process_time() - cpu0) / (time.monotonic() - wall0)
            last = await asyncio.gather(*(_snapshot(session, load) for load in loads))
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return list(zip(first, last, strict=True)), client_share


@dataclass
class EngineResult:
    util: float  # CPU seconds per wall second
    cpu_per_step: float
    cpu_per_token: float
    steps_per_s: float
    tokens_per_s: float
    model_step: float  # modelled seconds per step
    lag_share: float  # lag / simulated time
    lag_max: float  # since the engine started
    jitter_max: float  # latest token delivery after its step's modelled end, since start
    late_share: float
    slowdown: float  # elapsed simulated time / modelled busy time - 1

    @classmethod
    def of(cls, a: Snapshot, b: Snapshot) -> EngineResult:
        wall, cpu, tokens = b.wall - a.wall, b.cpu - a.cpu, b.tokens - a.tokens
        sa, sb = a.state, b.state
        steps = max(1, sb["steps"] - sa["steps"])
        sim = sb["sim_time"] - sa["sim_time"]
        busy = sb["busy_seconds"] - sa["busy_seconds"]
        return cls(
            util=cpu / wall,
            cpu_per_step=cpu / steps,
            cpu_per_token=cpu / max(1, tokens),
            steps_per_s=steps / wall,
            tokens_per_s=tokens / wall,
            model_step=busy / steps,
            lag_share=(sb["lag_total_seconds"] - sa["lag_total_seconds"]) / sim,
            lag_max=sb["lag_max_seconds"],
            jitter_max=sb.get("delivery_jitter_max_seconds", float("nan")),
            late_share=(sb["late_steps"] - sa["late_steps"]) / steps,
            slowdown=sim / busy - 1 if busy else float("nan"),
        )

    @property
    def negligible(self) -> bool:
        return self.lag_share < LAG_SHARE_LIMIT and self.lag_max < LAG_MAX_LIMIT


def http_costs(args: argparse.Namespace) -> None:
    from tests.support.procs import PdgateProcess, start_sim

    vocab = build_state(SimEngineConfig(profile=args.profile)).tokenizer.vocab_size
    print(
        f"\n### (b) K engine processes ({args.profile}, time scale 1) on {os.cpu_count()} cores, "
        f"{args.concurrency} streams each ({args.prompt_len}-token prompts, {args.output_len}-token outputs), "
        f"{args.duration:g} s window after {args.warmup:g} s warm-up\n"
    )
    header = [
        "K",
        "engine",
        "CPU %",
        "CPU µs/step",
        "CPU µs/token",
        "steps/s",
        "tok/s",
        "model ms/step",
        "lag %",
        "lag max ms",
        "jitter max ms",
        "late %",
        "slowdown %",
    ]
    rows: list[list[str]] = []
    verdicts: dict[int, bool] = {}
    per_k: dict[int, list[EngineResult]] = {}
    notes: list[str] = []
    for k in args.engines:
        engines: list[PdgateProcess] = []
        try:
            for _ in range(k):
                engines.append(start_sim("--profile", args.profile, time_scale=1.0))
            loads = [EngineLoad(e.url, e.proc.pid) for e in engines]
            windows, client_share = asyncio.run(drive(loads, args, vocab))
        finally:
            for e in engines:
                e.stop()
        results = per_k[k] = [EngineResult.of(a, b) for a, b in windows]
        for i, r in enumerate(results):
            rows.append(
                [
                    str(k),
                    str(i),
                    f"{100 * r.util:.1f}",
                    f"{1e6 * r.cpu_per_step:.0f}",
                    f"{1e6 * r.cpu_per_token:.1f}",
                    f"{r.steps_per_s:.0f}",
                    f"{r.tokens_per_s:.0f}",
                    f"{1e3 * r.model_step:.2f}",
                    f"{100 * r.lag_share:.2f}",
                    f"{1e3 * r.lag_max:.2f}",
                    f"{1e3 * r.jitter_max:.2f}",
                    f"{100 * r.late_share:.1f}",
                    f"{100 * r.slowdown:.1f}",
                ]
            )
        verdicts[k] = all(r.negligible for r in results)
        total = sum(r.util for r in results) + client_share
        notes.append(
            f"K={k}: client {100 * client_share:.0f}% of one core; engines + client {100 * total:.0f}% "
            f"of {os.cpu_count()} cores x 100%; lag negligible: {'yes' if verdicts[k] else 'no'}"
        )
    print_table(header, rows)
    print()
    for note in notes:
        print(note)
    print_conclusion(args, per_k, verdicts)


def _largest_prefix(ks: list[int], ok: dict[int, bool]) -> int | None:
    """The largest K such that it and every smaller K passed."""
    best = None
    for k in sorted(ks):
        if not ok[k]:
            break
        best = k
    return best


def print_conclusion(args: argparse.Namespace, per_k: dict[int, list[EngineResult]], verdicts: dict[int, bool]) -> None:
    cores = os.cpu_count()
    best = _largest_prefix(args.engines, verdicts)
    tok_s = np.mean([r.tokens_per_s for r in per_k[best if best is not None else min(args.engines)]])
    load = (
        f"{args.concurrency} concurrent streams of {args.output_len}-token outputs per instance "
        f"(~{tok_s:.0f} output tok/s each)"
    )
    crit = f"lag < {100 * LAG_SHARE_LIMIT:g}% of simulated time and max lag < {1e3 * LAG_MAX_LIMIT:g} ms"
    if best is not None:
        print(
            f"\nconclusion: {best} sim instance(s) fit on this {cores}-core host without distorting time ({crit}), at {load}"
        )
    else:
        print(f"\nconclusion: not even {min(args.engines)} instance(s) keep {crit} at {load}")


# ---------------------------------------------------------------------- main
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="h100-llama-3-8b")
    ap.add_argument("--batches", type=_ints, default=[1, 16, 64, 256], help="decode batch sizes for (a)")
    ap.add_argument("--min-cpu", type=float, default=0.5, help="CPU seconds measured per decode batch in (a)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each (a) measurement; the best is printed")
    ap.add_argument("--engines", type=_ints, default=[1, 2, 4, 8], help="numbers of engine processes for (b)")
    ap.add_argument("--concurrency", type=int, default=32, help="streams per engine in (b)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--warmup", type=float, default=3.0, help="wall seconds of load before the window")
    ap.add_argument("--duration", type=float, default=12.0, help="wall seconds measured per K")
    ap.add_argument("--skip-core", action="store_true", help="skip (a)")
    ap.add_argument("--skip-http", action="store_true", help="skip (b)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM also stops the engines
    if not args.skip_core:
        core_costs(args.profile, args.batches, args.min_cpu, args.repeat)
    if not args.skip_http:
        http_costs(args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
