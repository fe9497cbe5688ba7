"""In-tree migration policies (Llumnix-style): which running requests move where, and why.

Both policies measure an instance's load in KV tokens, Llumnix's *virtual usage*
(:class:`LoadParams` documents the formula), and answer :meth:`target_for` (drain, failover)
with the least loaded candidate. ``load-balance`` also plans moves of its own; ``no-migration``
plans none.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Literal

from pydantic import Field

from pdgate.scheduler.framework import (
    MigrationPlan,
    MigrationPolicy,
    PluginParams,
    migration_candidates,
)
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RunningRequest

MIN_KV_USAGE_FOR_CAPACITY = 0.05
"""Below this KV usage the capacity an instance's usage implies is too noisy to use."""


class LoadParams(PluginParams):
    """The load measure shared by the migration policies.

    Per decode instance *i* (the requests of ``running`` on *i*, *N_i* of them)::

        load_i = sum(kv_tokens_r) + request_tokens * N_i + queued_i
        queued_i = max(inflight_prefill_tokens_i, waiting_i * (mean_kv + request_tokens))

    ``mean_kv`` is the mean ``kv_tokens`` of the model's running requests (a request in the
    engine's own queue is assumed to be a typical one); ``queued_i`` takes the larger of the
    gateway's in-flight prefill tokens and the engine's reported queue (``waiting``, when
    scraped), as both see the same queue from two sides.

    With ``normalize_by_capacity``, ``load_i`` is scaled by ``mean_capacity / capacity_i``,
    where ``capacity_i = sum(kv_tokens_r) / kv_usage_i`` is the KV capacity the instance's
    usage implies (when ``kv_usage_i >= 0.05`` and requests run there; otherwise the mean),
    so loads are in tokens of an average instance and a bigger instance takes more.
    """

    request_tokens: int = Field(
        256, ge=0, description="per-request cost in tokens (the batch-size part of decode cost)"
    )
    normalize_by_capacity: bool = Field(
        False,
        description="scale loads by the KV capacity implied by kv_usage "
        "(off by default: scraped usage lags the live request list)",
    )


class NoMigrationParams(LoadParams):
    pass


class LoadBalanceParams(LoadParams):
    imbalance_ratio: float = Field(
        1.5, ge=1.0, description="balance when max - min >= (imbalance_ratio - 1) * mean load"
    )
    min_gap_tokens: int = Field(1024, ge=0, description="... and max - min >= this many tokens")
    select: Literal["most-remaining", "least-kv", "remaining-per-kv"] = Field(
        "most-remaining",
        description="which request moves first: most predicted remaining output, "
        "least KV to copy, or most remaining output per KV token",
    )
    min_remaining_tokens: float = Field(
        32, ge=0, description="never move a request predicted to finish within this many tokens"
    )
    max_migrations_per_request: int = Field(2, ge=0, description="never move a request that has moved this often")
    min_decoding_s: float = Field(0.2, ge=0, description="never move a request decoding for less than this")
    max_moves_per_round: int = Field(2, ge=0, description="moves per plan() call, balance and defrag together")
    defrag: bool = Field(True, description="plan de-fragmentation moves")
    defrag_kv_usage: float = Field(
        0.9,
        gt=0,
        le=1,
        description="an instance at this KV usage or above with requests "
        "waiting is de-fragmented; instances at or above it are never targets",
    )
    defrag_cooldown_s: float = Field(
        1.0,
        ge=0,
        description="no de-fragmentation from an instance this long after a move "
        "out of it (its scraped usage predates the move)",
    )
    retry_after_s: float = Field(
        5.0, ge=0, description="a request whose move failed is not planned again for this long"
    )


class _Loads:
    """The loads of a model's decode instances, updated as moves are planned."""

    def __init__(
        self, instances: Iterable[InstanceView], running: Sequence[RunningRequest], params: LoadParams
    ) -> None:
        self.instances = {i.id: i for i in instances}
        self.request_tokens = params.request_tokens
        kv: dict[str, int] = defaultdict(int)
        count: dict[str, int] = defaultdict(int)
        for r in running:
            if r.instance_id in self.instances:
                kv[r.instance_id] += r.kv_tokens
                count[r.instance_id] += 1
        mean_kv = sum(r.kv_tokens for r in running) / len(running) if running else 0.0
        self.raw: dict[str, float] = {}
        for iid, inst in self.instances.items():
            queued = max(float(inst.inflight_prefill_tokens), (inst.waiting or 0) * (mean_kv + self.request_tokens))
            self.raw[iid] = kv[iid] + self.request_tokens * count[iid] + queued
        self.scale = {iid: 1.0 for iid in self.instances}
        if params.normalize_by_capacity:
            capacity = {
                iid: kv[iid] / inst.kv_usage
                for iid, inst in self.instances.items()
                if inst.kv_usage is not None and inst.kv_usage >= MIN_KV_USAGE_FOR_CAPACITY and kv[iid] > 0
            }
            if capacity:
                mean_capacity = sum(capacity.values()) / len(capacity)
                self.scale.update({iid: mean_capacity / c for iid, c in capacity.items()})

    def load(self, iid: str) -> float:
        return self.raw[iid] * self.scale[iid]

    def cost(self, request: RunningRequest) -> float:
        """Raw tokens a request adds where it runs."""
        return request.kv_tokens + self.request_tokens

    def after(self, request: RunningRequest, source: str, target: str) -> tuple[float, float]:
        """Source and target loads were ``request`` moved."""
        c = self.cost(request)
        return (self.raw[source] - c) * self.scale[source], (self.raw[target] + c) * self.scale[target]

    def move(self, request: RunningRequest, source: str, target: str) -> None:
        c = self.cost(request)
        self.raw[source] -= c
        self.raw[target] += c


