"""The ``pdgate`` command line as a newcomer meets it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml
from support.procs import start_pdgate

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdgate.cli", *args], capture_output=True, text=True, timeout=30)


def test_help_lists_commands_and_examples():
    out = run("--help")
    assert out.returncode == 0 and "engine" in out.stdout and "examples:" in out.stdout
    sim = run("engine", "sim", "--help")
    assert sim.returncode == 0
    for flag in ("--role", "--api", "--profile", "--time-scale", "--kv-events-endpoint", "--config"):
        assert flag in sim.stdout


def test_invalid_settings_exit_2_and_name_the_problem():
    bad_port = run("engine", "sim", "--port", "99999")
    assert bad_port.returncode == 2 and "port" in bad_port.stderr
    bad_profile = run("engine", "sim", "--profile", "h900-gpt-9")
    assert bad_profile.returncode == 2 and "h100-llama-3-8b" in bad_profile.stderr  # lists what exists
    bad_choice = run("engine", "sim", "--role", "router")
    assert bad_choice.returncode == 2 and "invalid choice" in bad_choice.stderr


def test_yaml_config_with_flag_override_and_clean_sigterm(tmp_path):
    config = (REPO / "configs" / "sim-engine.yaml").read_text()
    path = tmp_path / "engine.yaml"
    path.write_text(config.replace("api: vllm", "api: sglang"))
    proc = start_pdgate("engine", "sim", "--config", str(path), "--port", "0", "--served-model-name", "from-flag")
    try:
        info = json.load(urllib.request.urlopen(f"{proc.url}/get_server_info"))
        assert info["api"] == "sglang" and info["served_model_name"] == "from-flag"
        assert info["profile"] == "h100-llama-3-8b"
    finally:
        code = proc.stop(signal.SIGTERM)
    assert code == 0


def test_port_0_servers_report_the_ports_they_bound(tmp_path):
    """Every address asked for as port 0 (or ``tcp://host:*``) is printed as the port really bound."""
    engine = start_pdgate(
        "engine",
        "sim",
        "--port",
        "0",
        "--role",
        "prefill",
        "--api",
        "sglang",
        "--bootstrap-port",
        "0",
        "--kv-events-endpoint",
        "tcp://127.0.0.1:*",
        "--kv-events-replay-endpoint",
        "tcp://127.0.0.1:*",
    )
    gateway = None
    try:
        assert engine.port != 0 and urllib.request.urlopen(f"{engine.url}/health", timeout=5).status == 200
        boot = engine.bootstrap_port
        assert boot not in (0, engine.port)
        assert urllib.request.urlopen(f"http://127.0.0.1:{boot}/health", timeout=5).status == 200
        publisher, replay = engine.kv_events
        ports = {int(publisher.rsplit(":", 1)[1]), int(replay.rsplit(":", 1)[1])}
        assert 0 not in ports and len(ports) == 2
        for port in ports:  # something listens there (the engine's PUB and replay ROUTER)
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

        config = tmp_path / "gw.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "host": "127.0.0.1",
                    "port": 8000,
                    "models": [{"name": "llama-3-8b"}],
                    "instances": [{"url": engine.url, "kind": "sim", "role": "both", "model": "llama-3-8b"}],
                }
            )
        )
        gateway = start_pdgate("serve", "--config", str(config), "--port", "0")  # the flag overrides 8000
        assert gateway.port not in (0, 8000)
        assert urllib.request.urlopen(f"{gateway.url}/health", timeout=5).status == 200
    finally:
        if gateway is not None:
            gateway.stop()
        engine.stop()
