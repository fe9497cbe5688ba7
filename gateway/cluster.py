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
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from pdgate.adapters import Upstream, UpstreamError, make_adapter
from pdgate.adapters.kv_events import KvEventFeed, KvEventSink, KvEventSource, KvEventSubscriber
from pdgate.adapters.load import EngineLoad
from pdgate.gateway.config import GatewayConfig, has_serving_path
from pdgate.gateway.hash_schemes import HashScheme, PromptHashes, SchemeBook, keyed
from pdgate.gateway.instance_config import InstanceConfig
from pdgate.gateway.instance_state import NO_REMOTE_LOAD, CircuitBreaker, InstanceState, Lease, RemoteLoad
from pdgate.gateway.lora import InstanceLoras, LoraCatalog, read_adapters
from pdgate.gateway.lora_loader import LoraLoader
from pdgate.scheduler.costmodel.model import CostModel
from pdgate.scheduler.prefix_index import ApproximatePrefixIndex, ExactPrefixIndex
from pdgate.scheduler.snapshot import ClusterSnapshot

log = logging.getLogger("pdgate.cluster")


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
