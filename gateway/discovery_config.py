"""The ``discovery`` section: engine instances found at run time instead of listed in ``instances``.

``discovery.kubernetes`` watches the pods of a label selector through the Kubernetes API (list,
then watch: :mod:`pdgate.gateway.discovery`). Each pod's instance entry comes from the pod:

* ``id``: the pod's name; ``url``: ``http://{podIP}:{port}``, the port from the pod annotation
  ``port_annotation`` when it has one, else ``port``;
* ``role`` from the label ``role_label`` (``prefill``, ``decode``, ``both``, ``flex``), ``kind``
  (the adapter) from ``engine_label``, ``model`` from the annotation ``model_annotation`` (model
  names hold ``/``, which label values cannot) or else the label ``model_label``;
* every other field from ``instance`` (the defaults of every discovered instance), overridden by
  the JSON object in the pod annotation ``instance_annotation`` (a ``bootstrap_port``, a
  ``block_size``, ``kv_events``). In the strings of both, ``{pod_ip}`` and ``{pod_name}`` stand
  for the pod's.

A pod serves when it runs, has an IP and is Ready (``readiness: pod``), or when its endpoint in
the EndpointSlices of ``service`` is ready (``readiness: endpointslices``; an endpoint that is
serving but terminating is a pod on its way out: drained, then removed).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KubernetesDiscoveryConfig(_Strict):
    """Engine pods found through the Kubernetes API (docs/kubernetes.md)."""

    kubeconfig: str | None = Field(
        None, description="kubeconfig file (default: the pod's service account in a cluster, else $KUBECONFIG)"
    )
    context: str | None = Field(None, description="the kubeconfig context (default: its current one)")
    service_account_dir: str = Field(
        "/var/run/secrets/kubernetes.io/serviceaccount",
        description="in a cluster (no kubeconfig): where the pod's service account token, CA and namespace are",
    )
    namespace: str | None = Field(
        None, min_length=1, description="where the engine pods run (default: the gateway's own namespace)"
    )
    label_selector: str = Field(
        min_length=1, description="a Kubernetes label selector for the engine pods, e.g. pdgate.io/pool=engines"
    )
    role_label: str = Field("pdgate.io/role", description="label holding the pod's role: prefill, decode, both, flex")
    engine_label: str = Field("pdgate.io/engine", description="label holding the pod's adapter kind (vllm, sglang)")
    model_label: str = Field("pdgate.io/model", description="label holding the model (when no annotation names it)")
    model_annotation: str = Field("pdgate.io/model", description="annotation holding the model (wins over the label)")
    port: int = Field(8000, ge=1, le=65535, description="the engine's HTTP port in the pod")
    port_annotation: str = Field("pdgate.io/port", description="annotation overriding the port for one pod")
    instance_annotation: str = Field(
        "pdgate.io/instance", description="annotation holding a JSON object of instance fields for one pod"
    )
    instance: dict[str, Any] = Field(
        default_factory=dict, description="fields of every discovered instance entry (block_size, kv_events, ...)"
    )
    readiness: Literal["pod", "endpointslices"] = Field(
        "pod",
        description="what says a pod may serve: its Ready condition (pod), or its endpoint's ready condition in "
        "the EndpointSlices of service (endpointslices: readiness as the Service sees it)",
    )
    service: str | None = Field(None, min_length=1, description="the engines' Service (readiness: endpointslices)")
    unready_grace_s: float = Field(
        5.0, ge=0, description="a pod not Ready for this long is drained (new requests avoid it; streams move)"
    )
    drain_timeout_s: float = Field(
        60.0, gt=0, description="a pod that is deleted is drained this long at most, then forgotten"
    )
    watch_timeout_s: float = Field(240.0, ge=1, description="each watch request's timeoutSeconds")
    resync_s: float = Field(300.0, ge=0, description="a full re-list this often (0: only after 410 Gone)")
    backoff_s: tuple[float, float] = Field(
        (0.5, 30.0), description="first and longest wait before retrying the API after a failure"
    )

    @model_validator(mode="after")
    def _service_named(self) -> KubernetesDiscoveryConfig:
        if self.readiness == "endpointslices" and self.service is None:
            raise ValueError("readiness: endpointslices needs service: the engines' Service name")
        first, longest = self.backoff_s
        if not 0 < first <= longest:
            raise ValueError(f"backoff_s: (first, longest) with 0 < first <= longest, not {list(self.backoff_s)}")
        return self


class DiscoveryConfig(_Strict):
    kubernetes: KubernetesDiscoveryConfig | None = Field(
        None, description="watch engine pods through the Kubernetes API and serve the Ready ones"
    )

    @property
    def enabled(self) -> bool:
        return self.kubernetes is not None