def _decoders(snapshot: ClusterSnapshot, model: str) -> list[InstanceView]:
    return [i for i in snapshot.instances if i.model == model and i.available and i.serves("decode")]


def _least_loaded_target(
    request: RunningRequest,
    snapshot: ClusterSnapshot,
    running: Sequence[RunningRequest],
    exclude: Collection[str],
    params: LoadParams,
) -> str | None:
    candidates = migration_candidates(request, snapshot, exclude)
    if not candidates:
        return None
    model_running = [r for r in running if r.model == request.model]
    loads = _Loads(_decoders(snapshot, request.model), model_running, params)  # the candidates are among them
    cost = loads.cost(request)
    return min(candidates, key=lambda t: ((loads.raw[t.id] + cost) * loads.scale[t.id], t.id)).id


class NoMigration(MigrationPolicy):
    """Plans no moves; ``target_for`` still answers with the least loaded candidate (as
    ``load-balance`` does), so drain and failover work while balancing is off."""

    type_name = "no-migration"
    Params = NoMigrationParams

    def plan(self, snapshot: ClusterSnapshot, running: Sequence[RunningRequest], now: float) -> list[MigrationPlan]:
        return []

    def target_for(
        self,
        request: RunningRequest,
        snapshot: ClusterSnapshot,
        running: Sequence[RunningRequest],
        exclude: Collection[str] = (),
    ) -> str | None:
        return _least_loaded_target(request, snapshot, running, exclude, self.params)  # type: ignore[arg-type]


_SELECT_KEYS: dict[str, Callable[[RunningRequest], tuple[float, ...]]] = {
    "most-remaining": lambda r: (-r.remaining_tokens, r.kv_tokens),
    "least-kv": lambda r: (r.kv_tokens, -r.remaining_tokens),
    "remaining-per-kv": lambda r: (-r.remaining_tokens / max(r.kv_tokens, 1), r.kv_tokens),
}
"""Sort keys of ``select`` (ties: the order of ``running``, as the sort is stable)."""


