"""A third-party plugin package, installed for real, is found through the entry-point group."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.fleet import (
    MODEL,
    engine_flags,
    instance_entry,
    metric,
    start_gateway,
    write_config,
)

EXAMPLE = Path(__file__).parent / "plugin_example"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "plugin_example"
    shutil.copytree(EXAMPLE, source)  # building writes build/ and *.egg-info next to the sources
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        timeout=120,
    )
    return target


def test_registry_loads_the_entry_point(installed_example, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_example))
    from pdgate.scheduler.registry import PluginRegistry

    registry = PluginRegistry()
    assert "example-pinned" in registry.types
    with pytest.raises(ValueError, match="instances"):
        registry.build({"plugins": [{"name": "p", "type": "example-pinned"}], "profiles": {}})


def test_gateway_config_uses_the_third_party_plugin(installed_example, sim_factory, tmp_path):
    engines = [sim_factory(*engine_flags("both")) for _ in range(3)]
    entries = [instance_entry(e, "both", "sim") for e in engines]
    pinned = entries[2]["id"]
    scheduling = {
        "plugins": [
            {"name": "pin", "type": "example-pinned", "parameters": {"instances": [pinned]}},
            {"name": "load", "type": "least-loaded"},
            {"name": "pick", "type": "max-score"},
        ],
        "profiles": {
            name: [{"pluginRef": "pin", "weight": 10}, {"pluginRef": "load", "weight": 1}, {"pluginRef": "pick"}]
            for name in ("prefill", "decode", "colocated")
        },
    }
    config = write_config(tmp_path / "plugin.yaml", entries, scheduling=scheduling)
    gateway = start_gateway(config, env={"PYTHONPATH": str(installed_example)})
    try:
        import openai

        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        for i in range(5):
            client.completions.create(model=MODEL, prompt=f"pinned {i}", max_tokens=2)
        served = [metric(e.url, "vllm:request_success_total") for e in engines]
        assert served == [0, 0, 5]
    finally:
        gateway.stop()
