"""Placement: where one request (or a continuation) runs, and what the cost model expects there.

The profile handler (a scheduler plugin) decides which scheduling profiles run and in which
order; this module gives it a snapshot, runs the profiles it asks for (timing every plugin
call for metrics and spans), turns its plan into instances, tells the plugins where the
request went, and records the predictions the outcome is later compared with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdgate.gateway.cluster import Cluster
from pdgate.gateway.costs import CostModelService
from pdgate.gateway.instance_state import InstanceState
from pdgate.gateway.intake import Routed
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.observation import Observation
from pdgate.gateway.requests import GatewayError
from pdgate.scheduler.estimates import tpot_estimate
from pdgate.scheduler.framework import Decision, LifecycleHooks, Profile, ProfileHandler, run_profile
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo

RETRY_AFTER_S = "1"


@dataclass
class Placement:
    decode: InstanceState  # the instance that streams the answer (colocated: the only one)
    prefill: InstanceState | None
    decisions: list[Decision]
    reason: str = ""  # the profile handler's

    @property
    def split(self) -> bool:
        return self.prefill is not None and self.prefill is not self.decode


class Placer:
    """Runs the profile handler and the profiles over snapshots; one per gateway."""

    def __init__(
        self,
        cluster: Cluster,
        profiles: dict[str, Profile],
        handler: ProfileHandler,
        metrics: GatewayMetrics,
        costs: CostModelService | None = None,
    ) -> None:
        self.cluster = cluster
        self.profiles = profiles
        self.handler = handler
        self.metrics = metrics
        self.costs = costs
        self._hooks: dict[str, tuple[Profile, tuple[LifecycleHooks, ...]]] = {}

    def _sent_hooks(self, profile_name: str) -> tuple[LifecycleHooks, ...]:
        """The plugins of a profile with an ``on_sent`` hook of their own (the others' does nothing),
        found once per profile."""
        profile = self.profiles[profile_name]
        known = self._hooks.get(profile_name)
        if known is None or known[0] is not profile:
            hooks = tuple(
                plugin
                for plugin in profile.plugins
                if isinstance(plugin, LifecycleHooks)
                and (type(plugin).on_sent is not LifecycleHooks.on_sent or "on_sent" in getattr(plugin, "__dict__", {}))
            )
            known = self._hooks[profile_name] = (profile, hooks)
        return known[1]

    def snapshot_for(self, routed: Routed) -> Callable[[RequestInfo], ClusterSnapshot]:
        """Takes the snapshot ``routed`` is judged on (with its prefix hits and the cost model in force)."""
        costs = self.costs
        return lambda info: self.cluster.snapshot(
            info.model, routed.hashes, costs.current if costs is not None else None
        )

    def place(
        self, routed: Routed, excluded: set[str], snapshot: ClusterSnapshot | None = None, attempt: int = 1
    ) -> Placement:
        """Where ``routed`` runs, never on an ``excluded`` instance; raises 503 when nowhere."""
        started = time.perf_counter()
        if snapshot is None:
            snapshot = self.snapshot_for(routed)(routed.info)
        candidates = [i for i in snapshot.instances if i.id not in excluded]

        def run(profile_name: str, among: Sequence[InstanceView]) -> Decision:
            return self.decide(profile_name, routed, snapshot, list(among))

        plan = self.handler.plan(routed.info, snapshot, candidates, run)
        decode = self._chosen(plan.decode)
        prefill = self._chosen(plan.prefill) if plan.prefill is not None else None
        placement = Placement(decode, prefill, plan.decisions, plan.reason)
        self.metrics.pd_decision(routed.info.model, placement.split, plan.reason)
        for decision in placement.decisions:
            assert decision.instance is not None  # decide() answers 503 without one
            for plugin in self._sent_hooks(decision.profile):
                plugin.on_sent(routed.info, decision.instance, decision.profile)
        self.predict(routed, placement, snapshot)
        obs = routed.obs
        obs.attempts = attempt
        if routed.trace.enabled:
            routed.trace.scheduled(
                attempt,
                started,
                time.perf_counter(),
                placement.decisions,
                {
                    "pdgate.excluded": sorted(excluded),
                    "pdgate.pd_decision": plan.reason,
                    "pdgate.prefill.instance": obs.prefill_id if obs.split else None,
                    "pdgate.decode.instance": obs.decode_id,
                    "pdgate.prefix_hit_tokens": obs.prefill_cached,
                    "pdgate.ttft_predicted_s": obs.predicted.get("ttft_s"),
                },
            )
        return placement

    def predict(self, routed: Routed, placement: Placement, snapshot: ClusterSnapshot) -> None:
        """Record where the request goes and what the cost model expects there (reset per attempt)."""
        info = routed.info
        obs = routed.obs = Observation(queued_s=routed.obs.queued_s)
        first = placement.prefill or placement.decode
        first_view = snapshot.by_id(first.spec.id)
        decode_view = snapshot.by_id(placement.decode.spec.id)
        obs.prefill_id, obs.prefill_group = first.spec.id, first.cost_group
        obs.decode_id, obs.decode_group = placement.decode.spec.id, placement.decode.cost_group
        obs.split = placement.split
        obs.pd_decision = placement.reason
        obs.prefill_cached = min(snapshot.prefix_hit_tokens.get(first.spec.id, 0), max(0, info.prompt_tokens - 1))
        obs.prefill_idle = first_view is not None and first_view.prefill_inflight == 0
        obs.decode_prefill_share = decode_view.prefill_share if decode_view is not None else 0.0
        self.metrics.observe_prefix(first.spec.id, info.prompt_tokens, obs.prefill_cached)
        costs = snapshot.costs
        if costs is None or first_view is None or decode_view is None:
            return
        obs.cost_model_version = costs.version
        predicted = obs.predicted
        predicted["prefill_s"] = costs.prefill_s(
            first_view, info.prompt_tokens - obs.prefill_cached, obs.prefill_cached
        )
        predicted["wait_s"] = first_view.prefill_wait_s
        predicted["handoff_s"] = costs.handoff_s(decode_view, info.prompt_tokens) if obs.split else 0.0
        predicted["ttft_s"] = obs.queued_s + predicted["wait_s"] + predicted["prefill_s"] + predicted["handoff_s"]
        predicted["tpot_s"] = tpot_estimate(info, decode_view, costs)
        if info.output is not None:
            predicted["output_median"] = info.output.median
            predicted["output_high"] = info.output.high
            if info.output.scale != 1.0:
                predicted["output_scale"] = info.output.scale  # the length scale it carries

    def decide(
        self, profile_name: str, routed: Routed, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> Decision:
        """Run one profile; a profile that leaves no instance answers 503 with why."""
        decision = run_profile(self.profiles[profile_name], routed.info, snapshot, candidates)
        for plugin, seconds in decision.plugin_seconds.items():
            self.metrics.observe_plugin(profile_name, plugin, seconds)
        if decision.instance is None:
            reason = (
                f"filter '{decision.rejected_by}' left no instance" if decision.rejected_by else "no candidate instance"
            )
            lora = routed.info.lora
            if lora is not None:
                reason += f"; LoRA adapter '{lora.name}': " + (
                    "no instance that serves it, or can load it now, is left"
                    if lora.loadable
                    else "no instance that serves it is left (loading on demand is off or its path unknown: models[].lora)"
                )
            raise GatewayError(
                503,
                f"no healthy instance can serve model '{routed.info.model}' ({profile_name}: {reason})",
                err_type="service_unavailable",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        return decision

    def prefill_for(
        self, cont: Routed, snapshot: ClusterSnapshot, exclude: set[str], preferred: str | None
    ) -> InstanceState:
        """The prefill instance of a PD-path move: the request's own prefill instance when it can
        (its prefix cache holds the prompt), else the prefill profile's choice."""
        view = snapshot.by_id(preferred) if preferred is not None else None
        if (
            view is not None
            and view.healthy
            and not view.draining
            and view.serves("prefill")
            and view.id not in exclude
        ):
            return self.cluster.instances[view.id]
        decision = self.decide("prefill", cont, snapshot, [i for i in snapshot.instances if i.id not in exclude])
        return self._chosen(decision)

    def _chosen(self, decision: Decision) -> InstanceState:
        """The instance a decision picked (:meth:`decide` answers 503 for one that picked none)."""
        if decision.instance is None:
            raise RuntimeError(f"profile {decision.profile!r} picked no instance")
        return self.cluster.instances[decision.instance.id]
