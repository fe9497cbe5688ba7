"""``pdgate up``: start a config's simulated fleet as child processes, then the gateway.

Every instance with a ``launch`` section is started as ``pdgate engine sim`` with the settings
its fleet entry implies (port from its URL, role, API flavour from its kind, served model name,
bootstrap port, KV-events endpoint, block size) plus the launch section's own. The launcher
waits until each engine answers ``/health``, serves the gateway in this process, and on
SIGINT/SIGTERM stops the gateway and then every child (SIGTERM, then SIGKILL after a grace
period).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from gateway.config import GatewayConfig, InstanceConfig

SIM_FLAVOURS = {"sim": "vllm", "sim-vllm": "vllm", "sim-sglang": "sglang"}
STOP_GRACE_S = 10.0


@dataclass
class Child:
    instance: InstanceConfig
    proc: subprocess.Popen

    @property
    def name(self) -> str:
        return self.instance.spec().id


def sim_command(instance: InstanceConfig) -> list[str]:
    """The ``pdgate engine sim`` command line for one fleet entry."""
    flavour = SIM_FLAVOURS.get(instance.kind)
    if flavour is None:
        raise ValueError(f"instance {instance.url}: `pdgate up` only launches simulated engines (kind sim, sim-vllm, sim-sglang)")
    url = aiohttp.client.URL(instance.url)
    args = ["--host", url.host or "127.0.0.1", "--port", str(url.port), "--role", instance.role, "--api", flavour,
            "--served-model-name", instance.model, "--block-size", str(instance.block_size)]
    if instance.bootstrap_port is not None:
        args += ["--bootstrap-port", str(instance.bootstrap_port)]
    if instance.kv_events is not None:
        args += ["--kv-events-endpoint", instance.kv_events.endpoint, "--kv-events-topic", instance.kv_events.topic]
        if instance.kv_events.replay_endpoint:
            args += ["--kv-events-replay-endpoint", instance.kv_events.replay_endpoint]
    launch = instance.launch
    assert launch is not None
    if launch.profile:
        args += ["--profile", launch.profile]
    if launch.time_scale:
        args += ["--time-scale", str(launch.time_scale)]
    for key, value in launch.args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return [sys.executable, "-m", "gateway.cli", "engine", "sim", *args]


def start_children(config: GatewayConfig) -> list[Child]:
    children = []
    for instance in config.instances:
        if instance.launch is None:
            continue
        proc = subprocess.Popen(sim_command(instance), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # our signals reach them only through us
        children.append(Child(instance, proc))
    return children


async def wait_healthy(children: list[Child], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        for child in children:
            url = child.instance.url + "/health"
            while True:
                if child.proc.poll() is not None:
                    err = child.proc.stderr.read() if child.proc.stderr else ""
                    raise RuntimeError(f"engine {child.name} exited with code {child.proc.returncode}:\n{err[-2000:]}")
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                        if resp.status == 200:
                            break
                except (aiohttp.ClientError, TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"engine {child.name} did not become healthy within {timeout:.0f}s")
                await asyncio.sleep(0.1)


def stop_children(children: list[Child]) -> None:
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait(5)
        if child.proc.stderr is not None:
            child.proc.stderr.close()


def default_config_path() -> Path:
    """``configs/default.yaml`` in the working directory, else the one in this source tree."""
    local = Path("configs/default.yaml")
    if local.exists():
        return local
    return Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def describe(config: GatewayConfig, children: list[Child], gateway_url: str) -> str:
    launched = {c.name: c.proc.pid for c in children}
    lines = [f"pdgate gateway ready: {gateway_url}  (OpenAI API at {gateway_url}/v1)"]
    for inst in config.instances:
        spec = inst.spec()
        pid = launched.get(spec.id)
        origin = f"pid {pid}" if pid else "external"
        lines.append(f"  {spec.id:<22} {spec.role:<8} {spec.kind:<10} {spec.model:<16} {inst.url}  ({origin})")
    lines.append("Ctrl-C stops the gateway and every engine it started.")
    return "\n".join(lines)

