"""``pdgate engine sglang``: the SGLang command for each role, checked against SGLang's real flags."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pdgate.engines.launch.sglang import (
    SglangLaunchConfig,
    add_sglang_command,
    run_sglang,
    sglang_command,
)

REPO = Path(__file__).resolve().parents[1]
SGLANG_FLAGS_FILE = REPO / "tests" / "data" / "sglang_server_args.txt"
# The fields of SGLang's KVEventsConfig (python/sglang/srt/disaggregation/kv_events.py), which
# parses --kv-events-config with pydantic's model_validate_json.
SGLANG_KV_EVENTS_KEYS = {
    "publisher",
    "endpoint",
    "bind",
    "replay_endpoint",
    "buffer_steps",
    "hwm",
    "max_queue_size",
    "topic",
    "format",
}

# A tiny `pdgate engine` parser with only the sglang subcommand, as engines/cli.py will wire it.
CLI = """\
import argparse, sys
from pdgate.engines.launch.sglang import add_sglang_command
parser = argparse.ArgumentParser(prog="pdgate engine")
add_sglang_command(parser.add_subparsers(dest="engine_kind", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.run(args))
"""

EVERYTHING = {
    "model_path": "/models/llama",
    "host": "0.0.0.0",
    "port": 30001,
    "served_model_name": "llama",
    "bootstrap_port": 9001,
    "transfer_backend": "nixl",
    "ib_device": "mlx5_0,mlx5_1",
    "tp_size": 2,
    "dp_size": 2,
    "mem_fraction_static": 0.8,
    "context_length": 8192,
    "page_size": 32,
    "kv_events_endpoint": "tcp://*:5557",
    "kv_events_replay_endpoint": "tcp://*:5558",
    "kv_events_topic": "kv",
    "enable_metrics": True,
    "schedule_policy": "fcfs",
    "enable_priority_scheduling": True,
    "trust_remote_code": True,
    "log_level": "info",
}


def sglang_flags() -> set[str]:
    lines = SGLANG_FLAGS_FILE.read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def options(argv: list[str]) -> dict[str, str | None]:
    """``--flag value`` pairs (None for a switch) of an SGLang argv, after ``-m sglang.launch_server``."""
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    out: dict[str, str | None] = {}
    rest = argv[3:]
    i = 0
    while i < len(rest):
        flag = rest[i]
        assert flag.startswith("--") and flag not in out, (flag, argv)
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out[flag], i = rest[i + 1], i + 2
        else:
            out[flag], i = None, i + 1
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], check=False, capture_output=True, text=True, timeout=60, cwd=REPO
    )


def fake_python(tmp_path: Path, has_sglang: bool) -> Path:
    """An interpreter stand-in: ``-c 'import sglang'`` succeeds or not; anything else echoes argv."""
    path = tmp_path / "python"
    path.write_text(
        f'#!/bin/sh\nif [ "$1" = "-c" ]; then exit {0 if has_sglang else 1}; fi\necho "fake sglang started: $*"\n'
    )
    path.chmod(0o755)
    return path


def test_prefill_command_is_a_pd_prefill_with_a_bootstrap_server():
    argv = sglang_command(SglangLaunchConfig(role="prefill", model_path="/m", port=30100, bootstrap_port=9000))
    assert argv[0] == sys.executable
    opts = options(argv)
    assert opts["--model-path"] == "/m" and opts["--host"] == "127.0.0.1" and opts["--port"] == "30100"
    assert opts["--disaggregation-mode"] == "prefill"
    assert opts["--disaggregation-bootstrap-port"] == "9000"
    assert opts["--disaggregation-transfer-backend"] == "mooncake"
    assert opts["--tp-size"] == "1" and opts["--dp-size"] == "1"
    assert "--enable-metrics" in opts and opts["--enable-metrics"] is None
    assert "--disaggregation-ib-device" not in opts and "--kv-events-config" not in opts


def test_decode_command_has_no_bootstrap_port():
    config = SglangLaunchConfig(
        role="decode", model_path="/m", bootstrap_port=9000, transfer_backend="nixl", ib_device="mlx5_0"
    )
    opts = options(sglang_command(config))
    assert opts["--disaggregation-mode"] == "decode"
    assert opts["--disaggregation-transfer-backend"] == "nixl"
    assert opts["--disaggregation-ib-device"] == "mlx5_0"
    assert "--disaggregation-bootstrap-port" not in opts


def test_colocated_command_has_no_disaggregation_flags():
    config = SglangLaunchConfig(**{**EVERYTHING, "role": "both"})
    opts = options(sglang_command(config))
    assert not [flag for flag in opts if flag.startswith("--disaggregation")]
    assert opts["--served-model-name"] == "llama" and opts["--tp-size"] == "2" and opts["--dp-size"] == "2"
    assert opts["--mem-fraction-static"] == "0.8" and opts["--context-length"] == "8192"
    assert opts["--page-size"] == "32" and opts["--schedule-policy"] == "fcfs" and opts["--log-level"] == "info"
    for switch in ("--enable-metrics", "--enable-priority-scheduling", "--trust-remote-code"):
        assert switch in opts and opts[switch] is None


def test_optional_settings_are_left_to_sglang_when_unset():
    opts = options(sglang_command(SglangLaunchConfig(model_path="/m", enable_metrics=False)))
    assert set(opts) == {"--model-path", "--host", "--port", "--tp-size", "--dp-size"}


def test_kv_events_config_is_sglang_json():
    full = json.loads(options(sglang_command(SglangLaunchConfig(**EVERYTHING)))["--kv-events-config"])
    # SGLang binds a '*' endpoint (every gateway connects); the replay socket is always bound
    assert full == {"publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "kv", "replay_endpoint": "tcp://*:5558"}
    assert set(full) <= SGLANG_KV_EVENTS_KEYS
    # a concrete host (SGLang connects to the one gateway bound there) is passed on as it is
    config = SglangLaunchConfig(model_path="/m", kv_events_endpoint="tcp://10.0.0.2:5557")
    events = json.loads(options(sglang_command(config))["--kv-events-config"])
    assert events == {"publisher": "zmq", "endpoint": "tcp://10.0.0.2:5557", "topic": "kv"}


def test_extra_args_are_appended_and_a_string_is_shell_split():
    config = SglangLaunchConfig(model_path="/m", extra_args="--chunked-prefill-size 4096 --api-key 'a b'")
    assert sglang_command(config)[-4:] == ["--chunked-prefill-size", "4096", "--api-key", "a b"]
    assert sglang_command(SglangLaunchConfig(model_path="/m", extra_args=["--x"]))[-1] == "--x"


@pytest.mark.parametrize(
    "bad",
    [
        {"tp_size": 0},
        {"dp_size": 0},
        {"port": 70000},
        {"bootstrap_port": 0},
        {"transfer_backend": "ascend"},
        {"mem_fraction_static": 1.5},
        {"mem_fraction_static": 0},
        {"page_size": 0},
        {"role": "router"},
        {"kv_events_endpoint": "127.0.0.1:5557"},
        {"role": "prefill", "port": 9000, "bootstrap_port": 9000},
        {"no_such_setting": 1},
    ],
)
def test_invalid_settings_are_rejected(bad):
    with pytest.raises(ValidationError):
        SglangLaunchConfig(**{"model_path": "/m", **bad})


def test_flags_file_is_sglangs_flag_list():
    flags = sglang_flags()
    assert len(flags) > 300 and all(flag.startswith("--") for flag in flags)
    assert {"--model-path", "--disaggregation-mode", "--kv-events-config", "--enable-metrics"} <= flags


@pytest.mark.parametrize("role", ["prefill", "decode", "both"])
def test_every_emitted_flag_is_a_real_sglang_flag(role):
    argv = sglang_command(SglangLaunchConfig(**{**EVERYTHING, "role": role}))
    emitted = set(options(argv))
    assert emitted - sglang_flags() == set()


def test_cli_print_shows_the_command_and_exits_0():
    out = run_cli(
        "sglang",
        "--role",
        "prefill",
        "--model-path",
        "/m",
        "--tp-size",
        "2",
        "--kv-events-endpoint",
        "tcp://*:5557",
        "--extra-args",
        "--api-key 'a b'",
        "--print",
    )
    assert out.returncode == 0, out.stderr
    expected = SglangLaunchConfig(
        role="prefill",
        model_path="/m",
        tp_size=2,
        kv_events_endpoint="tcp://*:5557",
        extra_args=["--api-key", "a b"],
    )
    assert shlex.split(out.stdout) == sglang_command(expected)


def test_cli_help_and_invalid_values():
    help_text = run_cli("sglang", "--help")
    assert help_text.returncode == 0
    for flag in ("--role", "--model-path", "--bootstrap-port", "--transfer-backend", "--no-enable-metrics", "--print"):
        assert flag in help_text.stdout
    bad = run_cli("sglang", "--model-path", "/m", "--tp-size", "0", "--print")
    assert bad.returncode == 2 and "tp_size" in bad.stderr
    missing = run_cli("sglang", "--print")
    assert missing.returncode == 2 and "model_path" in missing.stderr
    wrong = run_cli("sglang", "--model-path", "/m", "--transfer-backend", "ascend")
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")
def test_without_sglang_it_refuses_to_start(capsys):
    parser = argparse.ArgumentParser()
    add_sglang_command(parser.add_subparsers(dest="engine_kind", required=True))
    args = parser.parse_args(["sglang", "--role", "decode", "--model-path", "/m"])
    assert args.run is run_sglang
    assert run_sglang(args) == 2
    err = capsys.readouterr().err
    assert f"sglang is not installed in {sys.executable}" in err and "--print" in err


def test_the_configured_python_is_the_one_checked(tmp_path):
    without = run_cli("sglang", "--model-path", "/m", "--python", str(fake_python(tmp_path, has_sglang=False)))
    assert without.returncode == 2 and "sglang is not installed in" in without.stderr
    nowhere = run_cli("sglang", "--model-path", "/m", "--python", str(tmp_path / "no-such-python"))
    assert nowhere.returncode == 2 and "no-such-python" in nowhere.stderr


def test_with_sglang_it_execs_the_command(tmp_path):
    python = fake_python(tmp_path, has_sglang=True)
    out = run_cli("sglang", "--role", "prefill", "--model-path", "/m", "--python", str(python))
    assert out.returncode == 0, out.stderr
    config = SglangLaunchConfig(role="prefill", model_path="/m", python=str(python))
    assert out.stdout.strip() == "fake sglang started: " + " ".join(sglang_command(config)[1:])


def test_pdgate_engine_sglang_prints_the_command():
    out = subprocess.run(
        [sys.executable, "-m", "pdgate.cli", "engine", "sglang", "--role", "prefill", "--model-path", "/m", "--print"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == sglang_command(SglangLaunchConfig(role="prefill", model_path="/m"))
