"""Paged KV cache with prefix caching, modelled on vLLM v1's block pool.

* A fixed pool of blocks of ``block_size`` tokens. Free blocks wait in an LRU queue; a freed
  block keeps its content hash and stays findable (a prefix-cache hit) until it is reused.
* A block becomes cacheable once all its tokens are computed; its key is vLLM's chained block
  hash, so hits are exact prefixes and the KV events the pool emits (``BlockStored`` when a
  block is registered, ``BlockRemoved`` when a cached block is evicted for reuse,
  ``AllBlocksCleared`` on reset) carry the same 64-bit hashes real vLLM publishes.
* Only one block per hash is registered; a duplicate computed in parallel stays private.
* The hashes carry each request's extra keys (LoRA adapter, ``cache_salt``), so requests of
  different adapters never share a block, and a ``BlockStored`` carries the request's ``lora_id``,
  ``lora_name`` and per-block ``extra_keys`` in vLLM's untagged form.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdgate.common.block_hash import NO_KEYS, BlockKeys, to_event_hash
from pdgate.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvCacheEvent


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


@dataclass
class PrefixCacheStats:
    """Counters in tokens, as vLLM reports them (``prefix_cache_queries/hits``)."""

    queries: int = 0
    hits: int = 0
    resets: int = 0


@dataclass
class _Stored:
    """Builds one request's ``BlockStored`` events: the request's fields and its blocks' extra keys."""

    keys: BlockKeys
    lora_id: int | None
    block_size: int
    extra_keys: list[tuple[object, ...] | None] = field(default_factory=list)

    def add_block(self, index: int) -> None:
        start = index * self.block_size
        self.extra_keys.append(
            None if self.keys is NO_KEYS else self.keys.event_extra_keys(start, start + self.block_size)
        )

    def event(self, hashes: list[int], parent: int | None, tokens: list[int], medium: str) -> list[KvCacheEvent]:
        extra_keys, self.extra_keys = self.extra_keys, []
        lora = self.keys.lora
        return [
            BlockStored(
                block_hashes=hashes,
                parent_block_hash=parent,
                token_ids=tokens,
                block_size=self.block_size,
                lora_id=self.lora_id,
                medium=medium,
                lora_name=None if lora is None else lora.name,
                extra_keys=extra_keys,  # [None, ...] for plain-text base-model requests, as vLLM sends
                group_idx=0,
                kv_cache_spec_kind="full_attention",
            )
        ]


@dataclass
class KVCacheManager:
    """Block allocation for requests; the caller owns each request's ``blocks`` list."""

    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    event_sink: Callable[[list[KvCacheEvent]], None] | None = None
    medium: str = "GPU"
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        # The free queue starts as every block in id order; blocks are made when first taken (the
        # never-used ones are at the queue's front, in id order, ahead of every freed one), so a
        # large pool costs nothing until it fills.
        self._blocks: list[KVBlock] = []  # made so far; block i at index i
        self._free: OrderedDict[int, KVBlock] = OrderedDict()  # freed blocks, least recently freed first
        self._cached: dict[bytes, KVBlock] = {}

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + self.num_blocks - len(self._blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, block_hashes: Sequence[bytes], max_tokens: int) -> list[KVBlock]:
        """Longest run of leading cached blocks, covering at most ``max_tokens`` tokens."""
        if not self.enable_prefix_caching:
            return []
        hits: list[KVBlock] = []
        limit = min(len(block_hashes), max_tokens // self.block_size)
        for i in range(limit):
            block = self._cached.get(block_hashes[i])
            if block is None:
                break
            hits.append(block)
        return hits

    def record_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.stats.queries += queried_tokens
        self.stats.hits += hit_tokens

    # ------------------------------------------------------------- allocation
    def can_allocate(self, owned: Sequence[KVBlock], new_hits: Sequence[KVBlock], total_tokens: int) -> bool:
        required = self.blocks_needed(total_tokens) - len(owned) - len(new_hits)
        evictable_hits = sum(1 for b in new_hits if b.ref_cnt == 0)
        return required <= self.num_free_blocks - evictable_hits

    def allocate(self, owned: list[KVBlock], new_hits: Sequence[KVBlock], total_tokens: int) -> bool:
        """Grow ``owned`` to hold ``total_tokens``: first the prefix hits, then fresh blocks.

        Returns False (and changes nothing) when the pool cannot supply the blocks.
        """
        if not new_hits and self.blocks_needed(total_tokens) <= len(owned):
            return True  # the owned blocks hold them already (most decode steps)
        if not self.can_allocate(owned, new_hits, total_tokens):
            return False
        for block in new_hits:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1
            owned.append(block)
        removed: list[int] = []
        for _ in range(self.blocks_needed(total_tokens) - len(owned)):
            if len(self._blocks) < self.num_blocks:  # a never-used block: the front of the queue
                block = KVBlock(len(self._blocks))
                self._blocks.append(block)
                block.ref_cnt = 1
                owned.append(block)
                continue
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                    removed.append(to_event_hash(block.block_hash))
                block.block_hash = None
            block.ref_cnt = 1
            owned.append(block)
        if removed:
            self._emit([BlockRemoved(block_hashes=removed, medium=self.medium, group_idx=0)])
        return True

    def free(self, owned: list[KVBlock]) -> None:
        """Release a request's blocks (tail first, so tails are evicted before shared heads)."""
        for block in reversed(owned):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
        owned.clear()

    def cache_blocks(
        self,
        owned: Sequence[KVBlock],
        block_hashes: Sequence[bytes],
        first: int,
        last: int,
        tokens_of: Callable[[int, int], list[int]],
        *,
        keys: BlockKeys = NO_KEYS,
        lora_id: int | None = None,
    ) -> None:
        """Register owned blocks ``first..last-1`` (now fully computed) in the prefix cache.

        ``keys`` and ``lora_id`` are the owning request's (its LoRA adapter, cache_salt): the
        ``BlockStored`` events carry them as vLLM's do (``lora_id``, ``lora_name``, per-block
        ``extra_keys``).
        """
        if not self.enable_prefix_caching or last <= first:
            return
        stored = _Stored(keys, lora_id, self.block_size)
        stored_hashes: list[int] = []
        stored_tokens: list[int] = []
        parent: int | None = to_event_hash(block_hashes[first - 1]) if first > 0 else None
        for i in range(first, last):
            block, h = owned[i], block_hashes[i]
            if block.block_hash is not None or h in self._cached:
                # already registered (a prefix hit) or a duplicate: nothing new to announce
                if stored_hashes:
                    self._emit(stored.event(stored_hashes, parent, stored_tokens, self.medium))
                    stored_hashes, stored_tokens = [], []
                parent = to_event_hash(h)
                continue
            block.block_hash = h
            self._cached[h] = block
            stored_hashes.append(to_event_hash(h))
            stored_tokens.extend(tokens_of(i * self.block_size, (i + 1) * self.block_size))
            stored.add_block(i)
        if stored_hashes:
            self._emit(stored.event(stored_hashes, parent, stored_tokens, self.medium))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; only possible when no request holds a block."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self._blocks:
            block.block_hash = None
        self._cached.clear()
        self.stats.resets += 1
        self._emit([AllBlocksCleared()])
        return True

    def _emit(self, events: list[KvCacheEvent]) -> None:
        if self.event_sink is not None:
            self.event_sink(events)
