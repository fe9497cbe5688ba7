"""What one engine pod means to the fleet: its instance entry and whether it may serve.

Pure functions over lightkube's ``Pod`` objects and the ``discovery.kubernetes`` settings
(:class:`~pdgate.gateway.discovery_config.KubernetesDiscoveryConfig`); the reconciler acts on them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lightkube.resources.core_v1 import Pod
from lightkube.resources.discovery_v1 import EndpointSlice

from pdgate.gateway.discovery_config import KubernetesDiscoveryConfig


@dataclass(frozen=True)
class PodFacts:
    """One pod as discovery sees it: ``entry`` is None when the pod cannot serve (no IP yet) or
    its labels and annotations do not make an entry (``problem`` says why)."""

    name: str
    uid: str
    ready: bool  # Running, Ready, with an IP
    terminating: bool  # deletionTimestamp set, or Failed/Succeeded (evicted): on its way out
    entry: dict[str, Any] | None
    problem: str | None = None


def pod_facts(pod: Pod, settings: KubernetesDiscoveryConfig) -> PodFacts:
    meta, status = pod.metadata, pod.status
    name = (meta.name if meta is not None else None) or ""
    uid = (meta.uid if meta is not None else None) or ""
    ended = status is not None and status.phase in ("Failed", "Succeeded")  # evicted, or exited for good
    terminating = (meta is not None and meta.deletionTimestamp is not None) or ended
    ip = status.podIP if status is not None else None
    ready = bool(
        not terminating
        and status is not None
        and status.phase == "Running"
        and ip
        and any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
    )
    if not ip:
        return PodFacts(name, uid, ready, terminating, None)
    try:
        entry = instance_entry(pod, ip, settings)
    except ValueError as exc:
        return PodFacts(name, uid, ready, terminating, None, str(exc))
    return PodFacts(name, uid, ready, terminating, entry)


def instance_entry(pod: Pod, ip: str, settings: KubernetesDiscoveryConfig) -> dict[str, Any]:
    """The instance entry of a pod with an IP (raises ValueError for labels that make none)."""
    meta = pod.metadata
    assert meta is not None
    name = meta.name or ""
    labels = meta.labels or {}
    annotations = meta.annotations or {}
    role = labels.get(settings.role_label)
    if not role:
        raise ValueError(f"pod {name} has no {settings.role_label} label (prefill, decode, both or flex)")
    model = annotations.get(settings.model_annotation) or labels.get(settings.model_label)
    if not model:
        raise ValueError(f"pod {name} names no model ({settings.model_annotation} annotation or label)")
    raw_port = annotations.get(settings.port_annotation)
    if raw_port is not None and not (raw_port.isdigit() and 0 < int(raw_port) < 65536):
        raise ValueError(f"pod {name}: {settings.port_annotation} is {raw_port!r}, not a port")
    port = int(raw_port) if raw_port is not None else settings.port
    own: Any = {}
    raw_own = annotations.get(settings.instance_annotation)
    if raw_own:
        try:
            own = json.loads(raw_own)
        except json.JSONDecodeError as exc:
            raise ValueError(f"pod {name}: {settings.instance_annotation} is not JSON ({exc})") from None
        if not isinstance(own, dict):
            raise ValueError(f"pod {name}: {settings.instance_annotation} must be a JSON object")
    entry: dict[str, Any] = {**settings.instance, **own}
    kind = labels.get(settings.engine_label)
    if kind:
        entry["kind"] = kind
    entry.update(id=name, url=f"http://{_host(ip)}:{port}", role=role, model=model, pod_uid=meta.uid or None)
    return _placeholders(entry, {"{pod_ip}": ip, "{pod_name}": name})


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _placeholders(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, replacement in names.items():
            value = value.replace(key, replacement)
        return value
    if isinstance(value, dict):
        return {k: _placeholders(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_placeholders(v, names) for v in value]
    return value


@dataclass(frozen=True)
class EndpointState:
    """A pod's endpoint as its Service's EndpointSlices say (nil conditions read as the API defines)."""

    ready: bool
    terminating: bool


def endpoint_states(slices: Iterable[EndpointSlice]) -> dict[str, EndpointState]:
    """Pod name -> its endpoint's state, over every slice of a Service (a pod in none: absent).

    ``ready`` nil means ready and ``terminating`` nil means not. A terminating endpoint, still
    serving (its connections drain) or not, is a pod on its way out; a pod several slices list
    is ready when one says so, and leaving when all do.
    """
    seen: dict[str, list[EndpointState]] = {}
    for eps in slices:
        for endpoint in eps.endpoints or []:
            ref = endpoint.targetRef
            if ref is None or ref.kind != "Pod" or not ref.name:
                continue
            c = endpoint.conditions
            ready = c is None or c.ready is None or c.ready
            terminating = c is not None and bool(c.terminating)  # serving or not: on its way out
            seen.setdefault(ref.name, []).append(EndpointState(bool(ready and not terminating), terminating))
    # a pod in several slices (dual-stack, or moved between slices): ready when one says so,
    # leaving when all do
    return {
        name: EndpointState(ready=any(s.ready for s in states), terminating=all(s.terminating for s in states))
        for name, states in seen.items()
    }


def with_endpoint(facts: PodFacts, endpoint: EndpointState | None) -> PodFacts:
    """``facts`` with readiness as the Service sees it: ready only when its endpoint is; on its way
    out when its endpoint is serving but terminating (or the pod itself is)."""
    if endpoint is None:
        return dataclasses.replace(facts, ready=False)
    ready = endpoint.ready and facts.entry is not None and not facts.terminating
    return dataclasses.replace(facts, ready=ready, terminating=facts.terminating or endpoint.terminating)
