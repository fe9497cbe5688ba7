"""Kubernetes discovery: the fleet follows the engine pods of a label selector while it serves.

A :class:`~pdgate.gateway.discovery.kube_watch.KubeWatcher` keeps a local copy of the pods (list,
then watch; a re-list after 410 Gone), and :class:`KubeDiscovery` makes the fleet agree with it,
through :class:`~pdgate.gateway.fleet.FleetManager` (the admin API's path, shared with the other
replicas). Every replica watches; only the leader changes the fleet, so a new leader acts at once.

Each pass, level-triggered (a change, or every ``tick_s`` for the timers):

* **adds first**: a Ready pod (Running, Ready condition, an IP) with a usable entry
  (:mod:`~pdgate.gateway.discovery.pod_entries`) that is not served joins the fleet;
* **unready**: a served pod not Ready for ``unready_grace_s`` is drained (new requests avoid it,
  its streams move); Ready again, it is undrained;
* **gone**: a pod deleted, being deleted (``deletionTimestamp``) or replaced (same name, a new
  uid) leaves: drained up to ``drain_timeout_s``, then removed; its replacement joins once Ready;
* **changed**: a pod whose entry changed (its IP, role, model, port) is replaced the same way.

Discovery only ever removes what it added (instances with a ``pod_uid``); a pod whose name is an
instance of the config file is reported, not touched. Problems (a pod with no role label, an
unknown model) are logged once per pod and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from lightkube import AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Pod
from lightkube.resources.discovery_v1 import EndpointSlice
from prometheus_client import CollectorRegistry, Counter, Gauge

from pdgate.common.tasks import OwnedTasks
from pdgate.gateway.discovery.kube_watch import KubeWatcher
from pdgate.gateway.discovery.pod_entries import PodFacts, endpoint_states, pod_facts, with_endpoint
from pdgate.gateway.discovery_config import KubernetesDiscoveryConfig
from pdgate.gateway.fleet import FleetChangeError, FleetManager
from pdgate.gateway.instance_config import InstanceConfig

log = logging.getLogger("pdgate.discovery")

R = TypeVar("R", Pod, EndpointSlice)


class DiscoveryMetrics:
    """``pdgate_discovery_*``: what the watch sees and what discovery changed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.pods = Gauge(
            "pdgate_discovery_pods", "Engine pods the watch sees, by state.", ["state"], registry=registry
        )
        self.changes = Counter(
            "pdgate_discovery_changes", "Fleet changes made by discovery.", ["change"], registry=registry
        )
        self.problems = Counter(
            "pdgate_discovery_problems", "Pods that could not join the fleet, each counted once.", registry=registry
        )
        self.synced = Gauge(
            "pdgate_discovery_synced",
            "1 once the pods have been listed (0 while the API is unreachable).",
            registry=registry,
        )
        self.lists = Counter(
            "pdgate_discovery_lists", "Full lists of the pods (the first, after 410 Gone, resyncs).", registry=registry
        )


