"""The Helm chart's engine Deployments (deploy/helm/pdgate): each runs what the CLI would.

Every enabled engine role's container runs the command and environment ``pdgate engine
vllm|sglang ... --print`` prints for the same settings; every CLI setting is either set by the
chart or a ``launch`` value; the pods carry what Kubernetes discovery reads and become the
gateway's instances through it; their drain and stop times follow the values. Rendered by Helm's
own Go engine (tests/support/helm_chart.py).

Without the renderer the tests skip, and with ``CI=true`` they fail.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest
from support.helm_chart import (
    CHART,
    ENGINE_SETS,
    FULLNAME,
    VALUE_SETS,
    cli_flags,
    cli_print,
    container,
    engine_specs,
    gateway_config,
    kinds,
    merge,
    one,
    render,
)

from pdgate.engines.launch.sglang import SglangLaunchConfig
from pdgate.engines.launch.vllm import VllmLaunchConfig
from pdgate.gateway.discovery.pod_entries import instance_entry
from pdgate.gateway.discovery_config import KubernetesDiscoveryConfig
from pdgate.gateway.instance_config import InstanceConfig

# `pdgate engine ...` settings the chart sets itself; every other one is a `launch` key
CHART_SET_VLLM = {
    "role",
    "model",
    "served_model_name",
    "host",
    "port",
    "device",
    "python",
    "side_channel_host",
    "side_channel_port",
    "kv_events_endpoint",
    "kv_events_replay_endpoint",
    "kv_events_topic",
}


CPU_ONLY_VLLM = {"cpu_cores"}  # taskset pinning of the CPU build: no GPU engine has it


CHART_SET_SGLANG = {
    "role",
    "model_path",
    "served_model_name",
    "host",
    "port",
    "bootstrap_port",
    "python",
    "kv_events_endpoint",
    "kv_events_replay_endpoint",
    "kv_events_topic",
}


@pytest.mark.parametrize("name", ENGINE_SETS)
def test_engine_commands_are_the_clis(chart: Any, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    values = VALUE_SETS[name]
    manifests = render(chart, values)
    expected = list(engine_specs(values))
    assert expected, "no engine role enabled"
    assert len(kinds(manifests, "Deployment")) == 1 + len(expected)
    for engine, role, spec, merged in expected:
        deployment = one(manifests, "Deployment", f"{FULLNAME}-{engine}-{role}")
        main = container(deployment)
        argv, env = cli_print(cli_flags(engine, role, spec, merged), monkeypatch)
        assert main["command"] + main["args"] == argv, f"{engine} {role}"
        own = [(e["name"], e["value"]) for e in main["env"] if e["name"] != "POD_IP" and e not in spec["env"]]
        assert own == env, f"{engine} {role}"
        assert main["env"][0] == {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
        assert deployment["spec"]["replicas"] == spec["replicas"]
        assert main["resources"] == spec["resources"]


def test_vllm_numbers_print_as_the_cli_prints_them(chart: Any) -> None:
    args = container(one(render(chart, VALUE_SETS["vllm-2p2d"]), "Deployment", f"{FULLNAME}-vllm-prefill"))["args"]
    assert args[args.index("--kv-cache-memory-bytes") + 1] == "17179869184"
    assert args[args.index("--otlp-traces-endpoint") + 1] == "http://otel-collector.monitoring:4318/v1/traces"
    sglang = container(one(render(chart, VALUE_SETS["sglang"]), "Deployment", f"{FULLNAME}-sglang-decode"))["args"]
    assert sglang[sglang.index("--mem-fraction-static") + 1] == "1.0"  # Python's str(1.0)
    assert "--enable-metrics" not in sglang


def test_launch_keys_cover_every_cli_setting(chart: Any) -> None:
    """Every `pdgate engine vllm|sglang` setting is either set by the chart or a `launch` key: a new
    CLI flag fails here until the chart renders it."""
    definitions = json.loads((CHART / "values.schema.json").read_text())["definitions"]
    vllm = set(definitions["vllmLaunch"]["properties"])
    sglang = set(definitions["sglangLaunch"]["properties"])
    assert vllm | CHART_SET_VLLM | CPU_ONLY_VLLM == set(VllmLaunchConfig.model_fields)
    assert not vllm & CHART_SET_VLLM
    assert sglang | CHART_SET_SGLANG == set(SglangLaunchConfig.model_fields)
    assert not sglang & CHART_SET_SGLANG


@pytest.mark.parametrize("name", ENGINE_SETS)
def test_engine_pods_carry_what_discovery_reads(chart: Any, name: str) -> None:
    manifests = render(chart, VALUE_SETS[name])
    kube = gateway_config(manifests)["discovery"]["kubernetes"]
    key, _, pool = kube["label_selector"].partition("=")
    for engine, role, spec, _merged in engine_specs(VALUE_SETS[name]):
        deployment = one(manifests, "Deployment", f"{FULLNAME}-{engine}-{role}")
        template = deployment["spec"]["template"]
        labels, annotations = template["metadata"]["labels"], template["metadata"]["annotations"]
        assert labels[key] == pool
        assert labels[kube["role_label"]] == role and labels[kube["engine_label"]] == engine
        assert annotations[kube["model_annotation"]] == spec["model"]["name"]
        assert kube["model_label"] not in labels  # model names hold '/', which label values cannot
        main = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        assert int(annotations[kube["port_annotation"]]) == ports["http"] == spec["port"]
        assert main["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert set(deployment["spec"]["selector"]["matchLabels"].items()) <= set(labels.items())
        own = json.loads(annotations[kube["instance_annotation"]])
        entry = {**kube["instance"], **own, "kind": engine, "role": role, "model": spec["model"]["name"]}
        instance = InstanceConfig.model_validate({**entry, "id": "pod-0", "url": f"http://10.1.2.3:{ports['http']}"})
        assert instance.kind == engine
        if engine == "sglang" and role == "prefill":
            assert instance.bootstrap_port == ports["bootstrap"] == spec["bootstrapPort"]
        events = instance.kv_events
        assert events is not None and events.engine_binds  # every gateway replica connects
        assert events.endpoint.endswith(f":{ports['kv-events']}")


@pytest.mark.parametrize("name", ENGINE_SETS)
def test_engine_pods_become_instances_through_discovery(chart: Any, name: str) -> None:
    from lightkube.resources.core_v1 import Pod

    manifests = render(chart, VALUE_SETS[name])
    settings = KubernetesDiscoveryConfig.model_validate(gateway_config(manifests)["discovery"]["kubernetes"])
    for engine, role, spec, _merged in engine_specs(VALUE_SETS[name]):
        template = one(manifests, "Deployment", f"{FULLNAME}-{engine}-{role}")["spec"]["template"]
        pod = Pod.from_dict(
            {
                "metadata": {**template["metadata"], "name": f"{engine}-{role}-0", "uid": "uid-0"},
                "status": {
                    "podIP": "10.1.2.3",
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )
        entry = instance_entry(pod, "10.1.2.3", settings)
        instance = InstanceConfig.model_validate(entry)
        assert (instance.kind, instance.role, instance.model) == (engine, role, spec["model"]["name"])
        assert instance.url == f"http://10.1.2.3:{spec['port']}"


def test_engine_model_must_be_a_gateway_model(chart: Any, helm: ModuleType) -> None:
    values = merge(VALUE_SETS["vllm-2p2d"], {"engines": {"vllm": {"model": {"name": "other-model"}}}})
    with pytest.raises(helm.HelmError, match='serves model "other-model", which is not one of config.models'):
        render(chart, values)


def test_engine_drain_and_stop_time(chart: Any) -> None:
    values = merge(VALUE_SETS["vllm-2p2d"], {"discovery": {"drainTimeoutSeconds": 75}})
    pod = one(render(chart, values), "Deployment", f"{FULLNAME}-vllm-decode")["spec"]["template"]["spec"]
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 75}}
    assert pod["terminationGracePeriodSeconds"] == 75 + 30
    values = merge(values, {"engines": {"shutdown": {"drainSeconds": 20, "graceSeconds": 10}}})
    pod = one(render(chart, values), "Deployment", f"{FULLNAME}-vllm-decode")["spec"]["template"]["spec"]
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 20}}
    assert pod["terminationGracePeriodSeconds"] == 30
