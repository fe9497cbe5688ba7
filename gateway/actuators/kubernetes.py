"""``kubernetes``: a Deployment or StatefulSet per pool, scaled through the Kubernetes API (lightkube).

``scaling.actuator.parameters``: ``kubeconfig`` (a file; none: lightkube's default, the pod's
service account in a cluster, else ``$KUBECONFIG``), ``context``, ``namespace`` and ``pools``,
each a workload (``kind``, ``name``) whose pods serve ``model`` as ``role``, with the engine's HTTP
``port`` in the pod and ``instance``, the other fields of each pod's instance entry.

* **Discovery**, every ``poll_interval_s``: the pods of each workload's selector that run, are Ready
  and have an IP join the fleet (id: the pod's name; url: ``http://{podIP}:{port}``); a pod this
  actuator added that is gone or being deleted leaves it (drained up to ``drain_timeout_s``, then
  forced). Instances it did not add are never removed. Several pods on one host (tests, one node
  with ``hostNetwork``) each give their engine's port in the pod annotation ``pdgate.io/port``,
  which overrides the pool's ``port``; in a cluster the pool's port is used.
* :meth:`KubernetesActuator.apply` sets each pool's ``replicas`` (the scale subresource) to the
  plan. Down, it drains first: the pods that go (a StatefulSet's highest ordinals; in a Deployment
  the fewest requests in flight, marked with ``controller.kubernetes.io/pod-deletion-cost: -1000``
  so that the ReplicaSet deletes exactly those) leave the fleet through
  :meth:`FleetManager.remove`, and only then is ``replicas`` lowered. A drain that is refused (the
  last serving path, a drain that did not finish) keeps that pod and those after it.
* Failures (403, 404, no connection, a bad kubeconfig) are logged on ``pdgate.scaling`` with the
  workload's name and reported as a line; the next call tries again.

Needs RBAC: get/patch on ``deployments/scale`` or ``statefulsets/scale``, get on the workloads,
list on pods and patch on pods (the deletion cost).
"""

from __future__ import annotations

import asyncio
import logging

import lightkube
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.apps_v1 import Deployment, DeploymentScale, StatefulSet, StatefulSetScale
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType
from pydantic import Field

from pdgate.common.tasks import OwnedTasks
from pdgate.gateway.actuators.base import ActuatorParams, FleetActuator
from pdgate.gateway.actuators.kube_pools import (
    DELETION_COST,
    LEAVING_COST,
    KubePool,
    address_of,
    deleting,
    going_pods,
    marked_leaving,
    name_of,
    ordinal,
    selector_of,
    serving,
)
from pdgate.gateway.fleet import FleetChangeError, FleetManager
from pdgate.gateway.planning_config import ScalingConfig
from pdgate.scheduler.scaling_planner import ScalePlan

log = logging.getLogger("pdgate.scaling")

WORKLOADS: dict[str, type[Deployment] | type[StatefulSet]] = {"Deployment": Deployment, "StatefulSet": StatefulSet}
SCALES: dict[str, type[DeploymentScale] | type[StatefulSetScale]] = {
    "Deployment": DeploymentScale,
    "StatefulSet": StatefulSetScale,
}


class KubernetesParams(ActuatorParams):
    kubeconfig: str | None = Field(None, description="kubeconfig file (default: in-cluster, else $KUBECONFIG)")
    context: str | None = Field(None, description="the kubeconfig context (default: its current one)")
    namespace: str = Field("default", min_length=1)
    pools: list[KubePool] = Field(min_length=1)
    poll_interval_s: float = Field(5.0, gt=0, description="how often pods are listed")


