"""The planning sections: ``role_balancer`` (flex instances moved between prefill and decode) and
``scaling`` (how many prefill, decode and colocated instances the forecast load needs, and the
actuator that carries it out)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdgate.scheduler.scaling_planner import POOL_ROLES

PoolRoleName = Literal["prefill", "decode", "both", "flex"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoleBalancerConfig(_Strict):
    """Moving flex instances between the prefill and decode roles as the load's mix shifts
    (``gateway/role_balancing.py``); a leader-only duty with several replicas."""

    enabled: bool = Field(False, description="move flex instances between prefill and decode by the load")
    interval_s: float = Field(5.0, gt=0, description="how often the demand is measured and the split planned")
    min_dwell_s: float = Field(30.0, ge=0, description="an instance keeps a role at least this long")
    hysteresis: float = Field(
        0.2, ge=0, description="move only when the busier pool's utilisation drops by this share or more"
    )
    prefill_utilisation: float = Field(
        0.85,
        gt=0,
        le=1,
        description="the most a prefill instance may be busy; the TTFT target lowers it (its queue's tail wait "
        "plus a prefill must keep the target)",
    )
    ttft_target_ms: float | None = Field(
        None, gt=0, description="the TTFT prefill pools are sized for (default: the default SLO's; none: the cap alone)"
    )
    tpot_target_ms: float | None = Field(
        None,
        gt=0,
        description="the TPOT decode batches are sized for (default: the default SLO's, else 100 ms; a stricter "
        "TPOT SLO of the streams in flight wins)",
    )


class ActuatorConfig(_Strict):
    """Which actuator carries the plan out; its ``parameters`` are checked by the actuator's own
    model when the gateway is built (:func:`pdgate.gateway.actuators.build_actuator`)."""

    type: str = Field("none", description="none (recommend only), local (this gateway's child engines), kubernetes")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the actuator's own settings")


class ScalingConfig(_Strict):
    """The scaling plan (``pdgate_plan_instances``, ``GET /admin/plan``) and its actuator; a
    leader-only duty with several replicas."""

    enabled: bool = Field(False, description="compute the scaling plan (and let the actuator carry it out)")
    interval_s: float = Field(15.0, gt=0, description="how often the plan is computed and applied")
    headroom: float = Field(
        0.2, ge=0, description="spare capacity on top of the forecast (its error, and an instance's start-up time)"
    )
    scale_down_window_s: float = Field(
        300.0,
        ge=0,
        description="a smaller plan is carried out only once it has held this long (the largest plan of the "
        "window counts, as Kubernetes' HPA stabilisation window)",
    )
    drain_timeout_s: float = Field(
        120.0, gt=0, description="an instance leaving is drained up to this long before it is stopped"
    )
    minimum: dict[PoolRoleName, int] = Field(
        default_factory=dict, description="the fewest instances per role (a role the model serves in keeps one)"
    )
    maximum: dict[PoolRoleName, int] = Field(default_factory=dict, description="the most instances per role")
    tpot_target_ms: float | None = Field(
        None, gt=0, description="the TPOT decode pools are sized for (default: role_balancer's, else the SLO's)"
    )
    actuator: ActuatorConfig = Field(default_factory=ActuatorConfig)

    @model_validator(mode="after")
    def _bounds(self) -> ScalingConfig:
        for role in POOL_ROLES:
            low, high = self.minimum.get(role, 0), self.maximum.get(role)
            if low < 0 or (high is not None and high < max(1, low)):
                raise ValueError(f"{role}: maximum {high} is below the minimum {max(1, low)}")
        return self
