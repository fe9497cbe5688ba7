"""Every shipped config validates, and the scheduling plugins in it build."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdgate.gateway.config import DEFAULT_SCHEDULING, GatewayConfig
from pdgate.scheduler.registry import PluginRegistry

pytestmark = pytest.mark.unit

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "sim-engine.yaml"], ids=lambda p: p.name)
def test_fleet_config_validates(path):
    config = GatewayConfig.load(path)
    profiles = PluginRegistry(load_entry_points=False).build(config.scheduling or DEFAULT_SCHEDULING)
    assert {"prefill", "decode", "colocated"} <= set(profiles)
