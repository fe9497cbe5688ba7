"""In-tree profile handlers: the per-request PD decision (which profiles run, in which order)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from pdgate.scheduler.costmodel.model import expected_output_tokens
from pdgate.scheduler.estimates import tpot_estimate, tpot_limit, ttft_estimates
from pdgate.scheduler.framework import PdPlan, PluginParams, ProfileHandler, RunProfile
from pdgate.scheduler.snapshot import PREFILL_SHARE_WINDOW_S, ClusterSnapshot, InstanceView, RequestInfo


def has_pd_instances(snapshot: ClusterSnapshot) -> bool:
    """Whether the request's model has dedicated prefill or decode instances."""
    return any(i.role in ("prefill", "decode") for i in snapshot.instances)


def serving_paths(candidates: Sequence[InstanceView]) -> dict[str, bool]:
    """Which paths can serve now: ``colocated`` with an available ``both`` instance, ``split`` with an
    available instance for each leg among the others (not merely instances: every prefill drained,
    or the last decode instance dead, leaves no split path)."""
    split = [c for c in candidates if c.role != "both"]
    return {
        "colocated": any(c.available and c.role == "both" for c in candidates),
        "split": all(any(c.available and c.serves(leg) for c in split) for leg in ("prefill", "decode")),
    }


def split_plan(candidates: Sequence[InstanceView], run: RunProfile) -> PdPlan:
    """``prefill`` over the candidates, then ``decode`` over the others (over all of them when the
    prefill instance is the only one)."""
    prefill = run("prefill", candidates)
    others = [c for c in candidates if c.id != prefill.instance_id] or list(candidates)
    return PdPlan(run("decode", others), prefill, reason=SPLIT_PD)


class PdSplitHandler(ProfileHandler):
    """Disaggregate every request of a model that has prefill/decode instances, else colocate.

    Split: the ``prefill`` profile picks where the prompt is computed, then the ``decode``
    profile picks where the answer is generated, among the other candidates (the same instance
    only when it is the only one left). Colocated (no prefill or decode instance for the model,
    or none available for one of the legs while a ``both`` instance is): the ``colocated``
    profile picks the one instance that does both. This is pdgate's behaviour
    before per-request decisions existed; a handler that weighs colocating against splitting
    per request subclasses :class:`~pdgate.scheduler.framework.ProfileHandler` the same way.
    """

    type_name = "pd-split"
    profiles: ClassVar[tuple[str, ...]] = ("prefill", "decode", "colocated")

    def plan(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: Sequence[InstanceView], run: RunProfile
    ) -> PdPlan:
        if not has_pd_instances(snapshot):
            return PdPlan(run("colocated", candidates), reason=NO_PD)
        paths = serving_paths(candidates)
        if not paths["split"] and paths["colocated"]:  # (a prefill and a both, the decodes drained...)
            return PdPlan(run("colocated", candidates), reason=NO_SPLIT)
        return split_plan(candidates, run)


class AdaptivePdParams(PluginParams):
    max_uncached_tokens: int = Field(
        256,
        ge=0,
        description="without a cost model: colocate when at most this many prompt tokens are not cached there",
    )
    min_decode_hit_fraction: float = Field(
        0.8, ge=0.0, le=1.0, description="without a cost model: colocate when the decode instance holds this share"
    )
    ttft_margin: float = Field(
        1.0, gt=0.0, description="colocate when its predicted TTFT is at most this times the split's"
    )
    tpot_headroom: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="colocate only while the decode batch's predicted TPOT, its prompts' stalls included, stays "
        "within this share of its TPOT SLO (below admission's slack, so colocating never makes the decode "
        "instance refuse the streams it is there for)",
    )


