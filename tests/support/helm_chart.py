"""Rendering and checking the Helm chart (deploy/helm/pdgate) for the tests/test_helm_chart*.py tests.

What it offers:

* the renderer and the validator, or a skip (a failure with ``CI=true``: :func:`require`,
  :func:`require_helm`, :func:`cached_kube_validate`);
* :func:`render`: every manifest ``helm template pd deploy/helm/pdgate -n llm`` prints, by Helm's
  own Go engine (``helm-python-sdk`` binds the Helm SDK's library: sprig, ``include``, ``.Files``,
  ``values.schema.json`` exactly as ``helm template`` has them);
* :func:`validate_all`: every manifest against the Kubernetes OpenAPI schemas
  (``kubernetes-validate``, strict: an unknown field fails) for the oldest Kubernetes the chart's
  ``kubeVersion`` admits and the newest the validator knows (:func:`kube_versions`); the
  ServiceMonitor (a CRD) against a small schema of its own (:data:`SERVICE_MONITOR_SCHEMA`);
* the value sets the tests render (:data:`VALUE_SETS`), Helm's coalescing of values
  (:func:`merge`, :func:`effective_values`) and every enabled engine role's settings
  (:func:`engine_specs`);
* lookups in the rendered manifests (:func:`one`, :func:`kinds`, :func:`container`,
  :func:`gateway_config`, :func:`nats_conf`);
* what ``pdgate engine ...`` prints for the settings of an engine role (:func:`cli_flags`,
  :func:`cli_print`);
* for the tests that run processes: an HTTP status as a probe sees it (:func:`http_status`) and
  the rendered NATS config on loopback (:func:`nats_conf_on_loopback`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import io
import json
import os
import re
import shlex
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from pdgate.cli import main as pdgate_main

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "pdgate"
EXAMPLES = CHART / "examples"
DASHBOARD = REPO / "configs" / "grafana" / "pdgate-dashboard.json"
DOC = REPO / "docs" / "kubernetes.md"
RELEASE, NAMESPACE = "pd", "llm"
FULLNAME = "pd-pdgate"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the dashboard's 52 kB parse in ms


# ---------------------------------------------------------------- the renderer and the validator


def require(module: str, what: str) -> ModuleType:
    """The module, else a skip (a failure with ``CI=true``: CI must run these tests)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        reason = f"{what} is not installed (`pip install -e '.[test]'` brings it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must render and validate the Helm chart: {reason}")
        pytest.skip(reason)


def require_helm() -> ModuleType:
    """``helm_python`` (helm-python-sdk), as :func:`require` gives it."""
    return require("helm_python", "the Helm renderer helm-python-sdk")


@contextlib.contextmanager
def cached_kube_validate() -> Iterator[ModuleType]:
    """kubernetes-validate (as :func:`require` gives it), reading each schema file once while open: it
    parses its 1.2 MB definitions file on every call otherwise (the files are read-only, the parsed
    schemas are never changed)."""
    module = require("kubernetes_validate", "kubernetes-validate")
    from kubernetes_validate import utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "schema_contents", functools.lru_cache(maxsize=None)(utils.schema_contents))
        yield module


# ---------------------------------------------------------------- value sets


def example(name: str) -> dict[str, Any]:
    """The values of one of the chart's examples (``deploy/helm/pdgate/examples``)."""
    return yaml.safe_load((EXAMPLES / name).read_text())


