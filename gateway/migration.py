"""The migration controller: which running streams move where, drains, and the stall watchdog.

It keeps the registry of :class:`~gateway.livestream.LiveStream` s (every streamed answer the
gateway could move) and, every ``migration.interval_s``:

* drains: each stream on a draining instance is moved to where the policy's ``target_for``
  says (retried next round if a move fails);
* balance: the :class:`~scheduler.framework.MigrationPolicy` plugin gets a snapshot of each
  model's instances and its running requests, and the moves it plans are started;
* stalls: a stream that brought nothing for ``stall_timeout_s`` is cut, which fails it over.

With gateway replicas, drains and stalls are handled by every replica for its own streams,
and only the leader plans (``plans_here``), over every replica's streams (``peers``): a move of
another replica's stream is asked of that replica (:mod:`pdgate.gateway.peers`).

A move is carried out by the :class:`Mover` the controller is given (the gateway's
:class:`~pdgate.gateway.mover.StreamMover`), in a task this controller owns: at most
``max_concurrent`` at once, each abandoned after ``timeout_s``; :meth:`close` cancels and
awaits them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pdgate.common.tasks import OwnedTasks, every
from pdgate.gateway.livestream import LiveStream
from pdgate.scheduler.framework import MigrationPlan, MigrationPolicy
from pdgate.scheduler.snapshot import RunningRequest

if TYPE_CHECKING:
    from pdgate.gateway.cluster import Cluster
    from pdgate.gateway.config import MigrationConfig
    from pdgate.gateway.instance_state import InstanceState
    from pdgate.gateway.livestream import Handover
    from pdgate.gateway.metrics import GatewayMetrics
    from pdgate.gateway.peers import PeerStreams

log = logging.getLogger("pdgate.migration")


class Mover(Protocol):
    """Carries out one move of a running stream; False: the stream stayed where it was."""

    async def move(self, live: LiveStream, target: InstanceState, reason: str) -> bool: ...


class MigrationController:
    """One per gateway; see the module doc."""

    def __init__(
        self,
        config: MigrationConfig,
        cluster: Cluster,
        policy: MigrationPolicy,
        metrics: GatewayMetrics,
        mover: Mover,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.cluster = cluster
        self.policy = policy
        self.mover = mover
        self.streams: dict[int, LiveStream] = {}
        self._moves = OwnedTasks()
        self._loop: asyncio.Task[None] | None = None
        self.moved = 0
        self.failed = 0
        # replicas: whether this one plans (the leader), and the other replicas' streams
        self.plans_here: Callable[[], bool] = lambda: True
        self.peers: PeerStreams | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        # a policy bug must not stop drains and the stall watchdog for good: a failed round is logged
        self._loop = asyncio.create_task(
            every(self.config.interval_s, self.round, "migration", log), name="migration-controller"
        )

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        await self._moves.close()

    # ------------------------------------------------------------- registry
    def register(self, live: LiveStream) -> None:
        self.streams[id(live)] = live
        live.state.live_streams += 1
        live.on_switch = self._switched

    def unregister(self, live: LiveStream) -> None:
        if self.streams.pop(id(live), None) is not None:
            live.state.live_streams -= 1

    def _switched(self, live: LiveStream, old: InstanceState, handover: Handover, gap_s: float) -> None:
        """A stream changed instance: its count follows it; the client-visible gap is measured."""
        if id(live) in self.streams:
            old.live_streams -= 1
            live.state.live_streams += 1
        self.metrics.observe_migration_gap(handover.reason, handover.mechanism, gap_s)

    def on(self, instance_id: str) -> list[LiveStream]:
        return [s for s in self.streams.values() if s.instance_id == instance_id]

    def find(self, request_id: str) -> LiveStream | None:
        return next((s for s in self.streams.values() if s.request_id == request_id), None)

    def running(self, model: str) -> list[RunningRequest]:
        now = self.cluster.clock()
        return [self._as_running(s, now) for s in self.streams.values() if s.model == model]

    def running_all(self) -> list[RunningRequest]:
        now = self.cluster.clock()
        return [self._as_running(s, now) for s in self.streams.values()]

    @staticmethod
    def _as_running(s: LiveStream, now: float) -> RunningRequest:
        """A stream as a migration policy sees it."""
        return RunningRequest(
            request_id=s.request_id,
            instance_id=s.instance_id,
            model=s.model,
            prompt_tokens=s.prompt_tokens,
            generated_tokens=s.generated,
            max_tokens=s.max_tokens,
            predicted_output_tokens=s.predicted_output,
            priority=s.priority,
            tpot_slo_s=s.tpot_slo_s,
            decoding_s=now - s.started_at,
            migrations=s.moves,
            migratable=s.trail.tracked and not s.moving and not s.trail.finished,
        )

    # ---------------------------------------------------------------- moves
    @property
    def moves_in_flight(self) -> int:
        return len(self._moves)

    def move(self, live: LiveStream, target_id: str | None, reason: str) -> asyncio.Task[bool] | None:
        """Start moving ``live`` (to ``target_id``, or where the policy says); None when it cannot start now."""
        if live.moving or live.trail.done or live.trail.finished or not live.trail.tracked:
            return None  # (a stream whose finish went out has nothing left to move)
        if len(self._moves) >= self.config.max_concurrent:
            return None
        if target_id is None:
            target_id = self.policy.target_for(
                self._as_running(live, self.cluster.clock()),
                self.cluster.snapshot(live.model),
                self.running(live.model),
                exclude=(live.instance_id,),
            )
            if target_id is None:
                return None
        target = self.cluster.instances.get(target_id)
        if target is None or target_id == live.instance_id:
            return None
        live.move_target = target_id
        task = self._moves.spawn(self._move(live, target, reason), f"migrate-{live.request_id}")
        live.move_task = task
        return task

    async def _move(self, live: LiveStream, target: InstanceState, reason: str) -> bool:
        source = live.instance_id
        ok = await self.mover.move(live, target, reason)
        if ok:
            self.moved += 1
        else:
            self.failed += 1
        self.metrics.recent.migration(live.request_id, source, target.spec.id, reason, ok)
        self.policy.on_migrated(
            MigrationPlan(live.request_id, source, target.spec.id, reason), ok, self.cluster.clock()
        )
        return ok

    # ---------------------------------------------------------------- rounds
    def round(self) -> None:
        """One pass: stalls, drains, then the policy's plan (what runs every interval)."""
        self._watch_stalls()
        if not self.config.enabled:
            return
        for state in self.cluster.instances.values():
            if state.draining or not state.decodes:  # drained, or a flex instance moved to the prefill role
                for live in self.on(state.spec.id):
                    self.move(live, None, "drain" if state.draining else "role")
        if not self.plans_here():  # another replica (the leader) plans for the whole gateway
            return
        peers = self.peers
        models = {s.model for s in self.streams.values()} | (peers.models() if peers is not None else set())
        now = self.cluster.clock()
        for model in models:
            if len(self._moves) >= self.config.max_concurrent:
                return
            running = self.running(model) + (peers.running(model) if peers is not None else [])
            plans = self.policy.plan(self.cluster.snapshot(model), running, now)
            for plan in plans:
                found = self.find(plan.request_id)
                if found is not None and found.instance_id == plan.source:
                    self.move(found, plan.target, plan.reason)
                elif found is None and peers is not None:  # another replica holds the client's stream
                    peers.delegate(plan.request_id, plan.target, plan.reason)

    def _watch_stalls(self) -> None:
        limit = self.config.stall_timeout_s
        if limit <= 0:
            return
        now = self.cluster.clock()
        for live in list(self.streams.values()):
            if not live.moving and not live.frozen and now - live.last_read > limit and live.stall_reason is None:
                live.stall_reason = f"stalled: no data for {now - live.last_read:.1f} s"
                log.warning("stream %s on %s %s; failing it over", live.request_id, live.instance_id, live.stall_reason)
                live.abort_source(live.stall_reason)

    # ---------------------------------------------------------------- drains
    def drain(self, instance_id: str) -> None:
        """Keep new requests off ``instance_id`` and move its streams away (from the next round on)."""
        self.cluster.instances[instance_id].draining = True
        if self.config.enabled:
            for live in self.on(instance_id):
                self.move(live, None, "drain")

    def undrain(self, instance_id: str) -> None:
        self.cluster.instances[instance_id].draining = False

    async def wait_drained(self, instance_id: str, timeout_s: float) -> bool:
        """Wait until nothing runs on ``instance_id`` (streams and other requests, this replica's
        and, with replicas, the others' as they report them); False on timeout."""
        state = self.cluster.instances.get(instance_id)
        if state is None:  # removed meanwhile: nothing runs there any more
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        def busy() -> bool:
            remote = self.cluster.remote.get(instance_id)
            return (
                state.inflight_requests > 0
                or bool(self.on(instance_id))
                or (remote is not None and remote.requests > 0)
            )

        while busy():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True