class KubernetesActuator(FleetActuator):
    """Scales each pool's workload to the plan and keeps the fleet in step with its Ready pods."""

    type_name = "kubernetes"
    Params = KubernetesParams

    def __init__(self, params: ActuatorParams, fleet: FleetManager, settings: ScalingConfig) -> None:
        super().__init__(params, fleet, settings)
        assert isinstance(params, KubernetesParams)
        self.kube = params
        self._added: dict[str, KubePool] = {}  # instance id -> the pool of the pod this actuator added
        self._leaving: dict[str, str] = {}  # pod -> pool key: drained for a scale-down, kept out until gone
        self._busy: set[str] = set()  # pools a scale-down is draining
        self._removing: set[str] = set()
        self._add_failures: dict[str, str] = {}  # pod -> why it could not join (logged once)
        self._read_failures: dict[str, str] = {}  # pool key -> why its pods could not be listed (logged once)
        self._client: AsyncClient | None = None
        self._tasks = OwnedTasks()

    async def start(self) -> None:
        self._tasks.spawn(self._discovery(), "kubernetes-discovery")

    async def close(self) -> None:
        await self._tasks.close()
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _api(self) -> AsyncClient:
        """The API client, made on first use (a kubeconfig that cannot be read fails the call, not the gateway)."""
        if self._client is None:
            p = self.kube
            config = KubeConfig.from_file(p.kubeconfig) if p.kubeconfig else KubeConfig.from_env()
            self._client = AsyncClient(config.get(p.context), namespace=p.namespace, field_manager="pdgate")
        return self._client

    # ------------------------------------------------------------ discovery
    async def _discovery(self) -> None:
        while True:
            await self.discover()
            await asyncio.sleep(self.kube.poll_interval_s)

    async def discover(self) -> None:
        """One pass: every pool's serving pods join the fleet, the ones gone leave it."""
        for pool in self.kube.pools:
            try:
                replicas, pods = await self._read(pool)
            except Exception as exc:  # the next pass tries again
                message = why(exc)
                if self._read_failures.get(pool.key) != message:
                    log.warning("kubernetes: cannot list the pods of %s: %s", pool.key, message)
                self._read_failures[pool.key] = message
                continue
            if self._read_failures.pop(pool.key, None) is not None:
                log.warning("kubernetes: the pods of %s are listed again", pool.key)
            await self._sync(pool, replicas, pods)

    async def _read(self, pool: KubePool) -> tuple[int, list[Pod]]:
        """The workload's ``spec.replicas`` and the pods of its selector."""
        api = self._api()
        workload = await api.get(WORKLOADS[pool.kind], pool.name, namespace=self.kube.namespace)
        spec = workload.spec
        labels = selector_of(spec.selector if spec is not None else None)
        if not labels:
            raise ValueError(f"{pool.key} has no label selector")
        pods = [p async for p in api.list(Pod, namespace=self.kube.namespace, labels=labels)]
        return (spec.replicas if spec is not None and spec.replicas is not None else 1), pods

    async def _sync(self, pool: KubePool, replicas: int, pods: list[Pod]) -> None:
        present = {name_of(p): p for p in pods}
        live = [name for name, p in present.items() if not deleting(p)]
        for name, key in list(self._leaving.items()):
            if key != pool.key:
                continue
            kept = pool.key not in self._busy and len(live) <= replicas and name in live
            if name not in present or deleting(present[name]) or kept:  # gone, going, or the controller kept it
                del self._leaving[name]
        for name, pod in present.items():
            if deleting(pod):
                if name in self._added:
                    self._remove_later(name, "is being deleted")
            elif serving(pod) and name not in self._leaving and name not in self.fleet.cluster.instances:
                await self._add(pool, pod)
        for name, owner in list(self._added.items()):
            if owner is pool and name not in present:
                self._remove_later(name, "is gone")

    async def _add(self, pool: KubePool, pod: Pod) -> None:
        name = name_of(pod)
        try:
            await self.fleet.add(pool.entry(name, *address_of(pod, pool)))
        except Exception as exc:  # a bad entry (400), or it joined meanwhile (409)
            message = why(exc)
            if self._add_failures.get(name) != message:
                log.error("kubernetes: pod %s of %s cannot join the fleet: %s", name, pool.key, message)
            self._add_failures[name] = message
            return
        self._add_failures.pop(name, None)
        self._added[name] = pool
        log.info("kubernetes: pod %s of %s joined the fleet as %s", name, pool.key, pool.role)

    def _remove_later(self, name: str, reason: str) -> None:
        if name not in self._removing:
            self._removing.add(name)
            self._tasks.spawn(self._remove_gone(name, reason), f"kubernetes-remove-{name}")

    async def _remove_gone(self, name: str, reason: str) -> None:
        try:
            if name in self.fleet.cluster.instances:
                await self.fleet.remove(name, timeout_s=self.settings.drain_timeout_s, force=True)
            log.warning("kubernetes: pod %s %s; it left the fleet", name, reason)
            self._added.pop(name, None)
        except Exception as exc:
            log.error("kubernetes: removing pod %s (%s) failed: %s", name, reason, why(exc))
        finally:
            self._removing.discard(name)

    # ---------------------------------------------------------------- apply
    async def apply(self, plan: ScalePlan) -> list[str]:
        lines = []
        for pool in self.kube.pools:
            if pool.model != plan.model:
                continue
            wanted = plan.wanted(pool.role)
            try:
                line = await self._scale(pool, wanted)
            except Exception as exc:
                line = f"failed to scale {pool.key} ({pool.role}) to {wanted}: {why(exc)}"
                log.warning("kubernetes: %s", line)
            if line:
                lines.append(line)
        return lines

    async def _scale(self, pool: KubePool, wanted: int) -> str | None:
        scale_cls = SCALES[pool.kind]
        api = self._api()
        scale = await api.get(scale_cls, pool.name, namespace=self.kube.namespace)
        current = scale.spec.replicas if scale.spec is not None and scale.spec.replicas is not None else 0
        if wanted == current:
            return None
        if wanted > current:
            for name in [n for n, key in self._leaving.items() if key == pool.key]:
                del self._leaving[name]  # not deleted after all: they join again
            await self._set_replicas(pool, wanted)
            return self._scaled(pool, current, wanted)
        self._busy.add(pool.key)
        try:
            return await self._scale_down(pool, current, wanted)
        finally:
            self._busy.discard(pool.key)

    async def _scale_down(self, pool: KubePool, current: int, wanted: int) -> str:
        _, pods = await self._read(pool)
        mine = [n for n, key in self._leaving.items() if key == pool.key]
        going = going_pods(pool.kind, pods, current, wanted, mine, self._inflight)
        drained: list[str] = []
        refusal = ""
        for pod in going:
            name = name_of(pod)
            state = self.fleet.cluster.instances.get(name)
            was_draining = state is not None and state.draining  # an operator's drain is theirs to undo
            self._leaving[name] = pool.key  # discovery keeps it out from now on
            try:
                if state is not None:
                    await self.fleet.remove(name, timeout_s=self.settings.drain_timeout_s)
            except Exception as exc:  # refused (409): the last serving path, or a drain that did not finish
                del self._leaving[name]
                if state is not None and not was_draining and name in self.fleet.cluster.instances:
                    await self.fleet.undrain(name)  # a drain that timed out leaves it drained
                refusal = f"cannot drain pod {name}: {why(exc)}"
                break
            self._added.pop(name, None)
            drained.append(name)
        target = self._target(pool, current, wanted, going, drained)
        try:
            if pool.kind == "Deployment":
                # a pod marked by an earlier scale-down that did not take it would be deleted before these
                stale = [name_of(p) for p in pods if marked_leaving(p) and not deleting(p)]
                for name in stale:
                    if name not in self._leaving:
                        await self._deletion_cost(name, None)
                for name in drained:
                    await self._deletion_cost(name, LEAVING_COST)
            if target < current:
                await self._set_replicas(pool, target)
        except BaseException:
            for name in drained:  # not deleted: discovery adds them again
                self._leaving.pop(name, None)
            raise
        done = f", drained {', '.join(drained)}" if drained else ""
        if not refusal:
            return self._scaled(pool, current, target) + done
        if target < current:
            line = f"scaled {pool.key} from {current} to {target} ({pool.role}; plan {wanted}){done}; {refusal}"
        else:
            line = f"kept {pool.key} at {current} ({pool.role}; plan {wanted}): {refusal}"
        log.warning("kubernetes: %s", line)
        return line

    @staticmethod
    def _target(pool: KubePool, current: int, wanted: int, going: list[Pod], drained: list[str]) -> int:
        """The replicas that remove only pods that were drained (or do not serve)."""
        kept = going[len(drained) :]
        if not kept:
            return wanted
        if pool.kind == "StatefulSet":
            return min(current, ordinal(kept[0]) + 1)  # the highest ordinal that stays
        return min(current, wanted + len(kept))

    async def _deletion_cost(self, pod: str, cost: str | None) -> None:
        body = {"metadata": {"annotations": {DELETION_COST: cost}}}  # None: the annotation is removed
        await self._api().patch(Pod, pod, body, namespace=self.kube.namespace, patch_type=PatchType.MERGE)

    async def _set_replicas(self, pool: KubePool, replicas: int) -> None:
        body = {"spec": {"replicas": replicas}}
        scale_cls = SCALES[pool.kind]
        await self._api().patch(scale_cls, pool.name, body, namespace=self.kube.namespace, patch_type=PatchType.MERGE)

    def _scaled(self, pool: KubePool, old: int, new: int) -> str:
        line = f"scaled {pool.key} from {old} to {new} ({pool.role})"
        log.warning("kubernetes: %s", line)
        return line

    def _inflight(self, name: str) -> int | None:
        state = self.fleet.cluster.instances.get(name)
        return state.inflight_requests if state is not None else None


def why(exc: BaseException) -> str:
    """An API error as ``403 Forbidden: message``; other failures by their type and text."""
    if isinstance(exc, lightkube.ApiError):
        status = exc.status
        return f"{status.code} {status.reason}: {status.message}"
    if isinstance(exc, FleetChangeError):
        return exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = ["KubernetesActuator", "KubernetesParams", "why"]
