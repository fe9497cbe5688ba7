"""How many prefill, decode and colocated instances a model's forecast load needs (the scaling plan).

Pure over its inputs, like :mod:`pdgate.scheduler.role_planner`, whose capacity model it shares:

* a prefill instance keeps the TTFT target while it is busy at most
  :func:`~pdgate.scheduler.role_planner.prefill_busy_limit` of the time, so the prefill pool
  needs ``work / limit`` instances, where ``work`` is the forecast prefill seconds arriving per
  second;
* a decode instance keeps the TPOT target with up to :func:`decode_capacity` streams of the
  forecast mean context, so the decode pool needs ``streams / capacity`` instances;
* a colocated instance does both with one clock: it needs the sum of the two shares.

Each count gets ``headroom`` on top (a share of spare capacity, for the forecast's error and the
minutes a new instance takes to start), is rounded up, and is kept within ``[minimum, maximum]``
per role (at least one where the model serves in that role, so it keeps a serving path).
Flex instances count where they serve now; the plan says how many serve in each role, and
:meth:`ScalePlan.wanted` turns it into the size of one pool (a workload of flex instances is
sized for both roles at once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pdgate.scheduler.costmodel.model import CostModel
from pdgate.scheduler.role_planner import PoolDemand, decode_capacity, prefill_busy_limit, tpot_in_force
from pdgate.scheduler.snapshot import InstanceView

PoolRole = Literal["prefill", "decode", "both", "flex"]
POOL_ROLES: tuple[PoolRole, ...] = ("prefill", "decode", "both", "flex")


@dataclass(frozen=True)
class ScalePlan:
    """The instances a model's forecast load needs, per serving role, with what it was planned for."""

    model: str
    prefill: int
    decode: int
    colocated: int
    current: Mapping[str, int]  # instances now, by configured role (prefill, decode, both, flex)
    demand: PoolDemand
    streams_per_decode: int  # decode streams one instance keeps within the TPOT target
    reason: str

    def wanted(self, role: PoolRole) -> int:
        """The size the pool of instances configured as ``role`` should have.

        A prefill, decode or colocated pool gets the plan's count for its role; a pool of flex
        instances gets the part of the prefill and decode counts that the model's fixed prefill
        and decode instances do not cover (at least one)."""
        if role == "prefill":
            return self.prefill
        if role == "decode":
            return self.decode
        if role == "both":
            return self.colocated
        fixed = self.current.get("prefill", 0) + self.current.get("decode", 0)
        return max(1, self.prefill + self.decode - fixed)


def plan_scale(
    model: str,
    instances: Sequence[InstanceView],
    configured_roles: Mapping[str, str],
    demand: PoolDemand,
    costs: CostModel,
    *,
    tpot_target_s: float,
    prefill_utilisation: float,
    headroom: float,
    minimum: Mapping[PoolRole, int],
    maximum: Mapping[PoolRole, int],
    ttft_target_s: float | None = None,
) -> ScalePlan | None:
    """The scaling plan of one model's ``instances`` (healthy and draining alike: a draining
    instance is on its way out and is not counted); None when it has none to size a decode batch
    on. ``configured_roles``: instance id -> the role its entry configures (``flex`` included)."""
    live = [i for i in instances if not i.draining]
    if not live:
        return None
    current: dict[str, int] = {r: sum(1 for i in live if configured_roles.get(i.id) == r) for r in POOL_ROLES}
    sample = next((i for i in live if i.serves("decode")), live[0])
    tpot = tpot_in_force(tpot_target_s, live)
    streams_each = decode_capacity(sample, costs, tpot, max(1.0, demand.context_tokens_per_stream))
    busy = prefill_busy_limit(prefill_utilisation, ttft_target_s, demand.mean_prefill_s)
    prefill_share = demand.prefill_work_s_per_s / busy
    decode_share = demand.decode_streams / streams_each
    factor = 1.0 + headroom
    disaggregated = any(i.role in ("prefill", "decode") for i in live) or current["flex"] > 0

    def bounded(role: PoolRole, need: float) -> int:
        count = max(1, math.ceil(need * factor - 1e-9), minimum.get(role, 0))
        top = maximum.get(role)
        return min(count, top) if top is not None else count

    if not disaggregated:
        prefill, decode, colocated = 0, 0, bounded("both", prefill_share + decode_share)
    elif not current["both"]:
        prefill, decode, colocated = bounded("prefill", prefill_share), bounded("decode", decode_share), 0
    else:  # both paths side by side: each keeps its share of today's instances
        split = (current["prefill"] + current["decode"] + current["flex"]) / len(live)
        prefill = bounded("prefill", prefill_share * split)
        decode = bounded("decode", decode_share * split)
        colocated = bounded("both", (prefill_share + decode_share) * (1 - split))
    reason = (
        f"forecast {demand.prefill_work_s_per_s:.2f} prefill s/s and {demand.decode_streams:.1f} decode streams "
        f"({demand.context_tokens_per_stream:.0f} context tokens each; {streams_each} per instance within "
        f"{tpot * 1000:g} ms TPOT; prefill busy at most {busy:.0%}); {headroom:.0%} headroom"
    )
    return ScalePlan(model, prefill, decode, colocated, current, demand, streams_each, reason)
