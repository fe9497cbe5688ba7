"""``pdgate up``: start a config's engines as child processes, then the gateway.

Every instance with a ``launch`` section is started as ``pdgate engine sim`` (kinds ``sim*``) or
``pdgate engine vllm`` (kind ``vllm``) with the settings its fleet entry implies (port from its
URL, role, API flavour, served model name, bootstrap port, KV-events endpoints, block size) plus
the launch section's own. The KV-events endpoints go to the engine as the entry writes them
(:class:`pdgate.gateway.config.KvEventsConfig`): the shipped configs' ``tcp://*:PORT`` makes the
engine bind, so this gateway and any other replica over the same fleet connect to it. Each
child's output goes to a log file (``PDGATE_LOG_DIR``, default a temporary directory), whose tail
is shown if it fails. The launcher waits until each engine
answers ``/health`` (a real vLLM takes a minute on a small CPU host), serves the gateway in this
process, and on SIGINT/SIGTERM stops the gateway and then every child's process group
(SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import aiohttp

from pdgate.common.children import die_with_parent
from pdgate.common.tls import ClientTlsFiles, client_context
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.instance_config import InstanceConfig, SimLaunch, VllmLaunch

SIM_FLAVOURS = {"sim": "vllm", "sim-vllm": "vllm", "sim-sglang": "sglang"}
STOP_GRACE_S = 10.0
HEALTHY_TIMEOUT_S = {"sim": 60.0, "vllm": 600.0}


@dataclass
class Child:
    instance: InstanceConfig
    proc: subprocess.Popen
    log: Path

    @property
    def name(self) -> str:
        return self.instance.spec().id


def sim_command(instance: InstanceConfig) -> list[str]:
    """The ``pdgate engine sim`` command line for one fleet entry."""
    flavour = SIM_FLAVOURS.get(instance.kind)
    if flavour is None:
        raise ValueError(
            f"instance {instance.url}: `pdgate up` only launches simulated engines (kind sim, sim-vllm, sim-sglang)"
        )
    url = aiohttp.client.URL(instance.url)
    args = [
        "--host",
        url.host or "127.0.0.1",
        "--port",
        str(url.port),
        "--role",
        "both" if instance.role == "flex" else instance.role,  # the sim takes either leg whatever its role
        "--api",
        flavour,
        "--served-model-name",
        instance.model,
        "--block-size",
        str(instance.block_size),
    ]
    if instance.bootstrap_port is not None:
        args += ["--bootstrap-port", str(instance.bootstrap_port)]
    if instance.kv_events is not None:
        args += ["--kv-events-endpoint", instance.kv_events.endpoint, "--kv-events-topic", instance.kv_events.topic]
        if instance.kv_events.replay_endpoint:
            args += ["--kv-events-replay-endpoint", instance.kv_events.replay_endpoint]
    launch = instance.launch
    assert isinstance(launch, SimLaunch)
    if launch.profile:
        args += ["--profile", launch.profile]
    if launch.time_scale:
        args += ["--time-scale", str(launch.time_scale)]
    return [sys.executable, "-m", "pdgate.cli", "engine", "sim", *args, *engine_flags(launch.args)]


def engine_flags(settings: dict[str, object]) -> list[str]:
    """``pdgate engine`` flags for snake_case settings: ``--name value``, ``--name``/``--no-name`` for
    booleans; ``None`` is left out (the engine's default)."""
    args: list[str] = []
    for key, value in settings.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            args += [f"--{flag}", str(value)]
    return args


def vllm_command(instance: InstanceConfig) -> list[str]:
    """The ``pdgate engine vllm`` command line for one fleet entry."""
    launch = instance.launch
    assert isinstance(launch, VllmLaunch)
    url = aiohttp.client.URL(instance.url)
    settings: dict[str, object] = {
        "host": url.host or "127.0.0.1",
        "port": url.port,
        "role": instance.role,
        "model": launch.model_path,
        "served_model_name": instance.model,
        "device": launch.device,
        "block_size": instance.block_size,
        "side_channel_port": launch.side_channel_port,
        "cpu_cores": launch.cpu_cores,
        "python": launch.python,
        "max_model_len": launch.max_model_len,
    }
    if instance.kv_events is not None:
        settings.update(
            kv_events_endpoint=instance.kv_events.endpoint,
            kv_events_topic=instance.kv_events.topic,
            kv_events_replay_endpoint=instance.kv_events.replay_endpoint,
        )
    settings.update(launch.args)
    return [sys.executable, "-m", "pdgate.cli", "engine", "vllm", *engine_flags(settings)]


def launch_command(instance: InstanceConfig) -> list[str]:
    return vllm_command(instance) if isinstance(instance.launch, VllmLaunch) else sim_command(instance)


def start_children(config: GatewayConfig) -> list[Child]:
    log_dir = Path(os.environ.get("PDGATE_LOG_DIR") or tempfile.mkdtemp(prefix="pdgate-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    children = []
    for instance in config.instances:
        if instance.launch is None:
            continue
        log = log_dir / f"{instance.spec().id.replace('/', '_').replace(':', '_')}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                launch_command(instance),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our signals reach them only through us
                preexec_fn=die_with_parent(),  # and they stop when we die, however we die
            )
        children.append(Child(instance, proc, log))
    return children


def health_session(upstream_tls: ClientTlsFiles) -> aiohttp.ClientSession:
    """A session for engines' health checks that verifies ``https://`` engines as the gateway does."""
    if not upstream_tls.configured:
        return aiohttp.ClientSession()
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(upstream_tls)))