class AdaptivePdHandler(PdSplitHandler):
    """Per request: split prefill and decode, or serve the whole request on the decode instance.

    The ``prefill`` and ``decode`` profiles choose as for a split (decode by KV-prefix hits and
    load). Then the request is **colocated** on that decode instance (no KV hand-off) when it can
    prefill there (``colocates_on_decode``: vLLM and the sim; SGLang's decode servers cannot)
    and, with a cost model, when the predicted TTFT there (its prefill queue and the uncached
    part of the prompt) is at most ``ttft_margin`` times the split's (the prefill instance's
    queue, prefill and the hand-off) while the decode batch keeps ``tpot_headroom`` of its tightest TPOT SLO with the
    stalls of the prompts it prefills (``InstanceView.prefill_share``, this one's included:
    many colocated prompts add up) and, for the request itself, its own stall spread over its
    expected output. Without a cost model,
    the thresholds decide: colocate when at most ``max_uncached_tokens`` prompt tokens are not
    cached on the decode instance, or it holds at least ``min_decode_hit_fraction`` of them.
    Models without prefill or decode instances run ``colocated``, as with ``pd-split``.
    Reasons are a fixed set (see ``REASONS``), counted per path in ``pdgate_pd_decisions_total``.
    """

    type_name = "pd-adaptive"
    Params = AdaptivePdParams

    def plan(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: Sequence[InstanceView], run: RunProfile
    ) -> PdPlan:
        split = super().plan(request, snapshot, candidates, run)  # colocated without PD instances or a split path
        prefill, decode = split.prefill, split.decode
        here = decode.instance
        if prefill is None or prefill.instance is None or here is None or here.id == prefill.instance_id:
            return split
        if "colocates_on_decode" not in here.capabilities:
            return PdPlan(decode, prefill, reason=SPLIT_CANNOT)
        colocate, reason = self._colocates(request, snapshot, prefill.instance, here)
        return PdPlan(decode, reason=reason) if colocate else PdPlan(decode, prefill, reason=reason)

    def _colocates(
        self, request: RequestInfo, snapshot: ClusterSnapshot, prefill: InstanceView, decode: InstanceView
    ) -> tuple[bool, str]:
        p: AdaptivePdParams = self.params  # type: ignore[assignment]
        prompt = request.prompt_tokens
        hit = min(snapshot.prefix_hit_tokens.get(decode.id, 0), max(0, prompt - 1))
        costs = snapshot.costs
        if costs is None:
            if prompt - hit <= p.max_uncached_tokens:
                return True, COLOCATED_SHORT
            if prompt > 0 and hit >= p.min_decode_hit_fraction * prompt:
                return True, COLOCATED_PREFIX
            return False, SPLIT_LONG
        split = ttft_estimates(request, snapshot, [prefill], costs)[0]
        here = ttft_estimates(request, snapshot, [decode], costs, handoff_s=0.0)[0]
        if here.wait_s + here.prefill_s > p.ttft_margin * split.total_s:
            return False, SPLIT_FASTER
        limit = tpot_limit(request, decode)
        if limit is not None and decode.decode_inflight > 0:
            # its prefill stalls the batch: its own share of the instance's recent time, and for
            # its own stream at least that stall spread over its expected output
            own = here.prefill_s / PREFILL_SHARE_WINDOW_S
            tpot = tpot_estimate(request, decode, costs, extra_prefill_share=own)
            spread = here.prefill_s / max(1.0, expected_output_tokens(request.output, request.max_tokens))
            if max(tpot, tpot_estimate(request, decode, costs) + spread) > p.tpot_headroom * limit:
                return False, SPLIT_TPOT
        return True, COLOCATED_FASTER


class PdPathsParams(PluginParams):
    colocated_percent: float = Field(
        0.0, ge=0.0, le=100.0, description="share of requests (by a hash of their id) on the colocated path"
    )
    colocated_apps: list[str] = Field(default_factory=list, description="x-pdgate-app values always colocated")
    split_apps: list[str] = Field(default_factory=list, description="x-pdgate-app values always split")
    colocated_routes: list[str] = Field(
        default_factory=list, description="routes always colocated, e.g. /v1/chat/completions"
    )
    honour_header: bool = Field(False, description="a request's x-pdgate-pd-path (colocated | split) picks its path")


