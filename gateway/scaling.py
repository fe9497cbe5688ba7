"""The scaling plan, computed every ``scaling.interval_s`` and handed to the fleet actuator.

For every model: measure and forecast its demand (:class:`pdgate.gateway.demand.DemandMeter`),
compute how many prefill, decode and colocated instances it needs
(:func:`pdgate.scheduler.scaling_planner.plan_scale`, the role balancer's capacity model with
``scaling.headroom``), hold a smaller plan back until it has held for
``scaling.scale_down_window_s`` (the largest plan of the window counts, as Kubernetes' HPA
stabilisation window: a lull does not stop instances a burst will want back), export it
(``pdgate_plan_instances{model,role}``, ``GET /admin/plan``) and, on the leader, let the
actuator carry it out (``scaling.actuator``: none, local, kubernetes).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable

from pdgate.common.tasks import OwnedTasks, every
from pdgate.gateway.actuators import actuator_params
from pdgate.gateway.actuators.base import FleetActuator
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.costs import CostModelService
from pdgate.gateway.demand import DemandMeter, tpot_target_s, ttft_target_s
from pdgate.gateway.fleet import FleetManager
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.tracing import Tracing
from pdgate.scheduler.scaling_planner import ScalePlan, plan_scale

log = logging.getLogger("pdgate.scaling")


def stabilised(history: deque[tuple[float, ScalePlan]], now: float, window_s: float) -> ScalePlan:
    """The latest plan of ``history`` with each count raised to the largest of the last ``window_s``
    (older entries are dropped from ``history``); its reason says when a count was held up."""
    while len(history) > 1 and now - history[0][0] > window_s:
        history.popleft()
    latest = history[-1][1]
    highest = {role: max(getattr(plan, role) for _, plan in history) for role in ("prefill", "decode", "colocated")}
    held = [f"{role} {getattr(latest, role)} -> {n}" for role, n in highest.items() if n > getattr(latest, role)]
    if not held:
        return latest
    reason = f"{latest.reason}; held up by the {window_s:g} s scale-down window: {', '.join(held)}"
    return dataclasses.replace(latest, **highest, reason=reason)


class Scaling:
    """Computes each model's scaling plan and (as the leader) has the actuator apply it; one per gateway."""

    def __init__(
        self,
        config: GatewayConfig,
        cluster: Cluster,
        fleet: FleetManager,
        costs: CostModelService,
        metrics: GatewayMetrics,
        duties_here: Callable[[], bool],
    ) -> None:
        self.config = config
        self.settings = config.scaling
        self.tpot_target_s = tpot_target_s(config, config.scaling.tpot_target_ms)
        self.ttft_target_s = ttft_target_s(config)
        self.cluster = cluster
        self.costs = costs
        self.metrics = metrics
        self.duties_here = duties_here
        kind, params = actuator_params(self.settings.actuator)
        self.actuator: FleetActuator = kind(params, fleet, self.settings)
        self.plans: dict[str, ScalePlan] = {}  # model -> the plan in force (for the admin API)
        self.actions: dict[str, list[str]] = {}  # model -> what the actuator did with it last
        self.demand = DemandMeter(cluster)
        self.tracing: Tracing | None = fleet.tracing  # each action is traced when tracing is on
        self._history: dict[str, deque[tuple[float, ScalePlan]]] = {}
        self._tasks = OwnedTasks()

    async def start(self) -> None:
        await self.actuator.start()
        self._tasks.spawn(every(self.settings.interval_s, self.round, "scaling", log), "scaling")

    async def close(self) -> None:
        await self._tasks.close()
        await self.actuator.close()

    async def round(self) -> None:
        """Measure, forecast and plan every model; as the leader, apply the plans."""
        now = self.cluster.clock()
        current = self.costs.current
        configured = {i: s.spec.role for i, s in self.cluster.instances.items()}
        for model in sorted(m.name for m in self.config.models):
            snapshot = self.cluster.snapshot(model, costs=current)
            demand = self.demand.measure(model, snapshot)
            if demand is None or current is None:
                continue
            plan = plan_scale(
                model,
                snapshot.instances,
                configured,
                demand,
                current,
                tpot_target_s=self.tpot_target_s,
                prefill_utilisation=self.config.role_balancer.prefill_utilisation,
                headroom=self.settings.headroom,
                minimum=self.settings.minimum,
                maximum=self.settings.maximum,
                ttft_target_s=self.ttft_target_s,
            )
            if plan is None:
                continue
            history = self._history.setdefault(model, deque())
            history.append((now, plan))
            plan = stabilised(history, now, self.settings.scale_down_window_s)
            self.plans[model] = plan
            self.metrics.scale_plan(model, plan.prefill, plan.decode, plan.colocated)
            if self.duties_here():
                actions = await self.actuator.apply(plan)
                if actions:
                    log.warning("scaling %s: %s (%s)", model, "; ".join(actions), plan.reason)
                    self.actions[model] = actions
                    if self.tracing is not None:
                        for action in actions:
                            attributes = {"pdgate.model": model, "pdgate.action": action}
                            self.tracing.event("pdgate.scaling", {**attributes, "pdgate.reason": plan.reason})
