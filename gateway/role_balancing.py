"""The role balancer: flex instances moved between prefill and decode as the load's mix shifts.

Every ``role_balancer.interval_s``, for each model with flex instances:

* **measure** and **forecast** the demand (:class:`pdgate.gateway.demand.DemandMeter`: the
  prefill work every replica sent, the decode streams running with their context, Holt's
  smoothing for the next interval);
* **plan** the split (:func:`pdgate.scheduler.role_planner.plan_roles`: prefill capacity at a
  utilisation that keeps the TTFT target, decode capacity at the TPOT target, from the cost
  model) and move at most one flex instance toward it, through
  :meth:`FleetManager.set_role` (reason ``balancer``: its streams move away when it leaves
  decode, every replica applies it), once it has kept its role ``min_dwell_s``.

With replicas only the leader plans and moves (``duties_here``); every replica measures, so a
new leader has a forecast. The planned split is exported as ``pdgate_role_plan_instances``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pdgate.common.tasks import OwnedTasks, every
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.costs import CostModelService
from pdgate.gateway.demand import DemandMeter, tpot_target_s, ttft_target_s
from pdgate.gateway.fleet import FleetChangeError, FleetManager
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.scheduler.role_planner import RolePlan, plan_roles

log = logging.getLogger("pdgate.roles")


class RoleBalancing:
    """Measures each model's demand, forecasts it and moves flex instances; one per gateway."""

    def __init__(
        self,
        config: GatewayConfig,
        cluster: Cluster,
        fleet: FleetManager,
        costs: CostModelService,
        metrics: GatewayMetrics,
        duties_here: Callable[[], bool],
    ) -> None:
        self.settings = config.role_balancer
        self.tpot_target_s = tpot_target_s(config)
        self.ttft_target_s = ttft_target_s(config)
        self.cluster = cluster
        self.fleet = fleet
        self.costs = costs
        self.metrics = metrics
        self.duties_here = duties_here
        self.plans: dict[str, RolePlan] = {}  # model -> the latest plan (for the admin API)
        self.demand = DemandMeter(cluster)
        self._tasks = OwnedTasks()

    def start(self) -> None:
        self._tasks.spawn(every(self.settings.interval_s, self.round, "role balancer", log), "role-balancer")

    async def close(self) -> None:
        await self._tasks.close()

    async def round(self) -> None:
        """Measure, forecast, plan and (as the leader) move one flex instance per model."""
        now = self.cluster.clock()
        current = self.costs.current
        for model in sorted({s.spec.model for s in self.cluster.instances.values() if s.flexible}):
            snapshot = self.cluster.snapshot(model, costs=current)
            demand = self.demand.measure(model, snapshot)
            if demand is None or current is None:
                continue
            if not self.duties_here():
                continue
            movable = {
                i
                for i, s in self.cluster.instances.items()
                if s.flexible and now - s.role_since >= self.settings.min_dwell_s
            }
            plan = plan_roles(
                snapshot.instances,
                demand,
                current,
                tpot_target_s=self.tpot_target_s,
                prefill_utilisation=self.settings.prefill_utilisation,
                hysteresis=self.settings.hysteresis,
                movable=movable,
                ttft_target_s=self.ttft_target_s,
            )
            if plan is None:
                continue
            self.plans[model] = plan
            self.metrics.role_plan(model, plan.prefill, plan.decode)
            if plan.move is not None:
                instance_id, role = plan.move
                log.warning("role balancer: %s to %s (%s): %s", instance_id, role, model, plan.reason)
                try:
                    await self.fleet.set_role(instance_id, role, reason="balancer")
                except FleetChangeError as exc:
                    log.warning("role balancer: %s not moved: %s", instance_id, exc.message)
