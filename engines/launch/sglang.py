"""``pdgate engine sglang``: start a real SGLang server in a prefill, decode or colocated role.

The command is ``<python> -m sglang.launch_server ...`` with SGLang's own flags:

* ``prefill``: ``--disaggregation-mode prefill``, the bootstrap server port decode engines pull KV
  through (``--disaggregation-bootstrap-port``), the KV transfer backend
  (``--disaggregation-transfer-backend mooncake|nixl``) and, optionally, the RDMA devices
  (``--disaggregation-ib-device``).
* ``decode``: ``--disaggregation-mode decode`` and the same transfer settings; no bootstrap port
  (the router tells decode where each request's prefill bootstrap server is).
* ``both``: a colocated engine, no ``--disaggregation-*`` flag at all.
* every role: host, port, served model name, TP / DP sizes, the memory fraction, context length,
  page size, Prometheus metrics (``--enable-metrics``; ``sglang:num_running_reqs``,
  ``sglang:num_queue_reqs``, ``sglang:token_usage`` ...), and the KV-events publisher
  (``--kv-events-config '{"publisher": "zmq", "endpoint": ..., "topic": ...}'``; SGLang follows
  vLLM's rule: its PUB socket binds ``tcp://*:PORT``, where every gateway replica connects, and
  connects to a ``tcp://HOST:PORT`` that one gateway binds; the replay socket is always bound; with
  DP > 1 SGLang adds the attention-DP rank to both endpoints' ports).

The flag names were checked against SGLang's ``server_args.py`` (see
``tests/data/sglang_server_args.txt``). SGLang needs a GPU host, so without an importable
``sglang`` in ``--python`` the command refuses to start; ``--print`` shows the command anyway.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from pdgate.engines.launch.command import add_launch_command, run_launcher

PD_ROLES = ("prefill", "decode")
KV_EVENT_SCHEMES = ("tcp://", "ipc://", "inproc://")


class SglangLaunchConfig(BaseModel):
    """One SGLang engine; every field is a ``pdgate engine sglang`` flag."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["prefill", "decode", "both"] = Field(
        "both", description="PD role (both: colocated, not disaggregated)"
    )
    model_path: str = Field(description="model weights: a local directory or a Hugging Face repo id")
    host: str = Field("127.0.0.1", description="HTTP listen address")
    port: int = Field(30000, ge=1, le=65535, description="HTTP port")
    served_model_name: str | None = Field(None, description="model name clients use (SGLang's default: the model path)")
    bootstrap_port: int = Field(
        8998, ge=1, le=65535, description="prefill's KV bootstrap server port (prefill role only)"
    )
    transfer_backend: Literal["mooncake", "nixl"] = Field("mooncake", description="KV transfer backend (PD roles)")
    ib_device: str | None = Field(None, description="RDMA devices for KV transfer, e.g. mlx5_0,mlx5_1 (PD roles)")
    tp_size: int = Field(1, ge=1, description="tensor-parallel size")
    dp_size: int = Field(1, ge=1, description="data-parallel size")
    mem_fraction_static: float | None = Field(
        None, gt=0, le=1, description="GPU memory fraction for weights and KV cache"
    )
    context_length: int | None = Field(None, ge=1, description="maximum context length (default: the model's)")
    page_size: int | None = Field(None, ge=1, description="KV page size in tokens")
    kv_events_endpoint: str | None = Field(
        None,
        description="publish KV events on this ZMQ endpoint: tcp://*:PORT binds (every gateway connects), "
        "tcp://HOST:PORT connects to the one gateway bound there",
    )
    kv_events_replay_endpoint: str | None = Field(
        None, description="ZMQ endpoint the engine binds to serve event replay on, e.g. tcp://*:PORT"
    )
    kv_events_topic: str = Field("kv", description="KV events topic")
    enable_metrics: bool = Field(True, description="serve Prometheus metrics on /metrics")
    schedule_policy: str | None = Field(None, description="SGLang scheduling policy, e.g. fcfs, lpm, priority")
    enable_priority_scheduling: bool = Field(False, description="schedule by the request's priority field")
    trust_remote_code: bool = Field(False, description="allow custom model code from the model repository")
    log_level: str | None = Field(None, description="SGLang log level, e.g. info, warning")
    python: str = Field(sys.executable, description="interpreter of the environment SGLang is installed in")
    extra_args: list[str] = Field(default_factory=list, description="more SGLang flags, shell-quoted, appended as is")

    @field_validator("extra_args", mode="before")
    @classmethod
    def _split_extra_args(cls, value: Any) -> Any:
        """Accept the command line's single shell-quoted string as well as a list."""
        return shlex.split(value) if isinstance(value, str) else value

    @field_validator("kv_events_endpoint", "kv_events_replay_endpoint")
    @classmethod
    def _zmq_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(KV_EVENT_SCHEMES):
            raise ValueError(f"not a ZMQ endpoint: {value!r} (expected e.g. tcp://*:5557)")
        return value

    @model_validator(mode="after")
    def _ports_differ(self) -> SglangLaunchConfig:
        if self.role == "prefill" and self.bootstrap_port == self.port:
            raise ValueError(f"the bootstrap port must differ from the HTTP port ({self.port})")
        return self


