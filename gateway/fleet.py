"""A fleet that changes while the gateway serves: instances added, removed and replaced at run time.

Every change goes through :class:`FleetManager`, whoever asks for it: the admin API
(``POST /admin/instances``, ``DELETE /admin/instances/{id}``) or a reload of the config file
(SIGHUP on ``pdgate serve``; :meth:`FleetManager.apply`).

* **Add**: the instance is validated as a config entry (same fields, same checks), its KV
  events followed, its load and health read, and it takes requests from the next placement.
  A new cost group gets its latency prior.
* **Remove**: the instance is drained first (no new requests; its streams move away with the
  migration controller, other requests finish where they are), then forgotten: no lease, no
  prefix-index entry, no metric series is left. Removing the last serving path of a model is
  refused unless forced; so is a removal whose drain did not finish in time.
* **Reload**: the instances of the new file against those served now, by id: new ones added,
  missing ones removed, changed ones replaced (removed, then added). Other settings need a
  restart; a reload names those it did not apply.
* **Roles** (:meth:`FleetManager.set_role`): a flex instance (vLLM ``kv_both``, the sim) serves
  as prefill, decode or both from the next placement on; leaving the decode role, its streams
  move away.
* **Replicas** (:meth:`FleetManager.share`): with shared state, every change made here (added,
  removed, drained, undrained, a role) is written to it, and the other replicas' changes are applied
  here as they come: a replica removes an instance another one removed (draining its own
  streams on it first), and one that starts catches up with every change made before it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pdgate.common.tasks import OwnedTasks
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import GatewayConfig, has_serving_path
from pdgate.gateway.costs import CostModelService
from pdgate.gateway.instance_config import InstanceConfig
from pdgate.gateway.instance_state import InstanceState, Role
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.migration import MigrationController
from pdgate.gateway.sharing import SharedState
from pdgate.gateway.tracing import Tracing

log = logging.getLogger("pdgate.fleet")

FLEET_BUCKET = "pdgate_fleet"  # instance id -> {"op": "add", "entry": {...}} | {"op": "remove"}
DRAIN_BUCKET = "pdgate_drains"  # instance id -> {"draining": bool}
ROLE_BUCKET = "pdgate_roles"  # instance id -> {"role": "prefill" | "decode" | "both", "reason": str} (flex ones)
ROLES = ("prefill", "decode", "both")


class FleetChangeError(Exception):
    """A change that cannot be made: ``status`` is the HTTP status the admin API answers with."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass
class ReloadReport:
    """What a reload did (and what it could not do without a restart)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    not_applied: list[str] = field(default_factory=list)  # top-level settings that need a restart


class FleetManager:
    """Adds and removes instances of a running gateway; one per gateway. Changes run one at a time."""

    def __init__(
        self,
        config: GatewayConfig,
        cluster: Cluster,
        migrations: MigrationController,
        metrics: GatewayMetrics,
        costs: CostModelService | None = None,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.migrations = migrations
        self.metrics = metrics
        self.costs = costs
        self.shared: SharedState | None = None
        self.tracing: Tracing | None = None  # role changes are traced when tracing is on
        self._lock = asyncio.Lock()
        self._tasks = OwnedTasks()
        self._removals: dict[str, asyncio.Task[None]] = {}  # another replica's removals, draining here

    def share(self, shared: SharedState) -> None:
        """Share this gateway's fleet changes and drains with the other replicas (before ``shared`` starts)."""
        self.shared = shared
        shared.watch(FLEET_BUCKET, self._on_fleet_change)
        shared.watch(DRAIN_BUCKET, self._on_drain_change)
        shared.watch(ROLE_BUCKET, self._on_role_change)

    async def close(self) -> None:
        """Cancel and await the changes other replicas started here."""
        await self._tasks.close()

    # ---------------------------------------------------------------- drains
    async def drain(self, instance_id: str) -> None:
        """Keep new requests off ``instance_id`` and move its streams away, on every replica."""
        self.migrations.drain(instance_id)
        await self._publish(DRAIN_BUCKET, instance_id, {"draining": True})

    async def undrain(self, instance_id: str) -> None:
        self.migrations.undrain(instance_id)
        await self._publish(DRAIN_BUCKET, instance_id, {"draining": False})

    # ---------------------------------------------------------------- roles
    async def set_role(self, instance_id: str, role: str, reason: str = "admin") -> InstanceState:
        """Make a flex instance serve in ``role`` from the next placement on, on every replica.

        Leaving the decode role, its streams move away with the migration controller (they finish
        where they are when migration is off). Refused: 404 for an unknown instance, 400 for an
        unknown role, 409 for an instance that is not flex, or when the change leaves its model
        without a prefill or a decode path.
        """
        state = self.cluster.instances.get(instance_id)
        if state is None:
            raise FleetChangeError(404, f"no instance {instance_id!r}", param="instance")
        if role not in ROLES:
            raise FleetChangeError(400, f"role must be one of {', '.join(ROLES)}, not {role!r}", param="role")
        if not state.flexible:
            raise FleetChangeError(
                409,
                f"instance {instance_id!r} is configured as {state.spec.role!r}; only a flex instance changes its role "
                "while it serves",
                param="role",
            )
        if role != state.role:
            others = [s.role for s in self.cluster.for_model(state.spec.model) if s is not state and not s.draining]
            if not has_serving_path([*others, role]):
                raise FleetChangeError(
                    409,
                    f"serving as {role!r}, {instance_id!r} would leave model {state.spec.model!r} without a "
                    f"{'decode' if role == 'prefill' else 'prefill'} path",
                    param="role",
                )
            self._apply_role(state, role, reason)  # type: ignore[arg-type]
        await self._publish(ROLE_BUCKET, instance_id, {"role": role, "reason": reason})
        return state

    def _apply_role(self, state: InstanceState, role: Role, reason: str) -> None:
        old, state.role, state.role_since = state.role, role, self.cluster.clock()
        self.metrics.role_changed(state.spec.id, old, role, reason)
        if self.tracing is not None:
            attributes = {"pdgate.instance": state.spec.id, "pdgate.role.from": old, "pdgate.role.to": role}
            self.tracing.event("pdgate.role_change", {**attributes, "pdgate.reason": reason})
        log.warning("instance %s serves as %s (was %s): %s", state.spec.id, role, old, reason)

    async def _on_role_change(self, instance_id: str, change: dict[str, Any]) -> None:
        """Another replica (or this one before a restart) changed a flex instance's role."""
        state = self.cluster.instances.get(instance_id)
        role = change.get("role")
        if state is not None and state.flexible and role in ROLES and role != state.role:
            self._apply_role(state, role, str(change.get("reason") or "another replica"))

    # ------------------------------------------------------------------ add
    async def add(self, entry: InstanceConfig | dict[str, Any]) -> InstanceState:
        """Serve one more instance; raises :class:`FleetChangeError` (400, 409) for a bad entry."""
        inst = entry if isinstance(entry, InstanceConfig) else self.validate(entry)
        async with self._lock:
            return await self._add(inst)

    def validate(self, entry: dict[str, Any]) -> InstanceConfig:
        """An instance entry checked as the config file's are (400 with the first problem)."""
        try:
            inst = InstanceConfig.model_validate(entry)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "instance"
            raise FleetChangeError(400, f"{where}: {first['msg']}", param=where) from None
        models = {m.name for m in self.config.models}
        if inst.model not in models:
            raise FleetChangeError(400, f"model {inst.model!r} is not one of models {sorted(models)}", param="model")
        return inst

    async def _add(self, inst: InstanceConfig, *, publish: bool = True) -> InstanceState:
        instance_id = inst.spec().id
        if instance_id in self.cluster.instances:
            raise FleetChangeError(409, f"instance {instance_id!r} exists already", param="id")
        if self.costs is not None:
            self.costs.add_priors({inst.cost_key(): inst.prior_spec()})
        state = await self.cluster.add_instance(inst)
        self.metrics.remember_instance(instance_id)
        self.config.instances.append(inst)
        if publish:
            entry = {**inst.model_dump(mode="json", exclude_none=True), "id": instance_id}
            await self._publish(FLEET_BUCKET, instance_id, {"op": "add", "entry": entry})
        return state

    # --------------------------------------------------------------- remove
    async def remove(self, instance_id: str, *, timeout_s: float, force: bool = False) -> InstanceState:
        """Drain ``instance_id`` (up to ``timeout_s``), then stop serving it.

        Refused (409) when it is the last serving path of its model or when the drain did not
        finish in time (the instance then stays drained); ``force`` removes it anyway. Other
        changes (an add, above all) do not wait for the drain: only its start and the final
        removal hold the lock.
        """
        async with self._lock:
            state = self._start_removal(instance_id, force)
        await self._publish(DRAIN_BUCKET, instance_id, {"draining": True})  # every replica stops sending there
        drained = await self.migrations.wait_drained(instance_id, timeout_s)
        async with self._lock:
            if self.cluster.instances.get(instance_id) is not state:  # removed (or replaced) meanwhile
                return state
            return await self._finish_removal(state, drained, timeout_s, force)

    async def _remove(self, instance_id: str, timeout_s: float, force: bool, *, publish: bool = True) -> InstanceState:
        """:meth:`remove` with the lock held throughout (a reload's changes, one after the other)."""
        state = self._start_removal(instance_id, force)
        drained = await self.migrations.wait_drained(instance_id, timeout_s)
        return await self._finish_removal(state, drained, timeout_s, force, publish=publish)

    def _start_removal(self, instance_id: str, force: bool) -> InstanceState:
        state = self.cluster.instances.get(instance_id)
        if state is None:
            raise FleetChangeError(404, f"no instance {instance_id!r}", param="instance")
        if not force and not self._servable_without(state):
            raise FleetChangeError(
                409,
                f"removing {instance_id!r} leaves model {state.spec.model!r} without a serving path "
                "(add its replacement first, or force)",
            )
        self.migrations.drain(instance_id)
        return state

    async def _finish_removal(
        self, state: InstanceState, drained: bool, timeout_s: float, force: bool, *, publish: bool = True
    ) -> InstanceState:
        instance_id = state.spec.id
        if not drained and not force:
            raise FleetChangeError(
                409,
                f"instance {instance_id!r} still runs {state.inflight_requests} request(s) after {timeout_s:g} s "
                "of draining; it stays drained (remove again later, or force)",
            )
        await self.cluster.remove_instance(instance_id)
        self.metrics.forget_instance(instance_id)
        self.config.instances[:] = [i for i in self.config.instances if i.spec().id != instance_id]
        if publish:
            await self._publish(FLEET_BUCKET, instance_id, {"op": "remove"})
            # its drain and role end with it: an instance added later under the same id (a
            # StatefulSet's new pod) must not replay them
            await self._publish(DRAIN_BUCKET, instance_id, {"draining": False})
            await self._publish(ROLE_BUCKET, instance_id, {"role": None, "reason": "removed"})
        return state

    # --------------------------------------------------------------- replicas
    async def _publish(self, bucket: str, instance_id: str, value: dict[str, Any]) -> None:
        if self.shared is not None:
            await self.shared.put(bucket, instance_id, value)

    async def _on_fleet_change(self, instance_id: str, change: dict[str, Any]) -> None:
        """Another replica added or removed an instance (or did so before this one started)."""
        op = change.get("op")
        if op == "add":
            inst = InstanceConfig.model_validate(change["entry"])
            pending = self._removals.get(instance_id)
            if pending is not None or self._served_entry(instance_id) not in (None, inst):
                # added again while this replica still drains its removal (a pod relabelled: removed,
                # then added at once), or added anew with another entry (a replay after a
                # reconnection keeps only the newest): applied once the old one is gone
                self._tasks.spawn(self._remote_replace(instance_id, inst, pending), f"fleet-replace-{instance_id}")
            elif instance_id not in self.cluster.instances:
                async with self._lock:
                    if instance_id not in self.cluster.instances:
                        await self._add(inst, publish=False)
        elif op == "remove" and instance_id in self.cluster.instances and instance_id not in self._removals:
            task = self._tasks.spawn(self._remote_remove(instance_id), f"fleet-remove-{instance_id}")
            self._removals[instance_id] = task
            task.add_done_callback(functools.partial(self._removed, instance_id))

    def _removed(self, instance_id: str, _task: asyncio.Task[None]) -> None:
        self._removals.pop(instance_id, None)

    def _served_entry(self, instance_id: str) -> InstanceConfig | None:
        return next((i for i in self.config.instances if i.spec().id == instance_id), None)

    async def _remote_replace(self, instance_id: str, inst: InstanceConfig, pending: asyncio.Task[None] | None) -> None:
        """Another replica's add of ``instance_id``, after this replica's removal of the old one."""
        if pending is not None:
            await asyncio.wait([pending])
        served = self._served_entry(instance_id)
        if served is not None and served != inst and instance_id not in self._removals:
            await self._remote_remove(instance_id)
        async with self._lock:
            if instance_id not in self.cluster.instances:
                await self._add(inst, publish=False)

    async def _remote_remove(self, instance_id: str) -> None:
        """Drain this replica's own streams on the instance (up to ``admin.drain_wait_s``), then forget it:
        the replica that asked checked that the fleet can do without it."""
        async with self._lock:
            if instance_id not in self.cluster.instances:
                return
            state = self._start_removal(instance_id, True)
        await self.migrations.wait_drained(instance_id, self.config.admin.drain_wait_s)
        async with self._lock:
            if self.cluster.instances.get(instance_id) is state:
                await self._finish_removal(state, True, self.config.admin.drain_wait_s, True, publish=False)

    async def _on_drain_change(self, instance_id: str, change: dict[str, Any]) -> None:
        if instance_id not in self.cluster.instances or instance_id in self._removals:  # (removed: stays drained)
            return
        if change.get("draining"):
            self.migrations.drain(instance_id)
        else:
            self.migrations.undrain(instance_id)

    def _servable_without(self, leaving: InstanceState) -> bool:
        return has_serving_path(
            s.role for s in self.cluster.for_model(leaving.spec.model) if s is not leaving and not s.draining
        )

    # --------------------------------------------------------------- reload
    async def apply(self, new: GatewayConfig, *, timeout_s: float) -> ReloadReport:
        """Make the served instances those of ``new`` (see the module doc); never raises."""
        report = ReloadReport(not_applied=_restart_only_changes(self.config, new))
        async with self._lock:
            current = {i.spec().id: i for i in self.config.instances if i.pod_uid is None}  # discovery keeps the rest
            wanted = {i.spec().id: i for i in new.instances}
            gone = [i for i in current if i not in wanted]
            changed = [i for i in current if i in wanted and current[i] != wanted[i]]
            for instance_id, inst in wanted.items():
                if instance_id not in current:
                    await self._try(report.added, report, instance_id, self._add(inst))
            for instance_id in changed:
                if await self._try(None, report, instance_id, self._remove(instance_id, timeout_s, False)):
                    await self._try(report.replaced, report, instance_id, self._add(wanted[instance_id]))
            for instance_id in gone:
                await self._try(report.removed, report, instance_id, self._remove(instance_id, timeout_s, False))
        log.info(
            "config reloaded: added %s, removed %s, replaced %s, failed %s; not applied without a restart: %s",
            report.added,
            report.removed,
            report.replaced,
            report.failed,
            report.not_applied,
        )
        return report

    @staticmethod
    async def _try(done: list[str] | None, report: ReloadReport, instance_id: str, change: Any) -> bool:
        try:
            await change
        except FleetChangeError as exc:
            report.failed[instance_id] = exc.message
            return False
        if done is not None:
            done.append(instance_id)
        return True


def _restart_only_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """Top-level settings (other than the instances) that differ: a reload leaves them as they are."""
    return sorted(
        name
        for name in GatewayConfig.model_fields
        if name not in ("instances", "host", "port") and getattr(old, name) != getattr(new, name)
    )
