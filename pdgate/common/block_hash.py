"""vLLM-compatible chained prefix-cache block hashing: every ``--prefix-caching-hash-algo``, with extra keys.

Mirrors vLLM 0.32 (read in its installed source, ``pdgate engine vllm-setup``'s ``.vllm/venv``):

* ``vllm/config/cache.py``: ``PrefixCachingHashAlgo = Literal["sha256", "sha256_cbor", "xxhash",
  "xxhash_cbor"]``, default ``"sha256"``.
* ``vllm/utils/hashing.py`` (``get_hash_fn_by_name``):

  - ``sha256``: ``hashlib.sha256(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)).digest()``;
  - ``sha256_cbor``: ``hashlib.sha256(cbor2.dumps(x, canonical=True)).digest()``;
  - ``xxhash`` / ``xxhash_cbor``: ``xxhash.xxh3_128_digest`` of the same pickle / CBOR bytes
    (16-byte digests; the optional ``xxhash`` package, here the ``pdgate[xxhash]`` extra).

  The CBOR here is this module's own canonical encoder (:func:`cbor_canonical`) for the types a
  block key holds (bytes, str, int, tuple/list, None, bool); it is byte-identical to cbor2's.
* ``vllm/v1/core/kv_cache_utils.py``:

  - ``hash_block_tokens(hash_fn, parent, tokens, extra_keys)`` returns
    ``hash_fn((parent or NONE_HASH, tuple(tokens), extra_keys))``; a falsy parent means "first
    block". ``extra_keys`` is ``None`` when the block has none, else a tuple.
  - ``init_none_hash``: ``NONE_HASH = hash_fn(seed)``, ``seed`` by ``resolve_none_hash_seed``:
    ``PYTHONHASHSEED`` (the raw string) when set; else ``DEFAULT_NONE_HASH_SEED =
    "vllm-none-hash"`` for sha256 / sha256_cbor, and ``os.urandom(32).hex()`` (a fresh random
    seed per engine process) for xxhash / xxhash_cbor, whose hashes are therefore only
    reproducible outside the engine when it runs with ``PYTHONHASHSEED``.
  - ``generate_block_hash_extra_keys(request, start, end, mm_idx)``: the block's keys, in this
    order: ``("lora", lora_name, lora_path)`` on every block of a LoRA request
    (``_gen_lora_extra_hash_keys``: the path is part of the key, so a name re-pointed at another
    adapter does not reuse KV); ``("mm", identifier, offset - start)`` for every multimodal item
    whose placeholder range overlaps ``[start, end)`` (``_gen_mm_extra_hash_keys``; the offset
    may be negative for an item that began in an earlier block); ``("cache_salt", salt)`` on the
    first block only (``start == 0``); ``("prompt_embeds", digest)`` for prompt embeddings (not
    modelled here). No keys: ``None``.
  - ``to_event_extra_keys``: KV events carry the keys untagged, one entry per block: the LoRA
    *name* (not the path), ``(identifier, offset)`` pairs, the salt (:meth:`BlockKeys.event_extra_keys`).
  - ``get_request_block_hasher``: only full blocks are hashed.
  - ``maybe_convert_block_hash``: KV events publish ``int.from_bytes(h, "big") & (2**64 - 1)``
    (with the default ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``), the low 64 bits of the digest,
    for every algorithm (:func:`to_event_hash`).

pickle memoises objects that occur twice in one dump, so the *identity* of equal strings changes
the bytes. vLLM's tags (``"lora"``, ``"mm"``, ``"cache_salt"``) are shared constants, while names,
paths, salts and identifiers come from parsed JSON or flags, each its own object; the keys built
here copy every caller's string (:func:`_own`) to reproduce exactly that.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast, get_args

HashAlgo: TypeAlias = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
"""vLLM's ``PrefixCachingHashAlgo`` (``--prefix-caching-hash-algo``)."""

HASH_ALGOS: tuple[HashAlgo, ...] = get_args(HashAlgo)
DEFAULT_HASH_ALGO: HashAlgo = "sha256"
NON_CRYPTO_HASH_ALGOS: frozenset[str] = frozenset({"xxhash", "xxhash_cbor"})
"""Algorithms whose ``NONE_HASH`` seed vLLM draws at random unless ``PYTHONHASHSEED`` is set."""