def kv_events_config(config: SglangLaunchConfig) -> dict[str, Any] | None:
    """The JSON object for SGLang's ``--kv-events-config`` (its ``KVEventsConfig`` keys), or None."""
    if not config.kv_events_endpoint:
        return None
    events: dict[str, Any] = {
        "publisher": "zmq",
        "endpoint": config.kv_events_endpoint,
        "topic": config.kv_events_topic,
    }
    if config.kv_events_replay_endpoint:
        events["replay_endpoint"] = config.kv_events_replay_endpoint
    return events


def sglang_command(config: SglangLaunchConfig) -> list[str]:
    """The argv that starts ``config``'s SGLang server."""
    args = [
        config.python,
        "-m",
        "sglang.launch_server",
        "--model-path",
        config.model_path,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--tp-size",
        str(config.tp_size),
        "--dp-size",
        str(config.dp_size),
    ]
    optional: list[tuple[str, object | None]] = [
        ("--served-model-name", config.served_model_name),
        ("--mem-fraction-static", config.mem_fraction_static),
        ("--context-length", config.context_length),
        ("--page-size", config.page_size),
        ("--schedule-policy", config.schedule_policy),
        ("--log-level", config.log_level),
    ]
    for flag, value in optional:
        if value is not None:
            args += [flag, str(value)]
    for flag, enabled in (
        ("--enable-metrics", config.enable_metrics),
        ("--enable-priority-scheduling", config.enable_priority_scheduling),
        ("--trust-remote-code", config.trust_remote_code),
    ):
        if enabled:
            args.append(flag)
    events = kv_events_config(config)
    if events is not None:
        args += ["--kv-events-config", json.dumps(events)]
    if config.role in PD_ROLES:
        args += ["--disaggregation-mode", config.role, "--disaggregation-transfer-backend", config.transfer_backend]
        if config.role == "prefill":
            args += ["--disaggregation-bootstrap-port", str(config.bootstrap_port)]
        if config.ib_device:
            args += ["--disaggregation-ib-device", config.ib_device]
    return args + config.extra_args


def sglang_missing(python: str) -> str | None:
    """Why ``python`` cannot start SGLang (no importable ``sglang``), or None if it can."""
    if python == sys.executable:
        if importlib.util.find_spec("sglang") is None:
            return f"sglang is not installed in {python}; install it on a GPU host or use --print"
        return None
    try:
        check = subprocess.run(
            [python, "-c", "import sglang"], check=False, capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run {python}: {exc}"
    if check.returncode != 0:
        return f"sglang is not installed in {python}; install it on a GPU host or use --print"
    return None


SGLANG_DESCRIPTION = """\
Start a real SGLang server in a prefill, decode or colocated role (Mooncake or NIXL KV transfer
for PD, KV events for the gateway's exact prefix index, Prometheus metrics). SGLang must be
installed in --python (default: this interpreter) on a GPU host; --print shows the command instead.
"""


def add_sglang_command(kinds: argparse._SubParsersAction) -> None:
    """Register ``sglang`` under ``pdgate engine``: one flag per config field, plus ``--print``."""
    add_launch_command(
        kinds,
        "sglang",
        help_text="a real SGLang engine (prefill, decode or colocated)",
        description=SGLANG_DESCRIPTION,
        config=SglangLaunchConfig,
        run=run_sglang,
    )


def run_sglang(args: argparse.Namespace) -> int:
    """Build the command; print it (``--print``), or replace this process with SGLang."""
    return run_launcher(
        args,
        "sglang",
        SglangLaunchConfig,
        lambda config: (sglang_command(config), {}),
        lambda config: sglang_missing(config.python),
    )