VLLM_2P2D: dict[str, Any] = {
    "engines": {
        "modelVolume": {"source": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}},
        "vllm": {
            "launch": {
                "block_size": 32,
                "max_model_len": 16384,
                "kv_cache_bytes": 17179869184,  # over 2**32: printed as an integer, not 1.7e+10
                "dtype": "bfloat16",
                "seed": 7,
                "max_num_seqs": 64,
                "kv_buffer_device": "cuda",
                "kv_load_failure_policy": "fail",
                "otlp_traces_endpoint": "http://otel-collector.monitoring:4318",
                "extra_args": ["--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.9"],
            },
            "resources": {"limits": {"nvidia.com/gpu": 2}},
            "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
            "prefill": {"enabled": True, "replicas": 2},
            "decode": {"enabled": True, "replicas": 2, "launch": {"max_num_seqs": 256}},
            "flex": {"enabled": True, "replicas": 1, "instance": {"serving": "decode"}},
            "both": {"enabled": True, "replicas": 1, "launch": {"extra_args": []}},
        },
    }
}
SGLANG: dict[str, Any] = {
    "engines": {
        "kvEvents": {"topic": "kv-sglang"},
        "sglang": {
            "launch": {"mem_fraction_static": 1, "tp_size": 2, "page_size": 16, "enable_metrics": False},
            "prefill": {"enabled": True, "replicas": 2, "launch": {"ib_device": "mlx5_0", "transfer_backend": "nixl"}},
            "decode": {"enabled": True, "replicas": 2},
            "both": {
                "enabled": True,
                "launch": {
                    "trust_remote_code": True,
                    "schedule_policy": "lpm",
                    "enable_priority_scheduling": True,
                    "log_level": "warning",
                    "context_length": 4096,
                    "dp_size": 2,
                    "mem_fraction_static": 0.8,
                    "extra_args": ["--chunked-prefill-size", "4096"],
                },
            },
        },
    }
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "replicas-3-nats-cluster": {
        "gateway": {"replicas": 3, "workers": 2},
        "nats": {"replicas": 3, "persistence": {"enabled": True, "storageClassName": "fast"}},
    },
    "external-nats": {"nats": {"external": {"url": "nats://nats.infra:4222"}}},
    "single-replica-no-nats": {"gateway": {"replicas": 1, "pdb": {"enabled": False}}, "nats": {"enabled": False}},
    "vllm-2p2d": VLLM_2P2D,
    "sglang": SGLANG,
    "servicemonitor-scaling-secrets": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "rbac": {"scaling": True},
        "discovery": {"namespace": "engines"},
        "gateway": {
            "apiKeysSecret": {"name": "pdgate-keys"},
            "adminKeySecret": {"name": "pdgate-admin", "key": "token"},
            "pdb": {"minAvailable": 1},
        },
        "grafana": {"dashboard": {"namespace": "monitoring", "labels": {"team": "llm"}}},
    },
    "example-vllm-1p1d": example("vllm-1p1d.yaml"),
    "example-sglang-2p2d": example("sglang-2p2d.yaml"),
}
ENGINE_SETS = ["vllm-2p2d", "sglang", "example-vllm-1p1d", "example-sglang-2p2d"]  # the sets with engines


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on ``base``, mappings merged key by key, anything else replaced (Helm's coalescing)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def effective_values(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` over the chart's values.yaml."""
    return merge(yaml.safe_load((CHART / "values.yaml").read_text()), values)


def engine_specs(values: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(engine, role, settings, all values) of every enabled engine role: the kind's settings with the role's over them."""
    merged = effective_values(values)
    for engine, roles in (("vllm", ("prefill", "decode", "both", "flex")), ("sglang", ("prefill", "decode", "both"))):
        kind = merged["engines"][engine]
        common = {k: v for k, v in kind.items() if k not in roles}
        for role in roles:
            if kind.get(role, {}).get("enabled"):
                yield engine, role, merge(common, kind[role]), merged


# ---------------------------------------------------------------- rendering and lookups


def render(chart: Any, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest ``helm template pd deploy/helm/pdgate -n llm`` prints for ``values``."""
    rendered = chart.render(values or None, name=RELEASE, namespace=NAMESPACE, is_install=True)
    manifests = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        manifests += [doc for doc in yaml.load_all(text, Loader=LOADER) if doc]
    return manifests


def one(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one manifest of a kind (and name); any other count fails the test."""
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} named {name}: {[m['metadata']['name'] for m in found]}"
    return found[0]


def kinds(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def gateway_config(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The config.yaml the gateway reads, parsed."""
    config = yaml.safe_load(one(manifests, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    assert isinstance(config, dict)
    return config


def nats_conf(manifests: list[dict[str, Any]]) -> str:
    """The nats-server config the StatefulSet mounts."""
    conf = one(manifests, "ConfigMap", f"{FULLNAME}-nats-config")["data"]["nats.conf"]
    assert isinstance(conf, str)
    return conf


def container(workload: dict[str, Any]) -> dict[str, Any]:
    """A workload's one container."""
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


# ---------------------------------------------------------------- schemas


def kube_versions() -> list[str]:
    """The oldest Kubernetes ``kubeVersion`` admits and the newest the validator has schemas for."""
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    match = re.fullmatch(r">=\s*(\d+\.\d+)\.\d+(-0)?", constraint)
    assert match, f"kubeVersion {constraint!r}: expected '>=X.Y.Z-0'"
    from kubernetes_validate.utils import latest_version

    return [match.group(1), latest_version()]


SERVICE_MONITOR_SCHEMA: dict[str, Any] = {  # monitoring.coreos.com/v1 ServiceMonitor, the fields the chart uses
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array"}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


def validate_all(manifests: list[dict[str, Any]], kube_validate: ModuleType) -> None:
    """Every manifest has a namespace and is valid for each of :func:`kube_versions`; else the test fails."""
    import jsonschema
    from kubernetes_validate.utils import ValidationError

    for manifest in manifests:
        assert manifest["metadata"].get("namespace"), f"{manifest['kind']} {manifest['metadata']['name']}: no namespace"
        if manifest["kind"] == "ServiceMonitor":
            jsonschema.validate(manifest, SERVICE_MONITOR_SCHEMA)
            continue
        for version in kube_versions():
            try:
                kube_validate.validate(manifest, version, strict=True)
            except ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{manifest['kind']} {manifest['metadata']['name']} (Kubernetes {version}) {where}: {exc.message}"
                )


# ---------------------------------------------------------------- the engine CLI


def cli_flags(engine: str, role: str, spec: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The `pdgate engine ENGINE` flags the chart's settings stand for."""
    events = values["engines"]["kvEvents"]
    flags = ["engine", engine, "--role", role, "--python", spec["python"], "--host", "0.0.0.0"]
    flags += ["--port", str(spec["port"]), "--served-model-name", spec["model"]["name"]]
    if engine == "vllm":
        flags += ["--device", "gpu", "--model", spec["model"]["path"]]
        if role != "both":
            flags += ["--side-channel-host", "$(POD_IP)", "--side-channel-port", str(spec["sideChannelPort"])]
    else:
        flags += ["--model-path", spec["model"]["path"], "--bootstrap-port", str(spec["bootstrapPort"])]
    if events["enabled"]:
        flags += [
            "--kv-events-endpoint",
            f"tcp://*:{events['port']}",
            "--kv-events-replay-endpoint",
            f"tcp://*:{events['replayPort']}",
            "--kv-events-topic",
            events["topic"],
        ]
    for key, value in spec["launch"].items():
        flag = "--" + key.replace("_", "-")
        if key == "extra_args":
            flags += [flag, shlex.join(value)]
        elif isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return [*flags, "--print"]


def cli_print(flags: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[tuple[str, str]]]:
    """What `pdgate FLAGS` prints, as (argv, environment pairs in order)."""
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert pdgate_main(flags) == 0
    words = shlex.split(out.getvalue())
    env = []
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env.append((name, value))
    return words, env


# ---------------------------------------------------------------- processes


def http_status(url: str) -> int:
    """The status a GET of ``url`` answers (an error status too, as a probe sees it)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def nats_conf_on_loopback(text: str, *, monitor: int, data_dir: Path, pid_file: Path) -> str:
    """The rendered nats-server config run here: the pod's volume mounts as local paths, every port on loopback."""
    text = text.replace('"/data"', json.dumps(str(data_dir)))
    text = text.replace('"/var/run/nats/nats.pid"', json.dumps(str(pid_file)))
    return text.replace(f"http_port: {monitor}", f'http: "127.0.0.1:{monitor}"') + '\nhost: "127.0.0.1"\n'
