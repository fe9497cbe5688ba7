"""The ``kubernetes`` actuator's pools and what it reads off their pods (pure, no API calls).

A pool is one Deployment or StatefulSet whose pods serve one model in one configured role. A pod
serves once it runs, is Ready and has an IP; its engine answers on the pool's ``port``, or on the
pod's ``pdgate.io/port`` annotation where several pods share one host (tests, a single node with
``hostNetwork``). Which pods a scale-down takes follows the controllers: a StatefulSet always
removes its highest ordinals; a ReplicaSet removes pods that do not serve yet first, then those
with the lowest ``controller.kubernetes.io/pod-deletion-cost``, which the actuator sets on the pods
it drained (the ones with the fewest requests in flight).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from lightkube import operators
from lightkube.models.meta_v1 import LabelSelector
from lightkube.resources.core_v1 import Pod
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from pdgate.gateway.instance_config import InstanceConfig

PORT_ANNOTATION = "pdgate.io/port"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
LEAVING_COST = "-1000"  # below the default 0: the ReplicaSet deletes these pods first
SET_BY_POOL = ("id", "url", "model", "role")
Selector = dict[str, Any]


class KubePool(BaseModel):
    """One workload whose pods serve ``model`` as ``role``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    role: Literal["prefill", "decode", "both", "flex"]
    kind: Literal["Deployment", "StatefulSet"] = "Deployment"
    name: str = Field(min_length=1, description="the workload's name in the namespace")
    port: int = Field(ge=1, le=65535, description="the engine's HTTP port in the pod")
    instance: dict[str, Any] = Field(
        default_factory=dict, description="the instance entry's other fields (kind, block_size, kv_events...)"
    )

    @model_validator(mode="after")
    def _instance(self) -> KubePool:
        given = sorted(set(SET_BY_POOL) & self.instance.keys())
        if given:
            raise _invalid(f"instance.{given[0]}: set from the pod and the pool; leave it out")
        try:
            InstanceConfig.model_validate(self.entry("check", "127.0.0.1", self.port))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise _invalid(f"instance.{where}: {first['msg'].removeprefix('Value error, ')}") from None
        return self

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"

    def entry(self, pod_name: str, ip: str, port: int) -> dict[str, Any]:
        """The instance entry of one serving pod."""
        return {
            **self.instance,
            "id": pod_name,
            "url": f"http://{ip}:{port}",
            "model": self.model,
            "role": self.role,
        }


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is ``message`` as it is (no "Value error, " before it)."""
    return PydanticCustomError("invalid_pool", "{message}", {"message": message})


def selector_of(selector: LabelSelector | None) -> Selector:
    """A workload's ``spec.selector`` as lightkube's label selector (matchLabels and matchExpressions)."""
    if selector is None:
        return {}
    pairs: Selector = dict(selector.matchLabels or {})
    for expr in selector.matchExpressions or []:
        values = expr.values or []
        if expr.operator == "In":
            op: operators.Operator[Any] = operators.in_(values)
        elif expr.operator == "NotIn":
            op = operators.not_in(values)
        elif expr.operator == "Exists":
            op = operators.exists()
        elif expr.operator == "DoesNotExist":
            op = operators.not_exists()
        else:
            raise ValueError(f"unknown selector operator {expr.operator!r}")
        if expr.key in pairs:
            raise ValueError(f"selector: more than one term on {expr.key!r} is not supported")
        pairs[expr.key] = op
    return pairs


def name_of(pod: Pod) -> str:
    assert pod.metadata is not None and pod.metadata.name is not None
    return pod.metadata.name


def deleting(pod: Pod) -> bool:
    return pod.metadata is not None and pod.metadata.deletionTimestamp is not None


def serving(pod: Pod) -> bool:
    """Running, Ready and with an IP (and not on its way out)."""
    status = pod.status
    if deleting(pod) or status is None or status.phase != "Running" or not status.podIP:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def address_of(pod: Pod, pool: KubePool) -> tuple[str, int]:
    """The pod's IP and its engine's port (the ``pdgate.io/port`` annotation, else the pool's)."""
    assert pod.status is not None and pod.status.podIP is not None
    annotations = (pod.metadata.annotations if pod.metadata is not None else None) or {}
    raw = annotations.get(PORT_ANNOTATION)
    return pod.status.podIP, int(raw) if raw and raw.isdigit() else pool.port


def marked_leaving(pod: Pod) -> bool:
    """Whether the pod carries the deletion cost the actuator gives the pods it drained."""
    annotations = (pod.metadata.annotations if pod.metadata is not None else None) or {}
    return annotations.get(DELETION_COST) == LEAVING_COST


def ordinal(pod: Pod) -> int:
    """A StatefulSet pod's ordinal (``name-3`` -> 3; -1 when the name has none)."""
    match = re.search(r"-(\d+)$", name_of(pod))
    return int(match.group(1)) if match else -1


def going_pods(
    kind: str,
    pods: Sequence[Pod],
    current: int,
    wanted: int,
    leaving: Iterable[str],
    inflight: Callable[[str], int | None],
) -> list[Pod]:
    """The pods (not being deleted) that scaling from ``current`` to ``wanted`` replicas removes and
    that serve now, to drain first, in the order to drain them.

    ``leaving``: pods already drained for an earlier scale-down, which the controller is about to
    delete; ``inflight(pod)``: the requests the gateway has on it, None where it is not in the fleet.
    A StatefulSet removes its highest ordinals; a ReplicaSet first the pods that do not serve, then
    the lowest deletion cost (the drained pods): the fewest requests in flight are chosen.
    """
    live = [p for p in pods if not deleting(p)]
    if kind == "StatefulSet":
        high = [p for p in live if ordinal(p) >= wanted and serving(p)]
        return sorted(high, key=ordinal, reverse=True)
    already = set(leaving)
    count = len(live) - wanted - sum(1 for p in live if name_of(p) in already or not serving(p))
    candidates = [p for p in live if name_of(p) not in already and serving(p)]

    def cost(pod: Pod) -> tuple[bool, int, str]:
        load = inflight(name_of(pod))
        return load is not None, load or 0, name_of(pod)

    return sorted(candidates, key=cost)[: max(0, min(count, current - wanted))]
