"""Fleet actuators: they carry a scaling plan out (start and stop instances), and never decide.

The kinds (``scaling.actuator.type``): ``none`` (recommend only: the plan is exported and
served by ``GET /admin/plan`` for an operator, an HPA or KEDA to act on), ``local`` (engines
started and stopped as this gateway's children), ``kubernetes`` (a Deployment or StatefulSet
per role scaled through the Kubernetes API). :func:`actuator_class` finds one by name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pydantic import ValidationError

from pdgate.gateway.actuators.base import ActuatorParams, FleetActuator

if TYPE_CHECKING:
    from pdgate.gateway.planning_config import ActuatorConfig

ACTUATORS: dict[str, str] = {
    "none": "pdgate.gateway.actuators.base:RecommendOnly",
    "local": "pdgate.gateway.actuators.local:LocalActuator",
    "kubernetes": "pdgate.gateway.actuators.kubernetes:KubernetesActuator",
}


def actuator_class(name: str) -> type[FleetActuator]:
    """The actuator class of kind ``name`` (imported on first use: ``kubernetes`` needs the
    ``kubernetes`` extra). Raises ``ValueError`` for an unknown kind or a missing extra."""
    target = ACTUATORS.get(name)
    if target is None:
        raise ValueError(f"unknown actuator {name!r}; known: {', '.join(sorted(ACTUATORS))}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"actuator {name!r} needs the package {exc.name!r}: pip install 'pdgate[{name}]'") from None
    cls: type[FleetActuator] = getattr(module, attr)
    return cls


def actuator_params(config: ActuatorConfig) -> tuple[type[FleetActuator], ActuatorParams]:
    """The actuator class of ``config.type`` and its checked parameters; ``ValueError`` naming the
    field (``scaling.actuator.parameters.<field>: <problem>``) for a bad one."""
    try:
        cls = actuator_class(config.type)
    except ValueError as exc:
        raise ValueError(f"scaling.actuator.type: {exc}") from None
    try:
        return cls, cls.validate_params(config.parameters)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"scaling.actuator.parameters.{where}: {first['msg']}") from None