class LoadBalance(MigrationPolicy):
    """Moves running requests from overloaded to underloaded decode instances (Llumnix).

    Loads are Llumnix's virtual usage in KV tokens (:class:`LoadParams`). Per model, over its
    healthy, non-draining decode instances, up to ``max_moves_per_round`` moves per call, loads
    re-evaluated after each planned move, at most one move per request:

    1. **defrag**: an instance with ``waiting > 0`` and ``kv_usage >= defrag_kv_usage`` (most
       loaded first; not within ``defrag_cooldown_s`` of a move out of it) sends one request to
       the least loaded instance whose ``kv_usage`` is known and below ``defrag_kv_usage``,
       making room for what waits there;
    2. **balance**: while ``max - min >= min_gap_tokens`` and ``max - min >= (imbalance_ratio - 1)
       * mean`` (loads of the instances; about ``max / min >= imbalance_ratio`` when most sit near
       the mean), a request moves from the most loaded instance to the least loaded one (not
       one at or above ``defrag_kv_usage``); if the most loaded has no request to move, the next
       most loaded that still meets the trigger against the least loaded is tried. A move must
       leave the target's load below the source's (so it strictly reduces their spread): a
       request costs ``kv_tokens + request_tokens`` on either side.

    Requests are considered in ``select`` order (``most-remaining``: the most predicted remaining
    output first, which relieves the source longest; ``least-kv``: the cheapest to copy first;
    ``remaining-per-kv``: the most remaining output per KV token copied), skipping those not
    ``migratable``, with ``remaining_tokens < min_remaining_tokens``, ``migrations >=
    max_migrations_per_request``, ``decoding_s < min_decoding_s`` or a failed move within
    ``retry_after_s``. ``target_for``: the least loaded candidate, the request's own cost added.
    """

    type_name = "load-balance"
    Params = LoadBalanceParams

    def __init__(self, name: str, params: LoadBalanceParams) -> None:
        super().__init__(name, params)
        self._moved_out: dict[str, float] = {}  # instance id -> time of the last successful move out of it
        self._failed: dict[str, float] = {}  # request id -> time of its last failed move

    def on_migrated(self, plan: MigrationPlan, ok: bool, now: float) -> None:
        p: LoadBalanceParams = self.params  # type: ignore[assignment]
        if ok:
            self._moved_out[plan.source] = now
            self._failed.pop(plan.request_id, None)
        else:
            self._failed[plan.request_id] = now
        self._moved_out = {k: t for k, t in self._moved_out.items() if now - t < p.defrag_cooldown_s}
        self._failed = {k: t for k, t in self._failed.items() if now - t < p.retry_after_s}

    def target_for(
        self,
        request: RunningRequest,
        snapshot: ClusterSnapshot,
        running: Sequence[RunningRequest],
        exclude: Collection[str] = (),
    ) -> str | None:
        return _least_loaded_target(request, snapshot, running, exclude, self.params)  # type: ignore[arg-type]

    def _movable(self, request: RunningRequest, now: float) -> bool:
        p: LoadBalanceParams = self.params  # type: ignore[assignment]
        failed = self._failed.get(request.request_id)
        return (
            request.migratable
            and request.remaining_tokens >= p.min_remaining_tokens
            and request.migrations < p.max_migrations_per_request
            and request.decoding_s >= p.min_decoding_s
            and (failed is None or now - failed >= p.retry_after_s)
        )

    def plan(self, snapshot: ClusterSnapshot, running: Sequence[RunningRequest], now: float) -> list[MigrationPlan]:
        p: LoadBalanceParams = self.params  # type: ignore[assignment]
        plans: list[MigrationPlan] = []
        for model in sorted({i.model for i in snapshot.instances}):
            if len(plans) >= p.max_moves_per_round:
                break
            decoders = _decoders(snapshot, model)
            if len(decoders) >= 2:
                self._plan_model(decoders, [r for r in running if r.model == model], now, plans)
        return plans

    def _plan_model(
        self, decoders: list[InstanceView], running: list[RunningRequest], now: float, plans: list[MigrationPlan]
    ) -> None:
        """Append to ``plans`` the moves among one model's decode instances."""
        p: LoadBalanceParams = self.params  # type: ignore[assignment]
        loads = _Loads(decoders, running, p)
        movable: dict[str, list[RunningRequest]] = defaultdict(list)  # per instance, in select order
        for r in sorted(running, key=_SELECT_KEYS[p.select]):
            if r.instance_id in loads.instances and self._movable(r, now):
                movable[r.instance_id].append(r)

        def full(inst: InstanceView) -> bool:
            return inst.kv_usage is not None and inst.kv_usage >= p.defrag_kv_usage

        def least_loaded(instances: list[InstanceView]) -> InstanceView:
            return min(instances, key=lambda t: (loads.load(t.id), t.id))

        def most_loaded_first() -> list[InstanceView]:
            return sorted(decoders, key=lambda i: (-loads.load(i.id), i.id))

        def add(request: RunningRequest, target: str, reason: str) -> None:
            plans.append(MigrationPlan(request.request_id, request.instance_id, target, reason))
            loads.move(request, request.instance_id, target)
            movable[request.instance_id].remove(request)

        if p.defrag:
            for source in most_loaded_first():
                if len(plans) >= p.max_moves_per_round:
                    return
                if not ((source.waiting or 0) > 0 and full(source)) or not movable[source.id]:
                    continue
                last = self._moved_out.get(source.id)
                if last is not None and now - last < p.defrag_cooldown_s:
                    continue  # its scraped queue and usage predate that move
                targets = [
                    t
                    for t in decoders
                    if t.id != source.id and t.kv_usage is not None and t.kv_usage < p.defrag_kv_usage
                ]
                if targets:
                    add(movable[source.id][0], least_loaded(targets).id, "defrag")

        while len(plans) < p.max_moves_per_round:
            targets = [t for t in decoders if not full(t)]
            if not targets:
                return
            cold = least_loaded(targets)
            floor = loads.load(cold.id)
            mean = sum(loads.load(i.id) for i in decoders) / len(decoders)
            threshold = max(float(p.min_gap_tokens), (p.imbalance_ratio - 1.0) * mean)
            chosen = None
            for source in most_loaded_first():
                gap = loads.load(source.id) - floor
                if gap <= 0 or gap < threshold:
                    break
                chosen = next((r for r in movable[source.id] if _improves(loads, r, source.id, cold.id)), None)
                if chosen is not None:
                    break
            if chosen is None:
                return
            add(chosen, cold.id, "balance")


def _improves(loads: _Loads, request: RunningRequest, source: str, target: str) -> bool:
    """Whether moving ``request`` leaves the target's load below the source's."""
    source_after, target_after = loads.after(request, source, target)
    return target_after < source_after
