"""Build gateway configs over simulated engines started by the tests."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from support.procs import PdgateProcess, free_port, start_pdgate, start_sim

MODEL = "sim-model"
ENGINE_BOUND_KV = "tcp://*:*"  # the engine binds a free port for its KV events (and replay) and prints them


def engine_flags(
    role: str,
    api: str = "vllm",
    *,
    kv_events: bool = False,
    kv_port: int | None = None,
    boot_port: int | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """``pdgate engine sim`` flags for one fleet member.

    ``kv_events``: publish KV events (and serve replays) on ports the engine binds itself on every
    interface, as the shipped configs' ``tcp://*:PORT`` does: the engine binds, every gateway
    connects; :func:`instance_entry` reads the ports back. ``kv_port``: publish to
    ``tcp://127.0.0.1:PORT`` instead, which one *gateway* binds (the single-gateway form; a port
    chosen beforehand, :func:`support.ports.reserve_port`). An SGLang prefill engine binds its
    bootstrap server on ``boot_port``, or on a free port of its own (reported) when none is given.
    """
    flags = ["--role", role, "--api", api, "--served-model-name", MODEL, "--max-model-len", "4096"]
    if kv_port is not None:
        flags += ["--kv-events-endpoint", f"tcp://127.0.0.1:{kv_port}"]
    elif kv_events:
        flags += ["--kv-events-endpoint", ENGINE_BOUND_KV, "--kv-events-replay-endpoint", ENGINE_BOUND_KV]
    if boot_port is not None:
        flags += ["--bootstrap-port", str(boot_port)]
    elif api == "sglang" and role == "prefill":
        flags += ["--bootstrap-port", "0"]  # not the fixed default 8998: tests run side by side
    return [*flags, *extra]


@contextlib.contextmanager
def pd_engine_pair(time_scale: float = 20.0) -> Iterator[tuple[PdgateProcess, PdgateProcess]]:
    """One prefill and one decode sim engine (vLLM flavour: sequential KV hand-off), both stopped
    at the end, and the first also when the second does not start."""
    prefill = start_sim(*engine_flags("prefill"), time_scale=time_scale)
    try:
        decode = start_sim(*engine_flags("decode"), time_scale=time_scale)
        try:
            yield prefill, decode
        finally:
            decode.stop()
    finally:
        prefill.stop()


def instance_entry(
    proc: PdgateProcess, role: str, kind: str, *, kv_port: int | None = None, boot_port: int | None = None, **extra: Any
) -> dict[str, Any]:
    """The gateway config entry of a simulated engine, with the ports it reported it bound."""
    entry: dict[str, Any] = {
        "id": f"{role}-{proc.port}",
        "url": proc.url,
        "kind": kind,
        "role": role,
        "model": MODEL,
        **extra,
    }
    if kv_port is not None:
        entry["kv_events"] = {"endpoint": f"tcp://127.0.0.1:{kv_port}"}
    elif ENGINE_BOUND_KV in proc.args:
        # what the engine bound (tcp://0.0.0.0:PORT), written as its config would: tcp://*:PORT,
        # which each gateway reaches at the host of the engine's url
        publisher, replay = proc.kv_events
        entry["kv_events"] = {"endpoint": f"tcp://*:{publisher.rsplit(':', 1)[1]}"}
        if replay is not None:
            entry["kv_events"]["replay_endpoint"] = f"tcp://*:{replay.rsplit(':', 1)[1]}"
    if boot_port is not None:
        entry["bootstrap_port"] = boot_port
    elif kind == "sim-sglang" and role == "prefill":
        entry["bootstrap_port"] = proc.bootstrap_port
    return entry


def write_config(path: Path, instances: list[dict[str, Any]], **gateway: Any) -> Path:
    config = {
        "host": "127.0.0.1",
        "port": 0,
        "models": [{"name": MODEL, "max_model_len": 4096}],
        "instances": instances,
        "scrape_interval_s": 0.2,
        "health": {"interval_s": 0.2, "timeout_s": 1.0, "failure_threshold": 1, "cooldown_s": 30},
        **gateway,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_gateway(config: Path, *, env: dict[str, str] | None = None, cwd: str | None = None) -> PdgateProcess:
    return start_pdgate("serve", "--config", str(config), env=env, cwd=cwd)


def call(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    """POST ``body`` as JSON (GET without one): the status and the parsed JSON answer (its text
    when it is not JSON), error statuses included."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def get_json(url: str) -> Any:
    return json.load(urllib.request.urlopen(url, timeout=10))


def metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


__all__ = [
    "MODEL",
    "engine_flags",
    "free_port",
    "get_json",
    "instance_entry",
    "metric",
    "start_gateway",
    "write_config",
]
