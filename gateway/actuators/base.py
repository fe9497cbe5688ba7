"""The fleet actuator contract, and the ``none`` kind (recommend only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from pdgate.scheduler.scaling_planner import ScalePlan

if TYPE_CHECKING:
    from pdgate.gateway.fleet import FleetManager
    from pdgate.gateway.planning_config import ScalingConfig


class ActuatorParams(BaseModel):
    """Base of every actuator's ``scaling.actuator.parameters`` (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


class FleetActuator:
    """Carries scaling plans out on one gateway (the leader, with replicas).

    Contract:

    * :meth:`apply` is called every ``scaling.interval_s`` with each model's plan (already held
      back on the way down by ``scaling.scale_down_window_s``); it is idempotent: it compares
      the plan with what runs and changes only the difference, and returns one line per action
      it took (for the log and ``GET /admin/plan``).
    * New instances join the gateway through :meth:`FleetManager.add` once they answer; an
      instance leaves through :meth:`FleetManager.remove`, which drains it first (its streams
      move away, new requests go elsewhere) for up to ``scaling.drain_timeout_s``, and only then
      is it stopped. A failed action is logged and retried at the next call, never raised out.
    * :meth:`start` and :meth:`close` own every background task and process the actuator made.
    """

    type_name: ClassVar[str] = ""
    Params: ClassVar[type[ActuatorParams]] = ActuatorParams

    def __init__(self, params: ActuatorParams, fleet: FleetManager, settings: ScalingConfig) -> None:
        self.params = params
        self.fleet = fleet
        self.settings = settings

    @classmethod
    def validate_params(cls, raw: dict[str, Any]) -> ActuatorParams:
        """The parameters checked (pydantic's ``ValidationError`` names what is wrong)."""
        return cls.Params.model_validate(raw)

    async def start(self) -> None:
        """Begin (connect, start watchers); called once before the first :meth:`apply`."""

    async def apply(self, plan: ScalePlan) -> list[str]:
        """Bring ``plan.model``'s pools toward the plan; the actions taken, one line each."""
        return []

    async def close(self) -> None:
        """Stop every task; processes the actuator started are stopped too."""


class RecommendOnly(FleetActuator):
    """``none``: changes nothing; the plan is only exported (metrics and ``GET /admin/plan``)."""

    type_name = "none"
