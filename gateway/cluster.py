"""Live cluster state: per-instance load, health, in-flight accounting, and snapshots of it.

* Load: each instance's ``/metrics`` is scraped every ``scrape_interval_s``; a scrape older than
  ``stale_after_s`` is ignored (the view then shows ``None``).
* In-flight: the gateway counts what it has sent to each instance (requests, prefill tokens,
  decode tokens) from send until the end of the stream (:class:`Lease`).
* Health: an active ``/health`` check every ``interval_s`` plus passive failure counting; after
  ``failure_threshold`` consecutive failures the instance's circuit opens for ``cooldown_s``, then
  one trial request (half-open) closes it again on success.

One background task (the monitor) is owned by :class:`Cluster`; :meth:`Cluster.close` cancels
and awaits it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import operator
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pdgate.adapters import EngineAdapter, InstanceSpec, Upstream, UpstreamError, make_adapter
from pdgate.adapters.kv_events import KvEventFeed, KvEventSink, KvEventSource, KvEventSubscriber
from pdgate.adapters.load import EngineLoad
from pdgate.gateway.config import GatewayConfig, InstanceConfig, has_serving_path
from pdgate.gateway.hash_schemes import HashScheme, PromptHashes, SchemeBook, approximate_scheme, keyed
from pdgate.gateway.lora import InstanceLoras, LoraCatalog, read_adapters
from pdgate.gateway.lora_loader import LoraLoader
from pdgate.scheduler.costmodel.model import CostModel
from pdgate.scheduler.prefix_index import ApproximatePrefixIndex, ExactPrefixIndex
from pdgate.scheduler.snapshot import PREFILL_SHARE_WINDOW_S, ClusterSnapshot, InstanceView

log = logging.getLogger("pdgate.cluster")
_PREDICTED = operator.itemgetter(1)  # of a prefill_work entry (sent at, predicted s)


@dataclass
class CircuitBreaker:
    """Consecutive-failure breaker: closed -> open (cooldown) -> half-open (one trial) -> closed."""

    failure_threshold: int
    cooldown_s: float
    failures: int = 0
    open_until: float = 0.0
    trial_in_flight: bool = False

    def allows(self, now: float) -> bool:
        if self.failures < self.failure_threshold:
            return True
        return now >= self.open_until and not self.trial_in_flight

    @property
    def state(self) -> str:
        if self.failures < self.failure_threshold:
            return "closed"
        return "half-open" if self.trial_in_flight else "open"

    def record_success(self) -> None:
        self.failures = 0
        self.trial_in_flight = False

    def record_probe_success(self, now: float) -> None:
        """A passing health check: closes an open circuit once its cooldown is over."""
        if self.failures >= self.failure_threshold and now >= self.open_until:
            self.record_success()

    def record_failure(self, now: float) -> bool:
        """Count a failure; True when it opened the circuit (it was closed or half-open)."""
        was_open = self.failures >= self.failure_threshold and not self.trial_in_flight
        self.failures += 1
        self.trial_in_flight = False
        if self.failures >= self.failure_threshold:
            self.open_until = now + self.cooldown_s
            return not was_open
        return False

    def trip(self, now: float) -> None:
        """Open the circuit for a cooldown (another replica found the instance dead)."""
        self.failures = max(self.failures, self.failure_threshold)
        self.trial_in_flight = False
        self.open_until = max(self.open_until, now + self.cooldown_s)

    def on_send(self, now: float) -> None:
        if self.failures >= self.failure_threshold and now >= self.open_until:
            self.trial_in_flight = True


@dataclass(frozen=True)
class RemoteLoad:
    """What the other gateway replicas have in flight on one instance (summed; see load_sharing)."""

    requests: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_legs: int = 0
    prefill_wait_s: float = 0.0
    decode_legs: int = 0
    decode_context_tokens: int = 0
    tightest_tpot_s: float | None = None


NO_REMOTE_LOAD = RemoteLoad()
OVERDUE_S = 0.05  # a decode stream past its predicted end is taken to end this soon


def min_known(*values: float | None) -> float | None:
    """The least of the values that are known (``None`` when none is): the strictest of optional SLOs."""
    known = [v for v in values if v is not None]
    return min(known) if known else None


Role = Literal["prefill", "decode", "both"]


@dataclass(eq=False)
class InstanceState:
    spec: InstanceSpec
    adapter: EngineAdapter
    breaker: CircuitBreaker
    role: Role = "both"  # the role it serves in now (a flex instance's changes at run time; others' is spec.role)
    role_since: float = 0.0  # the cluster's clock when it took that role
    load: EngineLoad | None = None
    inflight_requests: int = 0
    inflight_prefill_tokens: int = 0
    inflight_decode_tokens: int = 0
    draining: bool = False
    live_streams: int = 0  # streamed answers relayed from here that the gateway can move
    last_error: str | None = None
    cost_group: str = ""
    prefill_work: dict[int, tuple[float, float]] = field(default_factory=dict)  # lease -> (sent at, predicted s)
    decode_inflight: int = 0
    decode_context_tokens: int = 0
    tpot_slos: Counter[float] = field(default_factory=Counter)
    decode_ends: dict[int, float] = field(default_factory=dict)  # decode lease -> when it is predicted to end
    next_decode_end: float | None = math.inf  # the least of decode_ends (inf: none; None: to recompute)

    prefill_finish: float = 0.0  # when the prefill work sent so far would be done at the predicted rate
    prefill_rate: float = 0.0  # predicted prefill seconds sent per second, decayed over PREFILL_SHARE_WINDOW_S
    prefill_rate_at: float = 0.0
    lora: InstanceLoras = field(default_factory=lambda: InstanceLoras(can_load=False))  # its LoRA adapters
    scheme: HashScheme = field(default_factory=lambda: approximate_scheme(16))  # how its prefix index hashes a prompt
    exact: bool = False  # its prefix hits come from its KV events (the exact index), not the approximate one
    index_group: int = 0  # the cluster's number for (exact, scheme): snapshots group instances by it
    reported_algo: str | None = None  # the hash algorithm its engine last reported
    scheme_problem: str = ""  # why its KV events cannot be matched (logged when it changes)

    @property
    def flexible(self) -> bool:
        """Whether its role may change while it serves (``role: flex`` in the config)."""
        return self.spec.role == "flex"

    @property
    def decodes(self) -> bool:
        """Whether it takes decode legs (and so may hold streams) in its current role."""
        return self.role != "prefill"

    def add_prefill(self, key: int, now: float, predicted: float) -> None:
        self.prefill_work[key] = (now, predicted)
        self.prefill_finish = max(self.prefill_finish, now) + predicted
        self.prefill_rate = self.prefill_share(now) + predicted / PREFILL_SHARE_WINDOW_S
        self.prefill_rate_at = now

    def prefill_share(self, now: float) -> float:
        """The share of its time the instance spends prefilling what the gateway sent it lately
        (predicted prefill seconds per second, decayed with a ``PREFILL_SHARE_WINDOW_S`` time
        constant): on an instance that also decodes, the share its decode batch stalls."""
        if not self.prefill_rate:
            return 0.0
        return self.prefill_rate * math.exp((self.prefill_rate_at - now) / PREFILL_SHARE_WINDOW_S)

    def remove_prefill(self, key: int, now: float) -> None:
        if self.prefill_work.pop(key, None) is not None and not self.prefill_work:
            self.prefill_finish = min(self.prefill_finish, now)  # idle: faster than predicted

    def prefill_wait(self, now: float) -> float:
        """Predicted wait of a new prefill behind the prefill work already sent here.

        Engines batch prefills (chunked prefill), so the order in which the queued ones finish is
        not first-come first-served, but the total work is conserved: the wait is the predicted
        work not done yet. Two estimates, the larger wins: the virtual finish time of all work
        sent (work-conserving queue at the predicted rate), and the in-flight work less at most
        the oldest leg's share (when the engine runs behind the predictions).
        """
        if not self.prefill_work:
            return 0.0
        oldest_sent, oldest_work = min(self.prefill_work.values())
        in_flight = sum(map(_PREDICTED, self.prefill_work.values()))
        return max(self.prefill_finish - now, in_flight - min(oldest_work, now - oldest_sent), 0.0)

    def decode_free_in(self, now: float) -> float:
        """Predicted seconds until one of this replica's decode streams here ends (0 with none). A
        stream past its predicted end is taken to end within ``OVERDUE_S``."""
        if not self.decode_ends:
            return 0.0
        if self.next_decode_end is None:  # the earliest one ended: found again once, not per snapshot
            self.next_decode_end = min(self.decode_ends.values())
        return max(self.next_decode_end - now, OVERDUE_S)

    def add_decode_end(self, key: int, end: float) -> None:
        self.decode_ends[key] = end
        if self.next_decode_end is not None:
            self.next_decode_end = min(self.next_decode_end, end)

    def remove_decode_end(self, key: int) -> None:
        end = self.decode_ends.pop(key, None)
        if not self.decode_ends:
            self.next_decode_end = math.inf
        elif end is not None and end == self.next_decode_end:
            self.next_decode_end = None

    def view(self, now: float, stale_after: float, remote: RemoteLoad = NO_REMOTE_LOAD) -> InstanceView:
        """The instance as the scheduler sees it: this replica's accounting plus ``remote``, the
        other replicas' (when they share their load). Taken for every snapshot, so built from its
        field values at once (:meth:`InstanceView.from_values`)."""
        spec = self.spec
        scraped = self.load
        load = scraped if scraped is not None and now - scraped.scraped_at <= stale_after else None
        lora = self.lora
        if now >= lora.expires_at:
            lora.expire(now)
        own_tpot = min(self.tpot_slos) if self.tpot_slos else None
        tpot = own_tpot if remote.tightest_tpot_s is None else min_known(own_tpot, remote.tightest_tpot_s)
        return InstanceView.from_values(
            {
                "id": spec.id,
                "url": spec.url,
                "role": self.role,
                "flexible": spec.role == "flex",
                "model": spec.model,
                "kind": spec.kind,
                "healthy": self.breaker.allows(now),
                "draining": self.draining,
                "running": load.running if load else None,
                "waiting": load.waiting if load else None,
                "kv_usage": load.kv_usage if load else None,
                "scrape_age_s": (now - scraped.scraped_at) if scraped else None,
                "inflight_requests": self.inflight_requests + remote.requests,
                "inflight_prefill_tokens": self.inflight_prefill_tokens + remote.prefill_tokens,
                "inflight_decode_tokens": self.inflight_decode_tokens + remote.decode_tokens,
                "block_size": spec.block_size,
                "capabilities": self.capability_names,
                "cost_group": self.cost_group,
                "prefill_wait_s": self.prefill_wait(now) + remote.prefill_wait_s,
                "prefill_inflight": len(self.prefill_work) + remote.prefill_legs,
                "decode_inflight": self.decode_inflight + remote.decode_legs,
                "decode_context_tokens": self.decode_context_tokens + remote.decode_context_tokens,
                "tightest_tpot_s": tpot,
                "decode_free_in_s": self.decode_free_in(now),
                "prefill_share": self.prefill_share(now) if self.role != "prefill" else 0.0,
                "loras": lora.names,
                "lora_room": lora.room_now,
                "lora_failed": lora.failed_now,
            }
        )

    @property
    def has_kv_events(self) -> bool:
        """Whether the gateway follows this instance's KV events (its exact prefix index) rather
        than recording what it sent there (the approximate one): it publishes them and the gateway
        hashes blocks as its engine does (:func:`pdgate.gateway.hash_schemes.engine_scheme`)."""
        return self.exact

    @functools.cached_property
    def capability_names(self) -> frozenset[str]:
        return frozenset(k for k, v in vars(self.adapter.capabilities).items() if v is True)


@dataclass(eq=False)
class Lease:
    """In-flight accounting for one leg on one instance; ``release`` is idempotent."""

    state: InstanceState
    prefill_tokens: int
    decode_tokens: int
    released: bool = False
    key: int = 0
    context_tokens: int = 0  # decode legs: the context this request adds to the batch
    tpot_slo: float | None = None
    decodes: bool = False
    on_release: Callable[[], None] | None = None
    clock: Callable[[], float] = time.monotonic  # the cluster's clock (the prefill queue's times are on it)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        state = self.state
        state.inflight_requests -= 1
        state.inflight_prefill_tokens -= self.prefill_tokens
        state.inflight_decode_tokens -= self.decode_tokens
        state.remove_prefill(self.key, self.clock())
        if self.decodes:
            state.decode_inflight -= 1
            state.decode_context_tokens -= self.context_tokens
            state.remove_decode_end(self.key)
            if self.tpot_slo is not None:
                state.tpot_slos[self.tpot_slo] -= 1
                if state.tpot_slos[self.tpot_slo] <= 0:
                    del state.tpot_slos[self.tpot_slo]
        if self.on_release is not None:
            self.on_release()

    def prefill_done(self) -> None:
        """The prefill part is over (the decode part, if any, goes on): stop counting it as queued work."""
        if not self.released and self.prefill_tokens:
            self.state.inflight_prefill_tokens -= self.prefill_tokens
            self.prefill_tokens = 0
        self.state.remove_prefill(self.key, self.clock())
        if self.on_release is not None:
            self.on_release()


def _kv_source(inst: InstanceConfig) -> KvEventSource | None:
    """Where an instance publishes its KV events, when it does."""
    if inst.kv_events is None:
        return None
    spec = inst.spec()
    return KvEventSource(
        spec.id, inst.kv_events.endpoint, inst.kv_events.replay_endpoint, inst.kv_events.topic, host=spec.host
    )


KvFeedFactory = Callable[[KvEventSink, list[KvEventSource]], KvEventFeed]


class Cluster:
    """All instances of the fleet, their state, and the prefix indexes.

    ``pool`` carries every exchange with the engines (through their adapters) and ``kv_feed``
    makes what follows their KV events: over HTTP and ZMQ by default, in memory under ``pdgate
    simulate``, whose ``clock`` is virtual.
    """

    def __init__(
        self,
        config: GatewayConfig,
        pool: Upstream,
        clock: Callable[[], float] = time.monotonic,
        kv_feed: KvFeedFactory = KvEventSubscriber,
    ) -> None:
        self.config = config
        self.clock = clock
        self.instances: dict[str, InstanceState] = {}
        self.on_release: Callable[[], None] | None = None  # called whenever capacity frees up (admission wakes)
        self.on_circuit_open: Callable[[str, str], None] | None = None  # (instance, reason): replicas are told
        self.on_prompt_recorded: Callable[[str, list[int]], None] | None = None  # approximate index, for replicas
        self.on_load_change: Callable[[], None] | None = None  # a lease opened, or closed: replicas are told
        self.prefill_work_sent: dict[str, float] = {}  # model -> predicted prefill seconds sent (role balancer)
        self.prefill_legs_sent: dict[str, int] = {}  # model -> prefill legs sent (their mean prefill time)
        self._lease_ids = itertools.count(1)
        self._pool = pool
        self.remote: dict[str, RemoteLoad] = {}  # other replicas' in-flight load per instance (load sharing)
        self.remote_prefill_work: dict[str, dict[str, tuple[float, int]]] = {}  # replica -> model -> (work, legs)
        self.loras = LoraCatalog({m.name: m.lora for m in config.models}, lambda: self.instances.values())
        self.lora_loader = LoraLoader(self.loras, clock)
        self.schemes = SchemeBook()  # every instance's prefix-index scheme
        for inst in config.instances:
            state = self._state_for(inst)
            self.instances[state.spec.id] = state
        self.exact_index = ExactPrefixIndex()
        self.approx_index = ApproximatePrefixIndex(max_blocks=config.approx_prefix_max_blocks)
        sources = [source for inst in config.instances if (source := _kv_source(inst)) is not None]
        self.kv_events = kv_feed(self.exact_index, sources)
        self._monitor: asyncio.Task[None] | None = None

    def _state_for(self, inst: InstanceConfig) -> InstanceState:
        spec = inst.spec()
        breaker = CircuitBreaker(self.config.health.failure_threshold, self.config.health.cooldown_s)
        adapter = make_adapter(spec, self._pool)
        state = InstanceState(spec, adapter, breaker, role=inst.start_role, cost_group=inst.cost_key())
        state.role_since = self.clock()
        state.lora = InstanceLoras(can_load=adapter.capabilities.lora, max_cpu_loras=spec.max_cpu_loras)
        self.loras.check_instance(spec, adapter.capabilities.lora)
        self._assign_scheme(state, None)
        return state

    def _assign_scheme(self, state: InstanceState, reported: str | None) -> None:
        """How the instance's prefix index hashes prompts, from its config and ``reported`` (the
        algorithm its engine reports): its engine's scheme for the exact index, when it publishes
        KV events and the gateway can hash as it does; else the approximate index's."""
        spec, choice = state.spec, self.schemes.choose(state.spec, state.adapter.capabilities.kv_events, reported)
        if choice.problem and choice.problem != state.scheme_problem:
            log.warning(
                "instance %s: prefix hits from the approximate index, its KV events cannot be matched: %s",
                spec.id,
                choice.problem,
            )
        elif choice.exact and choice.scheme.algo != state.scheme.algo and reported is not None:
            log.info("instance %s hashes prefix blocks with %s (as its engine reports)", spec.id, choice.scheme.algo)
        state.scheme, state.exact, state.index_group = choice.scheme, choice.exact, choice.group
        state.reported_algo, state.scheme_problem = reported, choice.problem

    def _engine_reported(self, state: InstanceState, load: EngineLoad) -> None:
        """What a scrape says of the engine's set-up: its hash algorithm, its LoRA slots."""
        if load.max_loras is not None:
            state.lora.report_max(load.max_loras)
        if load.hash_algo is None or load.hash_algo == state.reported_algo:
            return
        configured = state.spec.hash_algo
        if configured is not None and configured != load.hash_algo:
            log.warning(
                "instance %s: configured prefix_caching_hash_algo %s, but its engine reports %s (the config wins)",
                state.spec.id,
                configured,
                load.hash_algo,
            )
        self._assign_scheme(state, load.hash_algo)

    # ------------------------------------------------------- fleet changes
    async def add_instance(self, inst: InstanceConfig) -> InstanceState:
        """Serve one more instance from now on: its KV events followed, its load and health read at
        once (it is placed on from the next snapshot). The caller checked that its id is new."""
        state = self._state_for(inst)
        source = _kv_source(inst)
        if source is not None:
            await self.kv_events.add(source)
        self.instances[state.spec.id] = state
        await self._refresh_one(state, check_health=True)
        log.info("instance %s added (%s, %s, %s)", state.spec.id, state.spec.role, state.spec.kind, state.spec.url)
        return state

    async def remove_instance(self, instance_id: str) -> InstanceState:
        """Stop serving an instance and forget it: its KV-event subscription and prefix-index
        entries go; leases still open on it (a forced removal) count against nothing."""
        state = self.instances.pop(instance_id)
        await self.kv_events.remove(instance_id)  # forgets the exact index's entries too
        self.exact_index.forget(instance_id)
        self.approx_index.forget(instance_id)
        log.info("instance %s removed", instance_id)
        return state

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await self.kv_events.start()
        await self.refresh()
        self._monitor = asyncio.create_task(self._monitor_loop(), name="cluster-monitor")

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        await self.kv_events.close()

    async def _monitor_loop(self) -> None:
        scrape, health = self.config.scrape_interval_s, self.config.health.interval_s
        next_health = self.clock() + health
        while True:
            await asyncio.sleep(scrape)
            check_health = self.clock() >= next_health
            if check_health:
                next_health = self.clock() + health
            await self.refresh(check_health=check_health)

    async def refresh(self, *, check_health: bool = True) -> None:
        """Scrape every instance's load (and health) concurrently."""
        await asyncio.gather(*(self._refresh_one(s, check_health) for s in self.instances.values()))

    async def _refresh_one(self, state: InstanceState, check_health: bool) -> None:
        timeout = self.config.health.timeout_s
        try:
            state.load = await state.adapter.scrape_load(self.clock(), timeout)
            self._engine_reported(state, state.load)
        except (UpstreamError, ValueError) as exc:
            state.last_error = f"scrape failed: {exc!r}"
        if check_health:
            if await state.adapter.check_health(timeout):
                state.breaker.record_probe_success(self.clock())
                await read_adapters(state, self.clock, timeout)
            else:
                state.last_error = "health check failed"
                if state.breaker.record_failure(self.clock()):
                    self._circuit_opened(state.spec.id, state.last_error)

    # -------------------------------------------------------------- queries
    def for_model(self, model: str) -> list[InstanceState]:
        return [s for s in self.instances.values() if s.spec.model == model]

    def has_pd(self, model: str) -> bool:
        return any(s.role in ("prefill", "decode") for s in self.for_model(model))

    def snapshot(
        self, model: str, hashes: PromptHashes | None = None, costs: CostModel | None = None
    ) -> ClusterSnapshot:
        now = self.clock()
        stale = self.config.stale_after_s
        states = self.for_model(model)
        hits: dict[str, int] = {}
        if hashes is not None:  # one lookup per (index, scheme)
            groups: Iterable[tuple[tuple[bool, HashScheme], list[str]]]
            if hashes.keyed:  # the adapter's path and the salt make each instance's scheme its own
                keyed_groups: dict[tuple[bool, HashScheme], list[str]] = {}
                for state in states:
                    scheme = self.scheme_for(state, hashes)
                    if scheme is not None:
                        keyed_groups.setdefault((state.exact, scheme), []).append(state.spec.id)
                groups = keyed_groups.items()
            else:  # the common case: the instances' own schemes, grouped by number
                numbered: dict[int, list[str]] = {}
                for state in states:
                    numbered.setdefault(state.index_group, []).append(state.spec.id)
                groups = [(self.schemes.groups[n], ids) for n, ids in numbered.items()]
            for (exact, scheme), ids in groups:
                index = self.exact_index if exact else self.approx_index
                for instance_id, blocks in index.match_all(hashes.chain(scheme), ids).items():
                    if blocks:
                        hits[instance_id] = blocks * scheme.block_size
        remote = self.remote
        if remote:
            views = tuple([s.view(now, stale, remote.get(s.spec.id, NO_REMOTE_LOAD)) for s in states])
        else:
            views = tuple([s.view(now, stale) for s in states])
        return ClusterSnapshot(views, now, hits, costs)

    def scheme_for(self, state: InstanceState, hashes: PromptHashes) -> HashScheme | None:
        """How ``state``'s prefix index hashes the request ``hashes`` is of: its scheme with the
        request's adapter (as this instance knows it: its path there) and salt. None: the instance
        does not serve the request's adapter (nothing of it can be cached there)."""
        if not hashes.keyed:
            return state.scheme
        path = None
        if hashes.lora is not None:
            path = state.lora.adapters.get(hashes.lora)
            if path is None:
                return None
        return keyed(state.scheme, hashes, path)

    def prompt_hashes(
        self, model: str, token_ids: Sequence[int], *, lora: str | None = None, cache_salt: str | None = None
    ) -> PromptHashes:
        """A prompt of ``model`` hashed once per scheme its instances use (for a request with
        adapter ``lora`` and ``cache_salt``): one pass in the common case."""
        hashes = PromptHashes(token_ids, lora, cache_salt)
        for state in self.for_model(model):
            scheme = self.scheme_for(state, hashes)
            if scheme is not None:
                hashes.chain(scheme)
        return hashes

    def ready(self, model: str) -> bool:
        """Whether ``model`` has a healthy serving path (colocated, or prefill + decode)."""
        now = self.clock()
        return has_serving_path(s.role for s in self.for_model(model) if s.breaker.allows(now) and not s.draining)

    def has_kv_events(self, state: InstanceState) -> bool:
        """Whether the exact index (the engine's KV events) serves the instance."""
        return self._has_events(state)

    @staticmethod
    def _has_events(state: InstanceState) -> bool:
        return state.has_kv_events

    # ------------------------------------------------------------ accounting
    def lease(
        self,
        instance_id: str,
        *,
        prefill_tokens: int = 0,
        decode_tokens: int = 0,
        predicted_prefill_s: float | None = None,
        context_tokens: int | None = None,
        tpot_slo: float | None = None,
        decode_s: float | None = None,
    ) -> Lease:
        """Count a leg as in flight on ``instance_id`` until the lease is released.

        ``predicted_prefill_s``: the leg prefills (it joins the instance's predicted prefill queue);
        ``context_tokens``: the leg decodes (it joins the decode batch, with its TPOT SLO);
        ``decode_s``: how long it is predicted to decode (when the batch gets a free place).
        """
        state = self.instances[instance_id]
        now = self.clock()
        state.inflight_requests += 1
        state.inflight_prefill_tokens += prefill_tokens
        state.inflight_decode_tokens += decode_tokens
        state.breaker.on_send(now)
        lease = Lease(
            state,
            prefill_tokens,
            decode_tokens,
            key=next(self._lease_ids),
            on_release=self._released,
            clock=self.clock,
        )
        if predicted_prefill_s is not None:
            state.add_prefill(lease.key, now, predicted_prefill_s)
            if state.role != "decode":  # a prompt colocated on a decode instance loads the decode pool
                model = state.spec.model
                self.prefill_work_sent[model] = self.prefill_work_sent.get(model, 0.0) + predicted_prefill_s
                self.prefill_legs_sent[model] = self.prefill_legs_sent.get(model, 0) + 1
        if context_tokens is not None:
            lease.decodes = True
            lease.context_tokens = context_tokens
            lease.tpot_slo = tpot_slo
            state.decode_inflight += 1
            state.decode_context_tokens += context_tokens
            if decode_s is not None:
                state.add_decode_end(lease.key, now + decode_s)
            if tpot_slo is not None:
                state.tpot_slos[tpot_slo] += 1
        if self.on_load_change is not None:
            self.on_load_change()
        return lease

    def _released(self) -> None:
        if self.on_release is not None:
            self.on_release()
        if self.on_load_change is not None:
            self.on_load_change()

    def record_sent_prompt(self, instance_id: str, hashes: PromptHashes) -> None:
        """Approximate index: remember the prompt blocks an instance without KV events now holds."""
        state = self.instances[instance_id]
        if self._has_events(state):
            return
        scheme = self.scheme_for(state, hashes)
        if scheme is None:
            return
        blocks = hashes.chain(scheme)
        self.approx_index.record(instance_id, blocks)
        if self.on_prompt_recorded is not None:
            self.on_prompt_recorded(instance_id, blocks)

    def record_remote_prompt(self, instance_id: str, blocks: list[int]) -> None:
        """Approximate index: another replica sent these prompt blocks to the instance."""
        state = self.instances.get(instance_id)
        if state is not None and not self._has_events(state):
            self.approx_index.record(instance_id, blocks)

    def record_success(self, instance_id: str) -> None:
        self.instances[instance_id].breaker.record_success()

    def record_failure(self, instance_id: str, reason: str) -> None:
        state = self.instances[instance_id]
        state.last_error = reason
        if state.breaker.record_failure(self.clock()):
            self._circuit_opened(instance_id, reason)
        log.warning("instance %s failed: %s", instance_id, reason)

    def _circuit_opened(self, instance_id: str, reason: str) -> None:
        if self.on_circuit_open is not None:
            self.on_circuit_open(instance_id, reason)
