"""A request inside the simulated engine, and the parameters that steer its generation."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pdgate.common.block_hash import NO_KEYS, BlockKeys
from pdgate.engines.sim.generation import ContextHash


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"
    RUNNING = "running"
    PREEMPTED = "preempted"
    MIGRATING = "migrating"  # taken out of scheduling for the stop-and-copy of a live migration
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"
    FINISHED_MIGRATED = "migrated"  # moved to another engine: its KV is held for the target to pull

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
    RequestStatus.FINISHED_MIGRATED,
}


@dataclass(frozen=True)
class SamplingParams:
    """The subset of vLLM's sampling parameters the simulated model honours."""

    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    temperature: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class RemotePrefill:
    """Decode side of a PD hand-off: where to pull the prompt's KV from.

    ``protocol`` is ``"nixl"`` (vLLM's ``kv_transfer_params``) or ``"bootstrap"`` (SGLang's room).
    """

    protocol: str
    params: dict[str, Any]


@dataclass(eq=False)
class SimRequest:
    """One sequence in the engine. ``num_computed_tokens`` counts tokens whose KV exists."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    priority: int = 0
    kv_hold_key: str | None = None  # prefill leg of a PD request: hold the KV under this key for a puller
    remote_prefill: RemotePrefill | None = None  # decode leg: pull the prompt KV first
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # local prefix-cache hit at first scheduling; -1 until known
    num_external_tokens: int = 0  # prompt tokens that arrived by KV transfer
    blocks: list[Any] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_hashed_blocks_cached: int = 0  # leading blocks already offered to the prefix cache
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    remote_kv_ready: bool = False
    remote_kv_failed: bool = False
    length_key: int = 0
    sample_seed: int | None = None  # the sampler's seed (None: greedy), fixed when the request is added
    context_hash: ContextHash = field(default_factory=ContextHash)
    error: str | None = None
    reserved_blocks: list[Any] = field(
        default_factory=list
    )  # a migration target's reservation, freed when first scheduled
    length_key_tokens: int | None = None  # leading prompt tokens that were the original prompt (a migrated-in request)
    block_keys: BlockKeys = NO_KEYS  # vLLM's extra keys of its block hashes: LoRA adapter, cache_salt
    lora_id: int | None = None  # the engine's id of the request's LoRA adapter (KV events carry it)

    @property
    def lora_name(self) -> str | None:
        lora = self.block_keys.lora
        return None if lora is None else lora.name

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def tokens_slice(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return self.output_token_ids[start - n : stop - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n]
