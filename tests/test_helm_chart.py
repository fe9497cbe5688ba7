"""The Helm chart (deploy/helm/pdgate) as an operator installs it: rendered, valid, consistent.

Rendered by Helm's own Go engine and every manifest validated against the Kubernetes OpenAPI
schemas for the oldest Kubernetes the chart's ``kubeVersion`` admits and the newest the validator
knows, the ServiceMonitor (a CRD) against a small schema of its own (tests/support/helm_chart.py).
Then what an operator relies on: probes and ports, the shutdown arithmetic, the config the
gateway reads, NATS, RBAC for discovery, the dashboard, the values' schema and the
documentation of every value. The engine Deployments are checked in
tests/test_helm_chart_engines.py, the rendered config run by real processes in
tests/test_helm_chart_processes.py.

Without the renderer or the validator the tests skip, and with ``CI=true`` they fail.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import yaml
from support.helm_chart import (
    CHART,
    DASHBOARD,
    DOC,
    FULLNAME,
    NAMESPACE,
    RELEASE,
    VALUE_SETS,
    cached_kube_validate,
    container,
    effective_values,
    gateway_config,
    kinds,
    merge,
    one,
    render,
    require_helm,
    validate_all,
)

from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.discovery_config import KubernetesDiscoveryConfig

DISCOVERY_KEYS = {
    "namespace",
    "label_selector",
    "role_label",
    "engine_label",
    "model_label",
    "model_annotation",
    "port",
    "port_annotation",
    "instance_annotation",
    "instance",
    "drain_timeout_s",
    "unready_grace_s",
}


def test_a_missing_renderer_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "helm_python", None)  # as if not installed: import raises ImportError
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must render and validate the Helm chart"):
        require_helm()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_helm()


@pytest.fixture(scope="module")
def kube_validate() -> Iterator[ModuleType]:
    with cached_kube_validate() as module:
        yield module


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_manifest_is_valid_kubernetes(chart: Any, kube_validate: ModuleType, name: str) -> None:
    manifests = render(chart, VALUE_SETS[name])
    assert {"Deployment", "Service", "ConfigMap"} <= {m["kind"] for m in manifests}
    validate_all(manifests, kube_validate)


@pytest.mark.parametrize("name", ["defaults", "example-vllm-1p1d", "example-sglang-2p2d"])
def test_chart_lints_clean(helm: ModuleType, name: str) -> None:
    report = helm.lint(str(CHART), VALUE_SETS[name] or None, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


# ---------------------------------------------------------------- the gateway


def test_gateway_probes_ports_and_shutdown_arithmetic(chart: Any) -> None:
    shutdown = {"readyDelaySeconds": 7, "graceSeconds": 45, "marginSeconds": 3}
    manifests = render(chart, {"gateway": {"workers": 4, "port": 8080, "shutdown": shutdown}})
    gateway = one(manifests, "Deployment", FULLNAME)
    pod = gateway["spec"]["template"]["spec"]
    main = container(gateway)
    assert main["args"][:3] == ["serve", "--config", "/etc/pdgate/config.yaml"]
    assert main["args"][3:5] == ["--workers", "4"]
    assert main["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert main["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    # endpoints drop the pod during the preStop sleep; then SIGTERM, the grace, a margin
    assert main["lifecycle"]["preStop"] == {"sleep": {"seconds": 7}}
    assert pod["terminationGracePeriodSeconds"] == 7 + 45 + 3
    config = gateway_config(manifests)
    # the preStop hook did the waiting: after SIGTERM the gateway stops listening at once
    assert config["shutdown"] == {"ready_delay_s": 0, "grace_s": 45}
    assert (config["host"], config["port"]) == ("0.0.0.0", 8080)
    service = one(manifests, "Service", FULLNAME)
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert mounts["/etc/pdgate"] == "config" and mounts["/tmp"] == "tmp"  # read-only root file system
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    # a changed config rolls the pods
    other = render(chart, {"gateway": {"workers": 4, "port": 8080, "shutdown": {**shutdown, "graceSeconds": 60}}})
    annotation = "checksum/config"
    assert (
        one(other, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["annotations"][annotation]
        != gateway["spec"]["template"]["metadata"]["annotations"][annotation]
    )


def test_no_prestop_hook_without_a_ready_delay(chart: Any) -> None:
    manifests = render(chart, {"gateway": {"shutdown": {"readyDelaySeconds": 0}}})
    gateway = one(manifests, "Deployment", FULLNAME)
    assert "lifecycle" not in container(gateway)
    assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 0 + 30 + 5


def test_gateway_pdb_and_secrets(chart: Any) -> None:
    manifests = render(chart, VALUE_SETS["servicemonitor-scaling-secrets"])
    assert one(manifests, "PodDisruptionBudget", FULLNAME)["spec"]["minAvailable"] == 1
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(one(manifests, "Deployment", FULLNAME))["env"]}
    assert env == {
        "PDGATE_API_KEYS": {"name": "pdgate-keys", "key": "api-keys"},
        "PDGATE_ADMIN_KEY": {"name": "pdgate-admin", "key": "token"},
    }
    defaults = render(chart)
    assert one(defaults, "PodDisruptionBudget", FULLNAME)["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": one(defaults, "Deployment", FULLNAME)["spec"]["selector"]["matchLabels"]},
    }
    assert not kinds(render(chart, VALUE_SETS["single-replica-no-nats"]), "PodDisruptionBudget")


# ---------------------------------------------------------------- the config the gateway reads


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_config_is_a_gateway_config(chart: Any, name: str) -> None:
    """What the gateway reads parses as its config: every section, discovery and shutdown included."""
    config = GatewayConfig.model_validate(gateway_config(render(chart, VALUE_SETS[name])))
    values = effective_values(VALUE_SETS[name])
    assert config.discovery.enabled == values["discovery"]["enabled"]
    assert config.shutdown.grace_s == values["gateway"]["shutdown"]["graceSeconds"]


def test_discovery_section(chart: Any) -> None:
    manifests = render(chart, {"discovery": {"drainTimeoutSeconds": 90, "instance": {"block_size": 32}}})
    kube = gateway_config(manifests)["discovery"]["kubernetes"]
    assert set(kube) == DISCOVERY_KEYS
    assert kube == {
        "namespace": NAMESPACE,
        "label_selector": f"pdgate.io/pool={RELEASE}-engines",
        "role_label": "pdgate.io/role",
        "engine_label": "pdgate.io/engine",
        "model_label": "pdgate.io/model",
        "model_annotation": "pdgate.io/model",
        "port": 8000,
        "port_annotation": "pdgate.io/port",
        "instance_annotation": "pdgate.io/instance",
        "instance": {"block_size": 32},
        "drain_timeout_s": 90,
        "unready_grace_s": 5,
    }
    KubernetesDiscoveryConfig.model_validate(kube)
    off = gateway_config(
        render(
            chart,
            {
                "discovery": {"enabled": False},
                "config": {"instances": [{"url": "http://e:8000", "model": "llama-3-8b"}]},
            },
        )
    )
    assert "discovery" not in off


def test_nats_url_names_the_charts_nats(chart: Any) -> None:
    manifests = render(chart, VALUE_SETS["replicas-3-nats-cluster"])
    service = one(manifests, "Service", f"{FULLNAME}-nats")
    port = service["spec"]["ports"][0]["port"]
    assert gateway_config(manifests)["sharing"] == {
        "nats_url": f"nats://{FULLNAME}-nats.{NAMESPACE}.svc.cluster.local:{port}",
        "stream_replicas": 3,  # a 3-server cluster keeps 3 copies of the shared state: one server may go
    }
    assert service["spec"]["selector"] == one(manifests, "StatefulSet")["spec"]["selector"]["matchLabels"]
    one_server = render(chart, merge(VALUE_SETS["replicas-3-nats-cluster"], {"nats": {"replicas": 1}}))
    assert "stream_replicas" not in gateway_config(one_server)["sharing"]


def test_external_nats_replaces_the_charts(chart: Any) -> None:
    manifests = render(chart, VALUE_SETS["external-nats"])
    assert gateway_config(manifests)["sharing"] == {"nats_url": "nats://nats.infra:4222"}
    assert not kinds(manifests, "StatefulSet")
    assert all("nats" not in m["metadata"]["name"] for m in manifests)


def test_one_replica_may_run_without_nats(chart: Any) -> None:
    manifests = render(chart, VALUE_SETS["single-replica-no-nats"])
    assert "sharing" not in gateway_config(manifests)
    assert not kinds(manifests, "StatefulSet")


def test_config_keeps_the_operators_sections(chart: Any) -> None:
    values = {
        "config": {
            "sharing": {"leader_lease_s": 5},
            "admission": {"max_queue": 64},
            "tenants": {"tenants": []},
        }
    }
    config = gateway_config(render(chart, values))
    assert config["sharing"]["leader_lease_s"] == 5 and config["sharing"]["nats_url"].startswith("nats://")
    assert config["admission"] == {"max_queue": 64}
    assert config["models"][0]["name"] == "llama-3-8b"


# ---------------------------------------------------------------- NATS


def test_nats_cluster_of_three(chart: Any) -> None:
    manifests = render(chart, VALUE_SETS["replicas-3-nats-cluster"])
    nats = one(manifests, "StatefulSet", f"{FULLNAME}-nats")
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["podManagementPolicy"] == "Parallel"
    headless = one(manifests, "Service", nats["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    conf = one(manifests, "ConfigMap", f"{FULLNAME}-nats-config")["data"]["nats.conf"]
    routes = re.findall(r'"nats://([^"]+)"', conf)
    assert routes == [
        f"{FULLNAME}-nats-{i}.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:6222" for i in range(3)
    ]
    assert "jetstream {" in conf and "server_name: $SERVER_NAME" in conf
    claim = nats["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["storageClassName"] == "fast"
    assert {v["name"] for v in nats["spec"]["template"]["spec"]["volumes"]} == {"config", "pid"}
    assert one(manifests, "PodDisruptionBudget", f"{FULLNAME}-nats")["spec"]["maxUnavailable"] == 1
    main = container(nats)
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz?js-enabled-only=true"
    assert main["lifecycle"]["preStop"]["exec"]["command"][:2] == ["nats-server", "--signal"]


def test_single_nats_server_keeps_its_store_in_the_pod(chart: Any) -> None:
    manifests = render(chart)
    nats = one(manifests, "StatefulSet", f"{FULLNAME}-nats")
    assert nats["spec"]["replicas"] == 1 and "volumeClaimTemplates" not in nats["spec"]
    assert {"name": "data", "emptyDir": {}} in nats["spec"]["template"]["spec"]["volumes"]
    assert "cluster {" not in one(manifests, "ConfigMap", f"{FULLNAME}-nats-config")["data"]["nats.conf"]
    assert not [m for m in kinds(manifests, "PodDisruptionBudget") if "nats" in m["metadata"]["name"]]


# ---------------------------------------------------------------- RBAC


def _allows(role: dict[str, Any], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"] for rule in role["rules"]
    )


def test_rbac_lets_the_gateway_discover_engines(chart: Any) -> None:
    manifests = render(chart)
    role, binding = one(manifests, "Role"), one(manifests, "RoleBinding")
    for verb in ("get", "list", "watch"):
        assert _allows(role, "", "pods", verb)
        assert _allows(role, "discovery.k8s.io", "endpointslices", verb)
    assert not _allows(role, "", "pods", "patch") and not _allows(role, "apps", "deployments/scale", "patch")
    account = one(manifests, "Deployment", FULLNAME)["spec"]["template"]["spec"]["serviceAccountName"]
    assert one(manifests, "ServiceAccount")["metadata"]["name"] == account
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]


def test_rbac_for_the_scaling_actuator_and_another_namespace(chart: Any) -> None:
    manifests = render(chart, VALUE_SETS["servicemonitor-scaling-secrets"])
    role, binding = one(manifests, "Role"), one(manifests, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "engines"
    assert gateway_config(manifests)["discovery"]["kubernetes"]["namespace"] == "engines"
    assert binding["subjects"][0]["namespace"] == NAMESPACE
    for resource in ("deployments/scale", "statefulsets/scale"):
        assert _allows(role, "apps", resource, "get") and _allows(role, "apps", resource, "patch")
    assert _allows(role, "apps", "deployments", "get") and _allows(role, "apps", "statefulsets", "get")
    assert _allows(role, "", "pods", "patch") and _allows(role, "", "pods", "list")


def test_no_rbac_or_token_without_discovery(chart: Any) -> None:
    values = {
        "discovery": {"enabled": False},
        "config": {"instances": [{"url": "http://e:8000", "model": "llama-3-8b"}]},
    }
    manifests = render(chart, values)
    assert not kinds(manifests, "Role") and not kinds(manifests, "RoleBinding")
    assert one(manifests, "Deployment", FULLNAME)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


# ---------------------------------------------------------------- monitoring


def test_service_monitor_scrapes_every_gateway_pod(chart: Any) -> None:
    assert not kinds(render(chart), "ServiceMonitor")
    manifests = render(chart, VALUE_SETS["servicemonitor-scaling-secrets"])
    monitor = one(manifests, "ServiceMonitor")
    service = one(manifests, "Service", FULLNAME)
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(service["metadata"]["labels"].items())
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (service["spec"]["ports"][0]["name"], "/metrics")


def test_the_charts_dashboard_is_the_original() -> None:
    """A link (Helm reads only files inside the chart, and follows links): one dashboard, never two."""
    in_chart = CHART / "dashboards" / DASHBOARD.name
    assert in_chart.is_symlink() and in_chart.resolve() == DASHBOARD.resolve()


def test_dashboard_configmap(chart: Any) -> None:
    manifests = render(chart, VALUE_SETS["servicemonitor-scaling-secrets"])
    dashboard = one(manifests, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["labels"]["team"] == "llm"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert json.loads(dashboard["data"]["pdgate-dashboard.json"]) == json.loads(DASHBOARD.read_text())
    assert not [
        m for m in render(chart, {"grafana": {"dashboard": {"enabled": False}}}) if "dashboard" in m["metadata"]["name"]
    ]


# ---------------------------------------------------------------- values: schema, checks, documentation


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"gateway": {"replicas": 0}}, "/gateway/replicas"),
        ({"gateway": {"workers": "four"}}, "/gateway/workers"),
        ({"nats": {"replicas": 2}}, "/nats/replicas"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"gatway": {"replicas": 2}}, "gatway"),
        ({"engines": {"vllm": {"launch": {"role": "decode"}}}}, "role"),  # the chart sets the role
        ({"engines": {"vllm": {"launch": {"block_size": "16"}}}}, "/engines/vllm/launch/block_size"),
        ({"engines": {"sglang": {"prefill": {"launch": {"mem_fraction_static": 1.5}}}}}, "mem_fraction_static"),
        ({"engines": {"sglang": {"flex": {"enabled": True}}}}, "flex"),  # SGLang fixes its role at launch
        ({"nats": {"external": {"url": "http://nats:4222"}}}, "/nats/external/url"),
        ({"config": {"models": []}}, "/config/models"),
    ],
)
def test_schema_rejects_bad_values(chart: Any, helm: ModuleType, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render(chart, values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"replicas": 2}, "nats": {"enabled": False}}, "gateway.replicas > 1"),
        ({"config": {"discovery": {}}}, "config.discovery is set by the chart"),
        ({"config": {"port": 9000}}, "config.port is set by the chart"),
        ({"config": {"sharing": {"nats_url": "nats://x:4222"}}}, "config.sharing.nats_url is set by the chart"),
        ({"discovery": {"enabled": False}}, "the gateway would have no engine"),
        (
            {"config": {"scaling": {"enabled": True, "actuator": {"type": "kubernetes"}}}, "rbac": {"scaling": True}},
            "set discovery.enabled to false",
        ),
        (
            {
                "config": {
                    "scaling": {"enabled": True, "actuator": {"type": "kubernetes"}},
                    "instances": [{"url": "http://e:8000", "model": "llama-3-8b"}],
                },
                "discovery": {"enabled": False},
            },
            "set rbac.scaling to true",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_reason(
    chart: Any, helm: ModuleType, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(chart, values)


# values whose content is a Kubernetes object or a pdgate config section, documented as a whole
DOCUMENTED_WHOLE = {
    "gateway.probes.startup",
    "gateway.probes.liveness",
    "gateway.probes.readiness",
    "gateway.updateStrategy",
    "gateway.resources",
    "gateway.podSecurityContext",
    "gateway.securityContext",
    "config.slo",
    "config.logging",
    "nats.resources",
    "nats.podSecurityContext",
    "nats.securityContext",
    "engines.{vllm,sglang}.resources",
    "engines.{vllm,sglang}.probes.{startup,liveness,readiness}",
    "engines.{vllm,sglang}.strategy",
}


def _value_keys(values: dict[str, Any], whole: set[str], prefix: str = "") -> Iterator[tuple[str, bool]]:
    """(path, leaf) of every key of values.yaml; a leaf is a value that is not a non-empty mapping, or
    one documented as a whole."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in whole:
            yield path, False
            yield from _value_keys(value, whole, path + ".")
        else:
            yield path, True


def _expand(key: str) -> list[str]:
    """`a.{b,c}.d` -> [a.b.d, a.c.d] (the table's shorthand for settings vLLM and SGLang share)."""
    match = re.search(r"\{([^{}]*)\}", key)
    if not match:
        return [key]
    return [k for alt in match.group(1).split(",") for k in _expand(key[: match.start()] + alt + key[match.end() :])]


def test_every_value_is_documented() -> None:
    text = DOC.read_text()
    table = text[text.index("## Values") :]
    documented = {k for row in re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE) for k in _expand(row)}
    whole = {k for key in DOCUMENTED_WHOLE for k in _expand(key)}
    keys = dict(_value_keys(yaml.safe_load((CHART / "values.yaml").read_text()), whole))
    leaves = {k for k, leaf in keys.items() if leaf}
    assert not leaves - documented, f"undocumented in docs/kubernetes.md: {sorted(leaves - documented)}"
    assert not documented - set(keys), f"documented but not in values.yaml: {sorted(documented - set(keys))}"