class KubeDiscovery:
    """The fleet kept equal to the Ready pods of ``settings.label_selector`` (module doc)."""

    def __init__(
        self,
        settings: KubernetesDiscoveryConfig,
        fleet: FleetManager,
        metrics: DiscoveryMetrics,
        acts_here: Callable[[], bool],
        *,
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = 0.5,
        api: Callable[[], AsyncClient] | None = None,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.metrics = metrics
        self.acts_here = acts_here
        self.clock = clock
        self.tick_s = tick_s
        self._client: AsyncClient | None = None
        self._changed = asyncio.Event()
        namespace = settings.namespace or self._own_namespace()

        def watcher(resource: type[R], selector: str) -> KubeWatcher[R]:
            return KubeWatcher(
                api or self._api,
                resource,
                namespace=namespace,
                label_selector=selector,
                on_change=self._changed.set,
                watch_timeout_s=settings.watch_timeout_s,
                resync_s=settings.resync_s,
                backoff_s=settings.backoff_s,
            )

        self.watcher: KubeWatcher[Pod] = watcher(Pod, settings.label_selector)
        self.slices: KubeWatcher[EndpointSlice] | None = None  # readiness: endpointslices
        if settings.readiness == "endpointslices":
            self.slices = watcher(EndpointSlice, f"kubernetes.io/service-name={settings.service}")
        self._unready_since: dict[str, tuple[float, bool]] = {}  # pod -> (since, drained by an operator then)
        self._drained: set[str] = set()  # unready past the grace: discovery's to drain, and to undrain when Ready
        self._removing: set[str] = set()
        self._problems: dict[str, str] = {}  # pod -> why it cannot join (logged once)
        self._lists_seen = 0
        self._tasks = OwnedTasks()

    def _api(self) -> AsyncClient:
        if self._client is None:
            s = self.settings
            config = (
                KubeConfig.from_file(s.kubeconfig)
                if s.kubeconfig
                else KubeConfig.from_env(service_account=s.service_account_dir)
            )
            self._client = AsyncClient(config.get(s.context), namespace=s.namespace, field_manager="pdgate")
        return self._client

    def _own_namespace(self) -> str:
        """The client's namespace: the pod's own in a cluster, the kubeconfig context's elsewhere."""
        try:
            return self._api().namespace or "default"
        except Exception:  # a kubeconfig that cannot be read: the watch reports it (and retries)
            return "default"

    async def start(self) -> None:
        self._tasks.spawn(self.watcher.run(), "discovery-watch")
        if self.slices is not None:
            self._tasks.spawn(self.slices.run(), "discovery-watch-endpointslices")
        self._tasks.spawn(self._loop(), "discovery-reconcile")

    async def close(self) -> None:
        await self._tasks.close()
        if self._client is not None:
            await self._client.close()
            self._client = None

    def status(self) -> dict[str, Any]:
        """What the admin API reports under ``discovery``."""
        return {
            "synced": self.watcher.synced,
            "pods": len(self.watcher.objects),
            "managed": sorted(i.spec().id for i in self.managed().values()),
            "removing": sorted(self._removing),
            "problems": dict(self._problems),
            "last_error": self.watcher.last_error or (self.slices.last_error if self.slices is not None else None),
        }

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.tick_s)
            self._changed.clear()
            self._observe()
            if self.watcher.synced and (self.slices is None or self.slices.synced):
                try:
                    await self.reconcile(act=self.acts_here())
                except Exception:  # the next pass tries again
                    log.exception("discovery: a reconcile pass failed")

    def _observe(self) -> None:
        self.metrics.synced.set(1 if self.watcher.synced and self.watcher.last_error is None else 0)
        if self.watcher.lists > self._lists_seen:
            self.metrics.lists.inc(self.watcher.lists - self._lists_seen)
            self._lists_seen = self.watcher.lists

    async def reconcile(self, *, act: bool = True) -> None:
        """One pass over the pods the watch holds now (module doc). Without ``act`` (a replica that
        does not lead) it only follows which pods are unready past the grace, so that, leading
        later, it knows which drains are discovery's to undrain."""
        facts = {name: pod_facts(pod, self.settings) for name, pod in self.watcher.objects.items()}
        if self.slices is not None:
            endpoints = endpoint_states(self.slices.objects.values())
            facts = {name: with_endpoint(f, endpoints.get(name)) for name, f in facts.items()}
        self._count(facts)
        for f in facts.values():
            if f.ready and f.name not in self.fleet.cluster.instances and f.name not in self._removing:
                await self._guarded(f.name, self._join(f, act))
        now = self.clock()
        for name, inst in self.managed().items():
            # (each step awaits: an instance removed meanwhile is skipped)
            if name not in self._removing and name in self.fleet.cluster.instances:
                await self._guarded(name, self._follow(name, inst, facts.get(name), now, act))
        served = self.fleet.cluster.instances
        for name in [n for n in self._problems if n not in facts or n in served]:
            del self._problems[name]

    async def _follow(self, name: str, inst: InstanceConfig, seen: PodFacts | None, now: float, act: bool) -> None:
        """One served pod: gone, unready past the grace, or Ready again."""
        why = self._why_leave(seen, inst)
        if why is not None:
            if act:
                self._remove_later(name, why)
        elif seen is not None and not seen.ready:
            # whether an operator had drained it before it went unready: then the drain is not discovery's
            since, drained_before = self._unready_since.setdefault(name, (now, self._draining(name)))
            if now - since >= self.settings.unready_grace_s and not drained_before:
                self._drained.add(name)  # discovery's to drain, and to undrain once Ready
                if act and not self._draining(name):
                    await self._drain(name)
        else:
            self._unready_since.pop(name, None)
            if name in self._drained:
                if act and self._draining(name):
                    await self._undrain(name)
                if act or not self._draining(name):
                    self._drained.discard(name)

    async def _guarded(self, name: str, step: Coroutine[Any, Any, None]) -> None:
        """One pod's step; a failure is that pod's problem, never the whole pass's."""
        try:
            await step
        except Exception as exc:
            log.exception("discovery: pod %s: %s", name, exc)
            self._problems[name] = f"{type(exc).__name__}: {exc}"

    def _draining(self, name: str) -> bool:
        state = self.fleet.cluster.instances.get(name)
        return state is not None and state.draining

    def managed(self) -> dict[str, InstanceConfig]:
        """The instances discovery added (those with a ``pod_uid``), by id."""
        return {i.spec().id: i for i in self.fleet.config.instances if i.pod_uid is not None}

    def _why_leave(self, f: PodFacts | None, inst: InstanceConfig) -> str | None:
        if f is None:
            return "is gone"
        if f.terminating:
            return "is being deleted (or has ended)"
        if f.uid != inst.pod_uid:
            return "was replaced by a new pod of the same name"
        if f.entry is not None and f.ready:
            try:
                wanted = self.fleet.validate(f.entry)
            except FleetChangeError:
                return None  # the old entry serves on; the problem shows when it is added again
            if wanted != inst:
                return "changed (its address, role or model)"
        return None

    def _count(self, facts: dict[str, PodFacts]) -> None:
        states = {"ready": 0, "unready": 0, "terminating": 0}
        for f in facts.values():
            states["terminating" if f.terminating else "ready" if f.ready else "unready"] += 1
        for state, n in states.items():
            self.metrics.pods.labels(state).set(n)

    # ------------------------------------------------------------------ changes
    async def _join(self, f: PodFacts, act: bool) -> None:
        """A Ready pod not served: the leader adds it; every replica reports why it cannot join."""
        problem = f.problem
        if problem is None and f.entry is not None:
            try:
                inst = self.fleet.validate(f.entry)
                if not act:
                    self._problems.pop(f.name, None)
                    return
                await self.fleet.add(inst)
            except FleetChangeError as exc:
                problem = exc.message
            else:
                self._problems.pop(f.name, None)
                self.metrics.changes.labels("add").inc()
                log.warning("discovery: pod %s joined the fleet (%s)", f.name, f.entry["url"])
                return
        if problem is not None and self._problems.get(f.name) != problem:
            self._problems[f.name] = problem
            self.metrics.problems.inc()
            log.error("discovery: pod %s cannot join the fleet: %s", f.name, problem)

    async def _drain(self, name: str) -> None:
        await self.fleet.drain(name)
        self.metrics.changes.labels("drain").inc()
        log.warning("discovery: pod %s is not Ready for %g s; drained", name, self.settings.unready_grace_s)

    async def _undrain(self, name: str) -> None:
        await self.fleet.undrain(name)
        self.metrics.changes.labels("undrain").inc()
        log.warning("discovery: pod %s is Ready again; undrained", name)

    def _remove_later(self, name: str, why: str) -> None:
        self._removing.add(name)
        self._tasks.spawn(self._remove(name, why), f"discovery-remove-{name}")

    async def _remove(self, name: str, why: str) -> None:
        try:
            log.warning("discovery: pod %s %s; draining it (up to %g s)", name, why, self.settings.drain_timeout_s)
            await self.fleet.remove(name, timeout_s=self.settings.drain_timeout_s, force=True)
            self.metrics.changes.labels("remove").inc()
            log.warning("discovery: pod %s left the fleet", name)
        except FleetChangeError as exc:
            log.error("discovery: removing pod %s failed: %s", name, exc.message)
        finally:
            self._removing.discard(name)
            self._drained.discard(name)
            self._unready_since.pop(name, None)
            self._changed.set()  # its replacement may be waiting