NONE_HASH_SEED = "vllm-none-hash"
"""vLLM's ``DEFAULT_NONE_HASH_SEED`` (cryptographic algorithms, PYTHONHASHSEED unset)."""

XXHASH_MISSING = (
    "the xxhash prefix-caching hash algorithms need the `xxhash` package (>= 3, with xxh3_128_digest): "
    "pip install 'pdgate[xxhash]'"
)

_U64_MASK = (1 << 64) - 1
_LORA_TAG = "lora"
_MM_TAG = "mm"
_SALT_TAG = "cache_salt"

ExtraKeys: TypeAlias = tuple[Any, ...] | None
"""One block's extra keys as vLLM passes them to ``hash_block_tokens``."""


# ----------------------------------------------------------------------------- serialisation


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes((major << 5 | value,))
    for limit, extra, fmt in ((1 << 8, 24, ">B"), (1 << 16, 25, ">H"), (1 << 32, 26, ">I"), (1 << 64, 27, ">Q")):
        if value < limit:
            return bytes((major << 5 | extra,)) + struct.pack(fmt, value)
    raise AssertionError("unreachable: callers pass values below 2**64")


def _cbor_encode(obj: object, out: list[bytes]) -> None:
    if obj is None:
        out.append(b"\xf6")
    elif obj is True or obj is False:
        out.append(b"\xf5" if obj else b"\xf4")
    elif isinstance(obj, int):
        major, value = (0, obj) if obj >= 0 else (1, -1 - obj)
        if value < 1 << 64:
            out.append(_cbor_head(major, value))
        else:  # cbor2: a bignum, tag 2 (positive) or 3 (negative) over the minimal big-endian bytes
            out.append(_cbor_head(6, 2 + major))
            _cbor_encode(value.to_bytes((value.bit_length() + 7) // 8, "big"), out)
    elif isinstance(obj, bytes | bytearray | memoryview):
        data = bytes(obj)
        out.append(_cbor_head(2, len(data)))
        out.append(data)
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        out.append(_cbor_head(3, len(data)))
        out.append(data)
    elif isinstance(obj, tuple | list):
        out.append(_cbor_head(4, len(obj)))
        for item in obj:
            _cbor_encode(item, out)
    else:
        raise TypeError(f"cannot CBOR-encode a block hash key of type {type(obj).__name__}")


def cbor_canonical(obj: object) -> bytes:
    """``cbor2.dumps(obj, canonical=True)`` for the types a block key holds.

    None, bools, ints (bignums beyond 64 bits), bytes, str (UTF-8) and tuples/lists (arrays);
    anything else raises ``TypeError`` (a block key never holds it).
    """
    out: list[bytes] = []
    _cbor_encode(obj, out)
    return b"".join(out)


def _pickled(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


@functools.cache
def _xxh3_128() -> Callable[[bytes], bytes]:
    try:
        import xxhash
    except ImportError:
        raise ModuleNotFoundError(XXHASH_MISSING) from None
    digest = getattr(xxhash, "xxh3_128_digest", None)
    if digest is None:
        raise ModuleNotFoundError(XXHASH_MISSING)
    return cast("Callable[[bytes], bytes]", digest)


def _sha256(obj: object) -> bytes:
    return hashlib.sha256(_pickled(obj)).digest()


def _sha256_cbor(obj: object) -> bytes:
    return hashlib.sha256(cbor_canonical(obj)).digest()


def _xxhash(obj: object) -> bytes:
    return _xxh3_128()(_pickled(obj))


def _xxhash_cbor(obj: object) -> bytes:
    return _xxh3_128()(cbor_canonical(obj))


_HASH_FUNCTIONS: dict[str, Callable[[object], bytes]] = {
    "sha256": _sha256,
    "sha256_cbor": _sha256_cbor,
    "xxhash": _xxhash,
    "xxhash_cbor": _xxhash_cbor,
}


def check_hash_algo(algo: str) -> HashAlgo:
    """``algo`` if vLLM offers it, else ``ValueError`` naming the choices."""
    if algo not in _HASH_FUNCTIONS:
        raise ValueError(f"unknown prefix-caching hash algorithm {algo!r}; vLLM offers {', '.join(HASH_ALGOS)}")
    return cast("HashAlgo", algo)


def hash_function(algo: str) -> Callable[[object], bytes]:
    """vLLM's ``get_hash_fn_by_name(algo)``: object -> digest (32 bytes for sha256, 16 for xxhash).

    The xxhash variants raise ``ModuleNotFoundError`` (naming the ``pdgate[xxhash]`` extra) when
    called without the package.
    """
    return _HASH_FUNCTIONS[check_hash_algo(algo)]


# ----------------------------------------------------------------------------- chain root


def resolve_none_hash_seed(seed: str | None = None, algo: str = DEFAULT_HASH_ALGO) -> str:
    """The seed a vLLM engine running ``algo`` derives ``NONE_HASH`` from, as seen from outside it.

    An explicit ``seed`` wins (what the engine's ``PYTHONHASHSEED`` is known to be); then this
    process's ``PYTHONHASHSEED`` (read at call time, as vLLM reads it at engine start); then
    :data:`NONE_HASH_SEED` for sha256 / sha256_cbor. For xxhash / xxhash_cbor vLLM draws a random
    seed in that last case, which no one else can know: ``ValueError``.
    """
    if seed is not None:
        return seed
    env = os.environ.get("PYTHONHASHSEED")
    if env is not None:
        return env
    if check_hash_algo(algo) in NON_CRYPTO_HASH_ALGOS:
        raise ValueError(
            f"vLLM seeds {algo} block hashes with a random value per engine process unless PYTHONHASHSEED is set: "
            "run the engine with PYTHONHASHSEED and give that value as the hash seed"
        )
    return NONE_HASH_SEED


def engine_none_hash_seed(algo: str = DEFAULT_HASH_ALGO) -> str:
    """The seed an engine process picks at start, exactly as vLLM's ``init_none_hash`` does.

    ``PYTHONHASHSEED`` when set; else :data:`NONE_HASH_SEED` for sha256 / sha256_cbor and 32 random
    bytes in hex for xxhash / xxhash_cbor. For an engine (the simulated one); a client of an engine
    uses :func:`resolve_none_hash_seed`.
    """
    env = os.environ.get("PYTHONHASHSEED")
    if env is not None:
        return env
    return os.urandom(32).hex() if check_hash_algo(algo) in NON_CRYPTO_HASH_ALGOS else NONE_HASH_SEED


@functools.lru_cache(maxsize=32)
def _none_hash_for(algo: str, seed: str) -> bytes:
    return hash_function(algo)(seed)


def none_hash(seed: str | None = None, algo: str = DEFAULT_HASH_ALGO) -> bytes:
    """The chain root ``NONE_HASH = hash_fn(seed)``; ``seed`` by :func:`resolve_none_hash_seed`."""
    return _none_hash_for(algo, resolve_none_hash_seed(seed, algo))


# ----------------------------------------------------------------------------- extra keys


def _own(text: str) -> str:
    """A copy of ``text`` that is its own object (as a string parsed from JSON is); see the module doc."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """A request's LoRA adapter as vLLM keys its blocks: ``("lora", name, path)``.

    ``path`` is the adapter's ``lora_path`` exactly as the engine was given it (``--lora-modules
    name=path`` or ``/v1/load_lora_adapter``); vLLM lists it as the adapter's ``root`` in
    ``/v1/models``. KV events carry only the name (and the engine's integer ``lora_id``).
    """

    name: str
    path: str


@dataclass(frozen=True, slots=True)
class MmPlaceholder:
    """One multimodal item of a prompt: its identifier (vLLM's ``mm_feature.identifier``, the
    item's hash with the LoRA prefix if any) and its placeholder range in the prompt's tokens."""

    identifier: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockKeys:
    """What besides token ids goes into one request's block hashes (vLLM's extra keys).

    ``mm`` items must be sorted by ``offset`` and not overlap, as vLLM keeps them. A default
    instance means a plain-text base-model request: every block's keys are ``None``.
    """

    lora: LoraAdapter | None = None
    cache_salt: str | None = None
    mm: tuple[MmPlaceholder, ...] = ()

    @property
    def empty(self) -> bool:
        return self.lora is None and not self.cache_salt and not self.mm

    def extra_keys(self, start: int, end: int) -> ExtraKeys:
        """The keys of the block of tokens ``[start, end)`` (vLLM ``generate_block_hash_extra_keys``)."""
        keys: list[tuple[Any, ...]] = []
        if self.lora is not None:
            keys.append((_LORA_TAG, _own(self.lora.name), _own(self.lora.path)))
        keys += [(_MM_TAG, _own(m.identifier), m.offset - start) for m in self._mm_in(start, end)]
        if start == 0 and self.cache_salt:
            keys.append((_SALT_TAG, _own(self.cache_salt)))
        return tuple(keys) if keys else None

    def event_extra_keys(self, start: int, end: int) -> tuple[Any, ...] | None:
        """The same block's entry in a ``BlockStored`` event's ``extra_keys`` (vLLM ``to_event_extra_keys``):
        the LoRA name, ``(identifier, offset)`` pairs and the salt, untagged."""
        keys = self.extra_keys(start, end)
        if keys is None:
            return None
        return tuple(key[1:] if key[0] == _MM_TAG else key[1] for key in keys)

    def _mm_in(self, start: int, end: int) -> Iterable[MmPlaceholder]:
        return (m for m in self.mm if m.offset < end and m.offset + m.length > start)


NO_KEYS = BlockKeys()


def request_keys(
    *,
    lora: LoraAdapter | None = None,
    cache_salt: str | None = None,
    mm: Sequence[MmPlaceholder] = (),
) -> BlockKeys:
    """:class:`BlockKeys` from a request's adapter, ``cache_salt`` and multimodal items (sorted here)."""
    if not (lora or cache_salt or mm):
        return NO_KEYS
    return BlockKeys(lora, cache_salt or None, tuple(sorted(mm, key=lambda m: m.offset)))


# ----------------------------------------------------------------------------- hashing


@dataclass(frozen=True, slots=True)
class PrefixHasher:
    """One engine's block hashing: its algorithm and ``NONE_HASH`` seed.

    ``PrefixHasher(algo, seed)`` resolves the seed once (:func:`resolve_none_hash_seed`), so a
    later ``PYTHONHASHSEED`` change cannot split its chains; :meth:`for_engine` picks it as a vLLM
    engine process does (random for xxhash without ``PYTHONHASHSEED``).
    """

    algo: HashAlgo
    seed: str
    root: bytes

    @classmethod
    def create(cls, algo: str = DEFAULT_HASH_ALGO, seed: str | None = None) -> PrefixHasher:
        checked = check_hash_algo(algo)
        resolved = resolve_none_hash_seed(seed, checked)
        return cls(checked, resolved, _none_hash_for(checked, resolved))

    @classmethod
    def for_engine(cls, algo: str = DEFAULT_HASH_ALGO) -> PrefixHasher:
        """The hasher an engine process starts with (vLLM ``init_none_hash``)."""
        return cls.create(algo, engine_none_hash_seed(algo))

    def hash_block(self, parent: bytes | None, block_tokens: Sequence[int], extra_keys: ExtraKeys = None) -> bytes:
        """vLLM ``hash_block_tokens``: a falsy ``parent`` is the chain root ``NONE_HASH``.

        Token ids are normalised to Python ``int`` (numpy integers pickle differently).
        """
        key = (bytes(parent) if parent else self.root, tuple(map(int, block_tokens)), extra_keys)
        return _HASH_FUNCTIONS[self.algo](key)

    def block_hashes(
        self,
        token_ids: Sequence[int],
        block_size: int,
        keys: BlockKeys = NO_KEYS,
        *,
        parent: bytes | None = None,
        start: int = 0,
    ) -> list[bytes]:
        """Chained hashes of every *full* block of ``token_ids`` (a trailing partial block is not hashed).

        ``parent`` continues a chain: the hash of the block before ``token_ids[0]``, which is the
        request's token number ``start`` (a multiple of ``block_size``; it places the blocks for
        ``keys``: the salt only on the request's first block, multimodal offsets).
        """
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        out: list[bytes] = []
        prev = parent
        for i in range(0, len(token_ids) - block_size + 1, block_size):
            extra = None if keys is NO_KEYS else keys.extra_keys(start + i, start + i + block_size)
            prev = self.hash_block(prev, token_ids[i : i + block_size], extra)
            out.append(prev)
        return out


def hash_block(
    parent: bytes | None,
    block_tokens: Sequence[int],
    extra_keys: ExtraKeys = None,
    *,
    seed: str | None = None,
    algo: str = DEFAULT_HASH_ALGO,
) -> bytes:
    """Hash one full block chained to ``parent`` (vLLM ``hash_block_tokens``), see :meth:`PrefixHasher.hash_block`.

    ``extra_keys`` are passed as they are (build them with :meth:`BlockKeys.extra_keys`).
    """
    return PrefixHasher.create(algo, seed).hash_block(parent, block_tokens, extra_keys)


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    *,
    seed: str | None = None,
    parent: bytes | None = None,
    algo: str = DEFAULT_HASH_ALGO,
    lora: LoraAdapter | None = None,
    cache_salt: str | None = None,
    mm: Sequence[MmPlaceholder] = (),
    start: int = 0,
) -> list[bytes]:
    """One request's chain in one call: the hashes of every full block of ``token_ids``.

    ``algo`` and ``seed`` are the engine's (``--prefix-caching-hash-algo``, ``PYTHONHASHSEED``);
    ``lora``, ``cache_salt`` and ``mm`` the request's extra keys. ``parent`` / ``start`` continue a
    chain (see :meth:`PrefixHasher.block_hashes`); ``None`` starts from ``none_hash(seed, algo)``.
    """
    keys = request_keys(lora=lora, cache_salt=cache_salt, mm=mm)
    return PrefixHasher.create(algo, seed).block_hashes(token_ids, block_size, keys, parent=parent, start=start)


def to_event_hash(h: bytes) -> int:
    """Block hash as published in vLLM KV events: the low 64 bits, big-endian (any algorithm)."""
    return int.from_bytes(h, "big") & _U64_MASK


class BlockHasher:
    """Incremental hasher for one growing token sequence.

    Keeps the last hash of the chain and the not-yet-full tail, so appending tokens costs
    O(new tokens) and each newly completed block is hashed once. ``BlockHasher(bs, ...).extend(tokens)``
    then ``.hashes`` equals ``block_hashes(tokens, bs, ...)`` (same options) for any split of
    ``tokens`` into calls. ``parent`` / ``start`` continue a chain as in :func:`block_hashes`.
    """

    __slots__ = ("_block_size", "_hasher", "_hashes", "_keys", "_pending", "_root", "_start")

    def __init__(
        self,
        block_size: int,
        *,
        seed: str | None = None,
        parent: bytes | None = None,
        algo: str = DEFAULT_HASH_ALGO,
        lora: LoraAdapter | None = None,
        cache_salt: str | None = None,
        mm: Sequence[MmPlaceholder] = (),
        start: int = 0,
        hasher: PrefixHasher | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._block_size = block_size
        # resolved once, so a later PYTHONHASHSEED change cannot split one chain
        self._hasher = hasher or PrefixHasher.create(algo, seed)
        self._keys = request_keys(lora=lora, cache_salt=cache_salt, mm=mm)
        self._root = parent
        self._start = start
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
                begin = self._start + len(self._hashes) * bs
                extra = None if self._keys is NO_KEYS else self._keys.extra_keys(begin, begin + bs)
                h = self._hasher.hash_block(self.last_hash, self._pending, extra)
                self._hashes.append(h)
                new.append(h)
                self._pending = []
        return new

    def append(self, token_id: int) -> bytes | None:
        """Append one token; return the new block hash if it completed a block."""
        new = self.extend((token_id,))
        return new[0] if new else None
