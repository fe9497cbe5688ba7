"""Every shipped config validates, the scheduling plugins in it build, and its engines bind their KV events."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from pdgate.adapters.kv_events import subscriber_address
from pdgate.common.kv_events import engine_binds
from pdgate.gateway.config import DEFAULT_SCHEDULING, GatewayConfig
from pdgate.gateway.instance_config import InstanceConfig, KvEventsConfig
from pdgate.gateway.launcher import sim_command
from pdgate.scheduler.registry import PluginRegistry

pytestmark = pytest.mark.unit

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "sim-engine.yaml"], ids=lambda p: p.name)
def test_fleet_config_validates(path):
    config = GatewayConfig.load(path)
    profiles = PluginRegistry(load_entry_points=False).build(config.scheduling or DEFAULT_SCHEDULING)
    assert {"prefill", "decode", "colocated"} <= set(profiles)


FLEET_CONFIGS = [p for p in CONFIGS if p.name != "sim-engine.yaml"]
ENDPOINT_IN_TEXT = re.compile(
    r"""(?:--kv-events-(?:replay-)?endpoint|kv_events_(?:replay_)?endpoint:)\s+['"]?([^\s'"]+)"""
)


@pytest.mark.parametrize("path", FLEET_CONFIGS, ids=lambda p: p.name)
def test_shipped_fleets_let_the_engines_bind_their_kv_events(path):
    """Every engine binds its KV events (tcp://*:PORT), so any number of gateway replicas connect."""
    config = GatewayConfig.load(path)
    for inst in config.instances:
        if inst.kv_events is None:
            continue
        assert inst.kv_events.engine_binds, (inst.id, inst.kv_events.endpoint)
        bind, address = subscriber_address(inst.kv_events.endpoint, inst.spec().host)
        assert not bind and address == f"tcp://{inst.spec().host}:{inst.kv_events.endpoint.rsplit(':', 1)[1]}"
        if inst.kv_events.replay_endpoint is not None:
            assert inst.kv_events.replay_endpoint.startswith("tcp://*:"), inst.id


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_engine_command_lines_in_comments_bind_too(path):
    """The engine command lines the configs show (comments included) give the bind form as well."""
    endpoints = ENDPOINT_IN_TEXT.findall(path.read_text())
    assert all(engine_binds(e) for e in endpoints), endpoints


def test_pdgate_up_starts_sims_with_the_wildcard_endpoint():
    config = GatewayConfig.load(CONFIGS[0].parent / "default.yaml")
    argv = sim_command(config.instances[0])
    assert argv[argv.index("--kv-events-endpoint") + 1] == "tcp://*:5601"


def test_kv_events_config_forms():
    engine_bound = KvEventsConfig(endpoint="tcp://*:5601", replay_endpoint="tcp://0.0.0.0:5602")
    assert engine_bound.engine_binds and engine_bound.topic == "kv"
    assert KvEventsConfig(endpoint="tcp://[::]:5601").engine_binds
    assert KvEventsConfig(endpoint="ipc:///tmp/kv.sock").engine_binds
    gateway_bound = KvEventsConfig(endpoint="tcp://10.0.0.2:5601")  # the old form: one gateway binds it
    assert not gateway_bound.engine_binds


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("127.0.0.1:5601", "not a ZMQ endpoint"),
        ("inproc://kv", "not a ZMQ endpoint"),
        ("tcp://*:*", "fixed port"),
        ("tcp://*", "fixed port"),
        ("tcp://*:70000", "fixed port"),
        ("tcp://0.0.0.0:5601", r"tcp://\*:5601"),
    ],
)
def test_kv_events_config_rejects_what_no_gateway_can_use(endpoint, problem):
    with pytest.raises(ValidationError, match=problem):
        KvEventsConfig(endpoint=endpoint)
    if "0.0.0.0" not in endpoint:
        with pytest.raises(ValidationError, match=problem):
            KvEventsConfig(endpoint="tcp://*:5601", replay_endpoint=endpoint)


def test_only_engines_that_take_either_leg_may_be_flex():
    base = {"url": "http://127.0.0.1:9", "model": "tiny"}
    assert InstanceConfig.model_validate({**base, "kind": "vllm", "role": "flex"}).start_role == "both"
    assert (
        InstanceConfig.model_validate({**base, "kind": "sim", "role": "flex", "serving": "decode"}).start_role
        == "decode"
    )
    flex = InstanceConfig.model_validate(
        {**base, "url": "http://127.0.0.1:8109", "kind": "sim", "role": "flex", "launch": {}}
    )
    argv = sim_command(flex)
    assert argv[argv.index("--role") + 1] == "both"  # `pdgate up`: the sim takes either leg in its colocated role
    with pytest.raises(ValueError, match="cannot change roles while it serves"):
        InstanceConfig.model_validate({**base, "kind": "sglang", "role": "flex"})
    with pytest.raises(ValueError, match="only a flex instance"):
        InstanceConfig.model_validate({**base, "kind": "vllm", "role": "decode", "serving": "prefill"})