async def wait_healthy(
    children: list[Child], timeout: float | None = None, upstream_tls: ClientTlsFiles = ClientTlsFiles()
) -> None:
    async with health_session(upstream_tls) as session:
        for child in children:
            limit = timeout or HEALTHY_TIMEOUT_S["vllm" if isinstance(child.instance.launch, VllmLaunch) else "sim"]
            await wait_http_ok(
                session, child.instance.url + "/health", child.proc, child.log, f"engine {child.name}", limit
            )


async def wait_http_ok(
    session: aiohttp.ClientSession,
    url: str,
    proc: subprocess.Popen,
    log: Path,
    name: str,
    timeout: float,
    poll_s: float = 0.1,
) -> None:
    """Poll ``url`` until it answers 200; raise (with the log's tail) if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = log.read_text(errors="replace") if log.exists() else ""  # noqa: ASYNC240 (once, the child died)
            raise RuntimeError(f"{name} exited with code {proc.returncode} (log {log}):\n{err[-2000:]}")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                if resp.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not become healthy within {timeout:.0f}s (log {log})")
        await asyncio.sleep(poll_s)


def stop_children(children: list[Child]) -> None:
    """SIGTERM every child's process group (vLLM has helper processes), SIGKILL what outlives the grace."""
    for child in children:
        _signal_group(child.proc, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait(5)
        _signal_group(child.proc, signal.SIGKILL)  # stragglers of an exited leader


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def default_config_path() -> Path:
    """``configs/default.yaml`` in the working directory (an edited copy wins), else the packaged one."""
    local = Path("configs/default.yaml")
    if local.exists():
        return local
    return packaged_config("default.yaml")


def packaged_config(name: str) -> Path:
    """A config shipped with pdgate (package data of ``pdgate.configs``), by file name."""
    return Path(str(resources.files("pdgate.configs").joinpath(name)))


def describe(config: GatewayConfig, children: list[Child], gateway_url: str) -> str:
    launched = {c.name: c.proc.pid for c in children}
    lines = [f"pdgate gateway ready: {gateway_url}  (OpenAI API at {gateway_url}/v1)"]
    for inst in config.instances:
        spec = inst.spec()
        pid = launched.get(spec.id)
        origin = f"pid {pid}" if pid else "external"
        lines.append(f"  {spec.id:<22} {spec.role:<8} {spec.kind:<10} {spec.model:<16} {inst.url}  ({origin})")
    if children:
        lines.append(f"engine logs: {children[0].log.parent}")
    lines.append("Ctrl-C stops the gateway and every engine it started.")
    return "\n".join(lines)