class PdPathsHandler(ProfileHandler):
    """The operator's explicit split between a model's colocated and disaggregated instances.

        For rolling disaggregation out (or back) as a config change: ``both`` instances form the
        colocated path (profile ``colocated``), ``prefill`` and ``decode`` instances the split path
        (``prefill`` then ``decode``), side by side for one model. Each request takes one path, by the
        first rule that applies: its ``x-pdgate-pd-path`` header (with ``honour_header``), its app
        (``x-pdgate-app``) in ``colocated_apps`` or ``split_apps``, its route in ``colocated_routes``,
        else ``colocated_percent`` of requests by a stable hash of the request id (the same request
        id always takes the same path). A path without a live (healthy, undrained) instance for each of
    its legs sends the request to the other.
        ``pdgate_pd_decisions_total`` and ``pdgate_slo_requests_total`` count by path, for the A/B
        comparison.
    """

    type_name = "pd-paths"
    Params = PdPathsParams
    profiles: ClassVar[tuple[str, ...]] = ("prefill", "decode", "colocated")

    def plan(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: Sequence[InstanceView], run: RunProfile
    ) -> PdPlan:
        paths = {"colocated": [c for c in candidates if c.role == "both"]}
        paths["split"] = [c for c in candidates if c.role != "both"]
        # a path that cannot serve now sends the request to the other; when neither serves, the
        # request keeps to its path if it has instances (its filters then say why none can serve)
        serves = serving_paths(candidates)
        wanted, reason = self._path(request)
        other = "split" if wanted == "colocated" else "colocated"
        if not serves[wanted] and (serves[other] or not paths[wanted]):
            wanted, reason = other, (SPLIT_NO_COLOCATED if other == "split" else NO_SPLIT)
        colocated, split = paths["colocated"], paths["split"]
        if wanted == "colocated":
            return PdPlan(run("colocated", colocated), reason=reason)
        plan = split_plan(split, run)
        return PdPlan(plan.decode, plan.prefill, reason=reason)

    def _path(self, request: RequestInfo) -> tuple[str, str]:
        p: PdPathsParams = self.params  # type: ignore[assignment]
        tags = request.tags
        header = tags.get("pd_path")
        if p.honour_header and header in ("colocated", "split"):
            return header, COLOCATED_HEADER if header == "colocated" else SPLIT_HEADER
        app = tags.get("app")
        if app is not None and app in p.colocated_apps:
            return "colocated", COLOCATED_APP
        if app is not None and app in p.split_apps:
            return "split", SPLIT_APP
        if tags.get("route") in p.colocated_routes:
            return "colocated", COLOCATED_ROUTE
        if zlib.crc32(request.request_id.encode()) % 10_000 < p.colocated_percent * 100:
            return "colocated", COLOCATED_SHARE
        return "split", SPLIT_SHARE


NO_PD = "colocated: no prefill/decode instances"
NO_SPLIT = "colocated: no live instance for a leg of the split"
SPLIT_PD = "split: the model has prefill/decode instances"
SPLIT_CANNOT = "split: the decode instance cannot prefill a whole request"
SPLIT_LONG = "split: the uncached prompt is long"
SPLIT_FASTER = "split: predicted faster"
SPLIT_TPOT = "split: a prefill there would break the decode batch's TPOT"
COLOCATED_SHORT = "colocated: little of the prompt is uncached on the decode instance"
COLOCATED_PREFIX = "colocated: the decode instance holds the prefix"
COLOCATED_FASTER = "colocated: predicted faster"
COLOCATED_HEADER = "colocated: asked by the request's header"
SPLIT_HEADER = "split: asked by the request's header"
COLOCATED_APP = "colocated: the app's path"
SPLIT_APP = "split: the app's path"
COLOCATED_ROUTE = "colocated: the route's path"
COLOCATED_SHARE = "colocated: its share of the traffic"
SPLIT_SHARE = "split: its share of the traffic"
SPLIT_NO_COLOCATED = "split: no colocated instance"
REASONS = (
    NO_PD,
    NO_SPLIT,
    SPLIT_PD,
    SPLIT_CANNOT,
    SPLIT_LONG,
    SPLIT_FASTER,
    SPLIT_TPOT,
    COLOCATED_SHORT,
    COLOCATED_PREFIX,
    COLOCATED_FASTER,
    COLOCATED_HEADER,
    SPLIT_HEADER,
    COLOCATED_APP,
    SPLIT_APP,
    COLOCATED_ROUTE,
    COLOCATED_SHARE,
    SPLIT_SHARE,
    SPLIT_NO_COLOCATED,
)
"""Every reason the in-tree handlers give (a bounded set: it labels a metric)."""
