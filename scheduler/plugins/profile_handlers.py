"""In-tree profile handlers: the per-request PD decision (which profiles run, in which order)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pdgate.scheduler.framework import PdPlan, ProfileHandler, RunProfile
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo


def has_pd_instances(snapshot: ClusterSnapshot) -> bool:
    """Whether the request's model has dedicated prefill or decode instances."""
    return any(i.role in ("prefill", "decode") for i in snapshot.instances)


class PdSplitHandler(ProfileHandler):
    """Disaggregate every request of a model that has prefill/decode instances, else colocate.

    Split: the ``prefill`` profile picks where the prompt is computed, then the ``decode``
    profile picks where the answer is generated, among the other candidates (the same instance
    only when it is the only one left). Colocated (no prefill or decode instance for the model):
    the ``colocated`` profile picks the one instance that does both. This is pdgate's behaviour
    before per-request decisions existed; a handler that weighs colocating against splitting
    per request subclasses :class:`~pdgate.scheduler.framework.ProfileHandler` the same way.
    """

    type_name = "pd-split"
    profiles: ClassVar[tuple[str, ...]] = ("prefill", "decode", "colocated")

    def plan(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: Sequence[InstanceView], run: RunProfile
    ) -> PdPlan:
        if not has_pd_instances(snapshot):
            return PdPlan(run("colocated", candidates), reason="colocated: no prefill/decode instances")
        prefill = run("prefill", candidates)
        others = [c for c in candidates if c.id != prefill.instance_id] or list(candidates)
        return PdPlan(run("decode", others), prefill, reason="split: the model has prefill/decode instances")
