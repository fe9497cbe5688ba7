"""The simulated engine's step loop, modelled on vLLM v1's scheduler.

Pure and clock-agnostic: callers pass ``now`` (seconds on any clock) and get back what one
forward step computes and what it produced. No I/O, no asyncio: it unit-tests directly and can
run in real time behind HTTP (see :mod:`engines.sim.engine`) or in virtual time.

One step:
1. :meth:`EngineCore.schedule` picks work under a token budget: running requests first (a decode
   token each, or the next chunk of a chunked prefill), preempting by recompute when the KV pool
   runs out (FCFS: the latest running request; priority: the lowest-priority one), then waiting
   requests in FCFS or (priority, arrival) order, with prefix-cache hits applied when they are
   first scheduled. A decode leg of a PD request first reserves blocks and asks the caller to pull
   the prompt's KV from its prefill peer (``ScheduledStep.kv_pulls``).
2. The caller advances the clock by :meth:`EngineCore.step_time` (the performance model).
3. :meth:`EngineCore.update` commits the step: computed tokens, newly full blocks registered in
   the prefix cache, one token sampled for every request whose context is fully computed, and
   stop checks (EOS, stop token ids, ``max_tokens``, ``max_model_len``).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from pdgate.common.block_hash import DEFAULT_HASH_ALGO, NO_KEYS, PrefixHasher
from pdgate.common.perf_model import EngineProfile, StepBatch
from pdgate.engines.sim.generation import ContextHash, TokenGenerator, stable_hash
from pdgate.engines.sim.kv_cache import KVCacheManager
from pdgate.engines.sim.request import RequestStatus, SimRequest

SchedulingPolicy = Literal["fcfs", "priority"]


@dataclass(frozen=True)
class CoreConfig:
    """Knobs of the step loop, named as vLLM names them."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    scheduling_policy: SchedulingPolicy = "fcfs"
    long_prefill_token_threshold: int = 0  # 0: a prefill chunk may use the whole budget
    kv_hold_timeout: float = 480.0  # seconds a prefill leg holds KV for its decode peer
    hash_algo: str = DEFAULT_HASH_ALGO  # --prefix-caching-hash-algo
    hash_seed: str | None = None  # NONE_HASH seed; None: as a vLLM process picks it (PYTHONHASHSEED, ...)
    max_loras: int | None = None  # distinct LoRA adapters per step (--max-loras); None: LoRA off


@dataclass
class ScheduledStep:
    """What one step computes."""

    entries: list[tuple[SimRequest, int]] = field(default_factory=list)
    batch: StepBatch = field(default_factory=StepBatch)
    preempted: list[SimRequest] = field(default_factory=list)
    kv_pulls: list[SimRequest] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.entries


@dataclass(frozen=True)
class RequestOutput:
    """What a step produced for one request."""

    request: SimRequest
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class HeldKV:
    """KV of a finished prefill leg, kept until its decode peer pulls it or it expires."""

    request: SimRequest
    expires_at: float


class _WaitingQueue:
    """FCFS deque or (priority, arrival) heap, with the operations the scheduler needs."""

    def __init__(self, policy: SchedulingPolicy) -> None:
        self._policy = policy
        self._heap: list[tuple[int, float, int, SimRequest]] = []
        self._fifo: deque[SimRequest] = deque()
        self._tiebreak = itertools.count()

    def __len__(self) -> int:
        return len(self._heap) if self._policy == "priority" else len(self._fifo)

    def __iter__(self) -> Iterator[SimRequest]:
        """The waiting requests, in no particular order."""
        return (item[3] for item in self._heap) if self._policy == "priority" else iter(self._fifo)

    def push(self, req: SimRequest, *, front: bool = False) -> None:
        if self._policy == "priority":
            heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._tiebreak), req))
        elif front:
            self._fifo.appendleft(req)
        else:
            self._fifo.append(req)

    def peek(self) -> SimRequest:
        return self._heap[0][3] if self._policy == "priority" else self._fifo[0]

    def pop(self) -> SimRequest:
        return heapq.heappop(self._heap)[3] if self._policy == "priority" else self._fifo.popleft()

    def remove(self, req: SimRequest) -> bool:
        if self._policy == "priority":
            for i, item in enumerate(self._heap):
                if item[3] is req:
                    self._heap[i] = self._heap[-1]
                    self._heap.pop()
                    heapq.heapify(self._heap)
                    return True
            return False
        try:
            self._fifo.remove(req)
            return True
        except ValueError:
            return False


