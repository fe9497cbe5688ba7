"""vLLM-compatible chained prefix-cache block hashing (pure stdlib).

Mirrors vLLM's default ``--prefix-caching-hash-algo sha256`` as read from
``vllm-project/vllm``:

* ``vllm/utils/hashing.py`` ``sha256(input)``:
  ``hashlib.sha256(pickle.dumps(input, protocol=pickle.HIGHEST_PROTOCOL)).digest()``
* ``vllm/v1/core/kv_cache_utils.py``:

  - ``hash_block_tokens(hash_fn, parent, tokens, extra_keys)`` returns
    ``hash_fn((parent or NONE_HASH, tuple(tokens), extra_keys))``; a falsy
    parent (``None`` or ``b""``) means "first block" and is replaced by
    ``NONE_HASH``. ``extra_keys`` is ``None`` for plain-text requests (it is a
    tuple only for LoRA / multimodal / cache_salt / prompt-embeds requests).
  - ``NONE_HASH = hash_fn(seed)`` where ``seed`` is ``resolve_none_hash_seed``:
    the ``PYTHONHASHSEED`` environment value (the raw string) when set,
    otherwise ``DEFAULT_NONE_HASH_SEED = "vllm-none-hash"`` for cryptographic
    hashes (older trees used ``os.urandom(32)`` when PYTHONHASHSEED was unset,
    so hashes were only reproducible with PYTHONHASHSEED; newer ones use the
    fixed seed).
  - Only full blocks are hashed (``get_request_block_hasher``).
  - ``maybe_convert_block_hash``: KV events publish
    ``int.from_bytes(h, "big") & ((1 << 64) - 1)`` (the default
    ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``), i.e. the low 64 bits of the digest.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from collections.abc import Iterable, Sequence

NONE_HASH_SEED = "vllm-none-hash"
"""vLLM's ``DEFAULT_NONE_HASH_SEED`` (used when PYTHONHASHSEED is unset)."""

_U64_MASK = (1 << 64) - 1


def _sha256_pickle(obj: object) -> bytes:
    """vLLM's ``sha256`` hash function: SHA-256 of the highest-protocol pickle."""
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def resolve_none_hash_seed(seed: str | None = None) -> str:
    """Return the seed vLLM would derive ``NONE_HASH`` from.

    An explicit ``seed`` wins; otherwise ``PYTHONHASHSEED`` (read at call time,
    exactly as vLLM does at engine start) and finally ``NONE_HASH_SEED``.
    """
    if seed is not None:
        return seed
    return os.environ.get("PYTHONHASHSEED", NONE_HASH_SEED)


@functools.lru_cache(maxsize=16)
def _none_hash_for(seed: str) -> bytes:
    return _sha256_pickle(seed)


def none_hash(seed: str | None = None) -> bytes:
    """The chain root ``NONE_HASH``: ``sha256(pickle.dumps(seed, HIGHEST_PROTOCOL))``.

    ``seed`` is resolved with :func:`resolve_none_hash_seed`.
    """
    return _none_hash_for(resolve_none_hash_seed(seed))


def hash_block(
    parent: bytes | None,
    block_tokens: Sequence[int],
    extra_keys: tuple[object, ...] | None = None,
    *,
    seed: str | None = None,
) -> bytes:
    """Hash one full block chained to ``parent`` (vLLM ``hash_block_tokens``).

    A falsy ``parent`` stands for the first block and is replaced by
    ``none_hash(seed)``. Token ids are normalised to Python ``int`` so that
    e.g. numpy integers pickle exactly like vLLM's Python-int token lists.
    Returns the 32-byte SHA-256 digest.
    """
    if not parent:
        parent = none_hash(seed)
    tokens = tuple(map(int, block_tokens))
    return _sha256_pickle((bytes(parent), tokens, extra_keys))


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    *,
    seed: str | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    """Chained hashes of every *full* block of ``token_ids`` (trailing partial block ignored).

    ``parent`` continues an existing chain (hash of the block preceding
    ``token_ids[0]``); ``None`` starts from ``none_hash(seed)``.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    out: list[bytes] = []
    prev = parent
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = hash_block(prev, token_ids[start : start + block_size], seed=seed)
        out.append(prev)
    return out


def to_event_hash(h: bytes) -> int:
    """Block hash as published in vLLM KV events: the low 64 bits, big-endian."""
    return int.from_bytes(h, "big") & _U64_MASK


class BlockHasher:
    """Incremental hasher for one growing token sequence.

    Keeps the last hash of the chain and the not-yet-full tail, so appending
    tokens costs O(new tokens) and each newly completed block is hashed once.
    ``BlockHasher(bs).extend(tokens)`` then ``.hashes`` equals
    ``block_hashes(tokens, bs)`` for any split of ``tokens`` into calls.
    """

    __slots__ = ("_block_size", "_hashes", "_pending", "_root", "_seed")

    def __init__(self, block_size: int, *, seed: str | None = None, parent: bytes | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._block_size = block_size
        # Resolve once so a later PYTHONHASHSEED change cannot split one chain.
        self._seed = resolve_none_hash_seed(seed)
        self._root = parent
        self._hashes: list[bytes] = []
        self._pending: list[int] = []

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def hashes(self) -> list[bytes]:
        """Hashes of all full blocks so far (a copy)."""
        return list(self._hashes)

    @property
    def last_hash(self) -> bytes | None:
        """Hash of the last full block, or the ``parent`` given at construction."""
        return self._hashes[-1] if self._hashes else self._root

    @property
    def num_tokens(self) -> int:
        return len(self._hashes) * self._block_size + len(self._pending)

    def extend(self, token_ids: Iterable[int]) -> list[bytes]:
        """Append tokens; return the hashes of the blocks they completed (in order)."""
        new: list[bytes] = []
        bs = self._block_size
        for tok in token_ids:
            self._pending.append(tok)
            if len(self._pending) == bs:
                h = hash_block(self.last_hash, self._pending, seed=self._seed)
                self._hashes.append(h)
                new.append(h)
                self._pending = []
        return new

    def append(self, token_id: int) -> bytes | None:
        """Append one token; return the new block hash if it completed a block."""
        new = self.extend((token_id,))
        return new[0] if new else None
