"""`pdgate engine vllm` builds the right vLLM command and environment for each role, and
`pdgate up` turns a fleet entry into it (the engines themselves run in test_vllm_e2e.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from pdgate.engines.launch.vllm import SITE_DIR, VllmLaunchConfig, vllm_command
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.launcher import launch_command


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_prefill_and_decode_get_nixl_roles_side_channel_and_events() -> None:
    prefill, env = vllm_command(
        VllmLaunchConfig(
            role="prefill",
            model="/m",
            served_model_name="tiny",
            port=8201,
            side_channel_port=5671,
            kv_events_endpoint="tcp://*:5651",
            kv_events_replay_endpoint="tcp://*:5661",
            python="/py",
        )
    )
    connector = json.loads(flag(prefill, "--kv-transfer-config"))
    assert connector == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_producer",
        "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute",
        "kv_connector_module_path": "pdgate_nixl",
    }
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5671" and env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
    assert json.loads(flag(prefill, "--kv-events-config")) == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5651",  # vLLM binds a '*' endpoint: every gateway connects to it
        "topic": "kv",
        "replay_endpoint": "tcp://*:5661",
    }
    assert prefill[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(prefill, "--served-model-name") == "tiny" and flag(prefill, "--port") == "8201"
    assert str(SITE_DIR) in env["PYTHONPATH"].split(":") and (SITE_DIR / "pdgate_nixl.py").exists()
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and "--enforce-eager" in prefill

    decode, _ = vllm_command(VllmLaunchConfig(role="decode", model="/m", side_channel_port=5672, python="/py"))
    assert json.loads(flag(decode, "--kv-transfer-config"))["kv_role"] == "kv_consumer"
    flex, env = vllm_command(VllmLaunchConfig(role="flex", model="/m", side_channel_port=5673, python="/py"))
    assert json.loads(flag(flex, "--kv-transfer-config"))["kv_role"] == "kv_both"  # either leg, per request
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5673"


def test_colocated_has_no_connector_and_gpu_has_no_cpu_fixes() -> None:
    both, env = vllm_command(VllmLaunchConfig(role="both", model="/m", python="/py"))
    assert "--kv-transfer-config" not in both and "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env
    gpu, env = vllm_command(
        VllmLaunchConfig(role="decode", model="/m", device="gpu", side_channel_port=5600, cpu_cores="0", python="/py")
    )
    assert json.loads(flag(gpu, "--kv-transfer-config"))["kv_buffer_device"] == "cuda"
    assert "kv_connector_module_path" not in flag(gpu, "--kv-transfer-config")
    assert "--enforce-eager" not in gpu and "PYTHONPATH" not in env and gpu[0] == "/py"  # no taskset on GPU


def test_a_gateway_binds_form_is_passed_on_unchanged() -> None:
    """A concrete host stays available (vLLM then connects to the one gateway bound there)."""
    argv, _ = vllm_command(VllmLaunchConfig(model="/m", kv_events_endpoint="tcp://10.0.0.2:5557", python="/py"))
    events = json.loads(flag(argv, "--kv-events-config"))
    assert events["endpoint"] == "tcp://10.0.0.2:5557" and "replay_endpoint" not in events


def test_invalid_settings_are_explained() -> None:
    with pytest.raises(ValidationError, match="side-channel-port"):
        VllmLaunchConfig(role="prefill", model="/m")
    with pytest.raises(ValidationError, match="multiple of 32"):
        VllmLaunchConfig(role="both", model="/m", block_size=16)


def test_cli_prints_the_command_and_rejects_bad_flags() -> None:
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdgate.cli",
            "engine",
            "vllm",
            "--role",
            "prefill",
            "--model",
            "/m",
            "--side-channel-port",
            "5600",
            "--cpu-cores",
            "1",
            "--print",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT=5600" in ok.stdout and "taskset -c 1" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pdgate.cli", "engine", "vllm", "--role", "decode", "--model", "/m"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "side-channel-port" in bad.stderr


def test_pdgate_up_launches_the_cpu_fleet_config_with_its_settings() -> None:
    config = GatewayConfig.load("configs/vllm-cpu-1p1d.yaml")
    argv = launch_command(config.instances[1])
    assert argv[1:5] == ["-m", "pdgate.cli", "engine", "vllm"]
    assert flag(argv, "--role") == "decode" and flag(argv, "--port") == "8202" and flag(argv, "--block-size") == "128"
    assert flag(argv, "--side-channel-port") == "5672" and flag(argv, "--cpu-cores") == "1"
    assert flag(argv, "--kv-events-endpoint") == "tcp://*:5652"  # the engine binds, the gateway connects
    assert flag(argv, "--kv-events-replay-endpoint") == "tcp://*:5662"
    with pytest.raises(ValidationError, match="kind 'vllm'"):
        GatewayConfig.model_validate(
            {
                "models": [{"name": "m"}],
                "instances": [
                    {"url": "http://127.0.0.1:1", "kind": "sim", "model": "m", "launch": {"model_path": "/m"}}
                ],
            }
        )
