"""One instance as the gateway keeps it: its load, health (circuit breaker), in-flight accounting
(:class:`Lease`) and what other replicas have in flight there (:class:`RemoteLoad`).

:class:`~pdgate.gateway.cluster.Cluster` holds one :class:`InstanceState` per instance and builds
the scheduler's snapshots from them.
"""

from __future__ import annotations

import functools
import math
import operator
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pdgate.adapters import EngineAdapter, InstanceSpec
from pdgate.adapters.load import EngineLoad
from pdgate.gateway.hash_schemes import HashScheme, approximate_scheme
from pdgate.gateway.lora import InstanceLoras
from pdgate.scheduler.snapshot import PREFILL_SHARE_WINDOW_S, InstanceView

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