class EngineCore:
    """Queues, KV cache and generation of one simulated engine instance."""

    def __init__(
        self,
        config: CoreConfig,
        kv_cache: KVCacheManager,
        profile: EngineProfile,
        generator: TokenGenerator,
    ) -> None:
        self.config = config
        self.kv = kv_cache
        self.profile = profile
        self.generator = generator
        self.waiting = _WaitingQueue(config.scheduling_policy)
        self.running: list[SimRequest] = []
        self.requests: dict[str, SimRequest] = {}
        self.held: dict[str, HeldKV] = {}
        self.num_preemptions = 0
        self.hasher = (
            PrefixHasher.for_engine(config.hash_algo)
            if config.hash_seed is None
            else PrefixHasher.create(config.hash_algo, config.hash_seed)
        )
        self._on_finish: list[Callable[[SimRequest], None]] = []

    # --------------------------------------------------------------- requests
    def add_request(self, req: SimRequest) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already running")
        if not req.prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        req.context_hash = ContextHash.of(req.prompt_token_ids)
        origin = (
            req.prompt_token_ids if req.length_key_tokens is None else req.prompt_token_ids[: req.length_key_tokens]
        )
        req.length_key = self.generator.length_key(origin)  # a migrated-in request keeps its origin's
        req.block_hashes = self.hasher.block_hashes(req.prompt_token_ids, self.kv.block_size, req.block_keys)
        sp = req.sampling
        req.sample_seed = None if sp.greedy else (sp.seed if sp.seed is not None else stable_hash(req.request_id))
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.push(req)

    def abort(
        self, request_id: str, now: float, status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> SimRequest | None:
        """Finish a request early (client gone, stop string seen); frees its blocks."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, status, now, hold=False)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------- scheduling
    def schedule(self, now: float) -> ScheduledStep:
        cfg = self.config
        step = ScheduledStep()
        budget = cfg.max_num_batched_tokens
        scheduled: dict[str, int] = {}

        for req in list(self.running):
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            remaining = len(req.prompt_token_ids) + len(req.output_token_ids) - req.num_computed_tokens
            num_new = 1 if remaining == 1 else self._chunk(req, remaining, budget)  # a decode step: one token
            if num_new <= 0:
                continue
            while not self.kv.allocate(req.blocks, (), req.num_computed_tokens + num_new):
                victim = self._preemption_victim()
                if victim.request_id in scheduled:
                    budget += scheduled.pop(victim.request_id)
                self._preempt(victim, now)
                step.preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled[req.request_id] = num_new
                budget -= num_new

        if not step.preempted:
            budget = self._schedule_waiting(step, scheduled, budget, now)

        prefill_tokens = prefill_pairs = decode_seqs = decode_kv = 0
        for req in self.running:
            tokens = scheduled.get(req.request_id)
            if tokens is None:
                continue
            step.entries.append((req, tokens))
            num_tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
            if tokens == 1 and req.num_computed_tokens + 1 == num_tokens:
                decode_seqs += 1
                decode_kv += num_tokens
            else:
                prefill_tokens += tokens
                prefill_pairs += tokens * (req.num_computed_tokens + tokens)
        step.batch = StepBatch(prefill_tokens, prefill_pairs, decode_seqs, decode_kv)
        return step

    def _chunk(self, req: SimRequest, remaining: int, budget: int) -> int:
        num_new = min(remaining, budget)
        threshold = self.config.long_prefill_token_threshold
        if threshold and num_new > threshold:
            num_new = threshold
        return num_new

    def _schedule_waiting(self, step: ScheduledStep, scheduled: dict[str, int], budget: int, now: float) -> int:
        cfg = self.config
        skipped: list[SimRequest] = []
        # vLLM: the adapters of the running requests scheduled this step; a waiting request with
        # another adapter waits while max_loras of them are in the batch
        loras = {r.lora_id for r in self.running if r.lora_id is not None and r.request_id in scheduled}
        while len(self.waiting) and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting.peek()
            if req.status is RequestStatus.WAITING_FOR_REMOTE_KVS:
                skipped.append(self.waiting.pop())
                continue
            if cfg.max_loras is not None and req.lora_id is not None:
                if req.lora_id not in loras and len(loras) >= cfg.max_loras:
                    skipped.append(self.waiting.pop())
                    continue
            hits = []
            if not req.blocks:
                if req.reserved_blocks:  # a migration target's reservation: give it back right before allocating
                    self.kv.free(req.reserved_blocks)
                hits = self.kv.find_prefix(req.block_hashes, req.num_tokens - 1)
                self.kv.record_query(req.num_tokens, len(hits) * self.kv.block_size)
                if req.remote_prefill is not None and not (req.remote_kv_failed or req.remote_kv_ready):
                    if not self._start_remote_prefill(req, hits):
                        break
                    skipped.append(self.waiting.pop())
                    step.kv_pulls.append(req)
                    continue
                req.num_computed_tokens = len(hits) * self.kv.block_size
            num_new = self._chunk(req, req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate(req.blocks, hits, req.num_computed_tokens + num_new):
                req.num_computed_tokens = 0 if not req.blocks else req.num_computed_tokens
                break
            if hits:
                req.num_hashed_blocks_cached = len(hits)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = req.num_computed_tokens
            self.waiting.pop()
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            scheduled[req.request_id] = num_new
            budget -= num_new
            if req.lora_id is not None:
                loras.add(req.lora_id)
        for req in reversed(skipped):  # back at the front, in their order
            self.waiting.push(req, front=True)
        return budget

    def _start_remote_prefill(self, req: SimRequest, hits: list) -> bool:
        """Reserve blocks for the whole prompt and mark the request as waiting for its KV.

        Like vLLM's NixlConnector, the decode side receives all prompt tokens but the last one,
        which it recomputes to sample the first output token.
        """
        local = len(hits) * self.kv.block_size
        if not self.kv.allocate(req.blocks, hits, req.num_prompt_tokens):
            return False
        req.num_hashed_blocks_cached = len(hits)
        req.num_computed_tokens = local
        req.num_external_tokens = max(0, req.num_prompt_tokens - 1 - local)
        req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        return True

    def finish_remote_kv(self, request_id: str, ok: bool, now: float) -> None:
        """The pull started for ``request_id`` ended; on failure fall back per ``ok`` handling."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.WAITING_FOR_REMOTE_KVS:
            return
        if ok:
            req.num_computed_tokens += req.num_external_tokens
            self._cache_full_blocks(req)
            req.remote_kv_ready = True
        else:
            req.remote_kv_failed = True
            req.num_external_tokens = 0
        req.num_cached_tokens = req.num_computed_tokens
        req.status = RequestStatus.WAITING

    def fail_request(self, request_id: str, error: str, now: float) -> SimRequest | None:
        req = self.requests.get(request_id)
        if req is not None:
            req.error = error
            self._finish(req, RequestStatus.FINISHED_ERROR, now, hold=False)
        return req

    def _preemption_victim(self) -> SimRequest:
        if self.config.scheduling_policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, req: SimRequest, now: float) -> None:
        self.running.remove(req)
        self.kv.free(req.blocks)
        req.num_computed_tokens = 0
        req.num_hashed_blocks_cached = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        self.waiting.push(req, front=True)

    # ----------------------------------------------------------------- update
    def step_time(self, step: ScheduledStep) -> float:
        return self.profile.step_time(step.batch) if step.entries else 0.0

    def update(self, step: ScheduledStep, now: float) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        block_size = self.kv.block_size
        for req, num_new in step.entries:
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            computed = req.num_computed_tokens + num_new
            req.num_computed_tokens = computed
            if computed // block_size > req.num_hashed_blocks_cached:
                self._cache_full_blocks(req)
            if computed < len(req.prompt_token_ids) + len(req.output_token_ids):
                continue  # a prefill chunk: nothing sampled yet
            token = self._sample(req)
            reason = self._append_token(req, token, now)
            outputs.append(RequestOutput(req, [token], reason))
        self.expire_held(now)
        return outputs

    def _sample(self, req: SimRequest) -> int:
        sp = req.sampling
        allow_eos = not sp.ignore_eos and len(req.output_token_ids) >= sp.min_tokens
        return self.generator.next_token(req.context_hash, req.length_key, seed=req.sample_seed, allow_eos=allow_eos)

    def _append_token(self, req: SimRequest, token: int, now: float) -> str | None:
        req.output_token_ids.append(token)
        req.context_hash.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        req.last_token_time = now
        size = self.kv.block_size
        num_output = len(req.output_token_ids)
        num_tokens = len(req.prompt_token_ids) + num_output
        if num_tokens % size == 0:
            parent = req.block_hashes[-1] if req.block_hashes else None
            start = num_tokens - size
            extra = None if req.block_keys is NO_KEYS else req.block_keys.extra_keys(start, num_tokens)
            req.block_hashes.append(self.hasher.hash_block(parent, req.tokens_slice(start, num_tokens), extra))
        sp = req.sampling
        status = None
        if (token == self.generator.eos_token_id and not sp.ignore_eos) or token in sp.stop_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif num_output >= sp.max_tokens or num_tokens >= self.config.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if status is None:
            return None
        # like NixlConnector: only a prefill leg capped by max_tokens hands its KV over
        self._finish(req, status, now, hold=status is RequestStatus.FINISHED_LENGTH)
        return status.value

    def _cache_full_blocks(self, req: SimRequest) -> None:
        full = min(req.num_computed_tokens // self.kv.block_size, len(req.block_hashes), len(req.blocks))
        if full > req.num_hashed_blocks_cached:
            self.kv.cache_blocks(
                req.blocks,
                req.block_hashes,
                req.num_hashed_blocks_cached,
                full,
                req.tokens_slice,
                keys=req.block_keys,
                lora_id=req.lora_id,
            )
            req.num_hashed_blocks_cached = full

    def _finish(self, req: SimRequest, status: RequestStatus, now: float, *, hold: bool) -> None:
        if req.status.finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is not RequestStatus.MIGRATING:
            self.waiting.remove(req)
        if req.reserved_blocks:
            self.kv.free(req.reserved_blocks)
        req.status = status
        self.requests.pop(req.request_id, None)
        if hold and req.kv_hold_key is not None:
            self.held[req.kv_hold_key] = HeldKV(req, now + self.config.kv_hold_timeout)
        else:
            self.kv.free(req.blocks)
        for callback in self._on_finish:
            callback(req)

    # ------------------------------------------------------- live migration
    def is_decoding(self, req: SimRequest) -> bool:
        """Running with its whole context computed but the last sampled token (a decode step next)."""
        return (
            req.status is RequestStatus.RUNNING
            and req.num_output_tokens > 0
            and req.num_computed_tokens == req.num_tokens - 1
        )

    def pause(self, request_id: str) -> SimRequest | None:
        """Take a decoding request out of scheduling (a live migration's stop-and-copy).

        A step already in flight skips it (see :meth:`update`), so it produces no further token;
        its blocks stay allocated and its KV covers every token but the last sampled one.
        """
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.RUNNING:
            return None
        self.running.remove(req)
        req.status = RequestStatus.MIGRATING
        return req

    def resume(self, request_id: str) -> None:
        """Undo :meth:`pause` (a migration interrupted before it finished)."""
        req = self.requests.get(request_id)
        if req is not None and req.status is RequestStatus.MIGRATING:
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def finish_migrated(self, request_id: str, hold_key: str, now: float) -> SimRequest | None:
        """End a paused request as migrated; its blocks are held under ``hold_key`` for the target."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.MIGRATING:
            return None
        req.kv_hold_key = hold_key
        self._finish(req, RequestStatus.FINISHED_MIGRATED, now, hold=True)
        return req

    def on_finish(self, callback: Callable[[SimRequest], None]) -> None:
        """Register a callback run when any request finishes (metrics, streams)."""
        self._on_finish.append(callback)

    # ------------------------------------------------------- held prefill KV
    def take_held(self, key: str) -> SimRequest | None:
        """Hand a held prefill's KV to its puller; the blocks are released."""
        held = self.held.pop(key, None)
        if held is None:
            return None
        self.kv.free(held.request.blocks)
        return held.request

    def expire_held(self, now: float) -> None:
        """Free held prefill KV nobody pulled within ``kv_hold_timeout``."""
        if not self.held:
            return
        for key in [k for k, h in self.held.items() if h.expires_at <= now]:
            self.kv.free(self.held.pop(key).request.blocks)

    def next_hold_expiry(self) -> float | None:
        return min((h.expires_at for h in self.held.values()), default=None)
