"""How each instance hashes a prompt's blocks, and one request's chains under every scheme in use.

vLLM keys its prefix cache by chained block hashes (:mod:`pdgate.common.block_hash`). What goes
into one engine's chain for one request, a :class:`HashScheme`:

* the engine's block size, its ``--prefix-caching-hash-algo`` (sha256, sha256_cbor, xxhash,
  xxhash_cbor) and its ``NONE_HASH`` seed (``PYTHONHASHSEED``, else vLLM's default);
* the request's extra keys: its LoRA adapter as *that* engine knows it (name and the path it was
  loaded from: vLLM keys every block with ``("lora", name, path)``) and its ``cache_salt``.

An instance's algorithm is its config's ``prefix_caching_hash_algo``, else what the engine reports
(``vllm:cache_config_info``'s label), else vLLM's default. The exact index (KV events) needs the
engine's real scheme; where the gateway cannot reproduce it (xxhash without a known seed, an
algorithm it does not know, xxhash without the package) the instance falls back to the
approximate index, which records the gateway's own hashes of what it sent there and so only needs
them to be consistent: it always uses sha256 with the default seed (:func:`approximate_scheme`).

:class:`PromptHashes` hashes a prompt once per distinct scheme (in the common case, one block
size and no adapter or salt: one pass) and on demand for a scheme met later.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from pdgate.adapters import InstanceSpec
from pdgate.common.block_hash import (
    DEFAULT_HASH_ALGO,
    NO_KEYS,
    NON_CRYPTO_HASH_ALGOS,
    NONE_HASH_SEED,
    BlockKeys,
    HashAlgo,
    LoraAdapter,
    PrefixHasher,
    check_hash_algo,
    hash_function,
    request_keys,
    to_event_hash,
)


@dataclass(frozen=True, slots=True)
class HashScheme:
    """One engine's block hashing for one kind of request (see the module doc).

    Hashable with its hash computed once (schemes key the chains of every request); equal schemes
    give equal chains.
    """

    block_size: int
    algo: HashAlgo = DEFAULT_HASH_ALGO
    seed: str = NONE_HASH_SEED
    keys: BlockKeys = NO_KEYS
    _hash: int = field(init=False, repr=False, compare=False)
    _hasher: PrefixHasher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.block_size, self.algo, self.seed, self.keys)))
        object.__setattr__(self, "_hasher", PrefixHasher.create(self.algo, self.seed))

    def __hash__(self) -> int:
        return self._hash

    def with_keys(self, keys: BlockKeys) -> HashScheme:
        """The same engine's scheme for a request with these extra keys."""
        return self if keys == self.keys else replace(self, keys=keys)

    def chain(self, token_ids: Sequence[int]) -> list[int]:
        """The prompt's full blocks as the engine publishes them in its KV events (64-bit)."""
        return [to_event_hash(h) for h in self._hasher.block_hashes(token_ids, self.block_size, self.keys)]


def engine_scheme(
    block_size: int, algo: str | None, seed: str | None, reported: str | None = None
) -> tuple[HashScheme | None, str]:
    """The scheme an engine hashes plain base-model requests with, or None and why the gateway
    cannot reproduce it.

    ``algo``: the configured algorithm (None: ``reported``, the engine's own report, else vLLM's
    default sha256). ``seed``: the engine's ``PYTHONHASHSEED`` when configured; else this
    process's own ``PYTHONHASHSEED`` when set (engines that ``pdgate up`` starts inherit it), else
    vLLM's fixed default seed, which only sha256 and sha256_cbor use: for xxhash vLLM draws a
    random seed per process, which no one else can know.
    """
    chosen = algo or reported or DEFAULT_HASH_ALGO
    try:
        checked = check_hash_algo(chosen)
    except ValueError as exc:
        return None, str(exc)
    resolved = seed if seed is not None else os.environ.get("PYTHONHASHSEED")
    if resolved is None:
        if checked in NON_CRYPTO_HASH_ALGOS:
            return None, (
                f"vLLM seeds {checked} block hashes at random in each engine process unless PYTHONHASHSEED is "
                "set: run the engine with PYTHONHASHSEED and give that value as the instance's hash_seed"
            )
        resolved = NONE_HASH_SEED
    try:
        hash_function(checked)(b"")
    except ModuleNotFoundError as exc:
        return None, str(exc)
    return HashScheme(block_size, checked, resolved), ""


def approximate_scheme(block_size: int) -> HashScheme:
    """The scheme of the approximate index (the gateway's own record of what it sent): sha256 with
    the seed this process would give a default engine, as before instances had schemes."""
    return HashScheme(block_size, DEFAULT_HASH_ALGO, os.environ.get("PYTHONHASHSEED", NONE_HASH_SEED))


@dataclass(frozen=True)
class IndexChoice:
    """Which prefix index serves an instance and how it hashes: ``exact`` (its KV events) with its
    engine's ``scheme``, or the approximate index's; ``group``: the number of (exact, scheme) in
    its :class:`SchemeBook`; ``problem``: why the KV events cannot be matched (empty when they can,
    or when there are none)."""

    scheme: HashScheme
    exact: bool
    group: int
    problem: str = ""


class SchemeBook:
    """The schemes of one cluster: one object per distinct scheme (equal schemes share their
    chains) and a number per (exact, scheme), by which snapshots group instances cheaply."""

    def __init__(self) -> None:
        self._schemes: dict[HashScheme, HashScheme] = {}
        self._numbers: dict[tuple[bool, HashScheme], int] = {}
        self.groups: list[tuple[bool, HashScheme]] = []  # by number

    def choose(self, spec: InstanceSpec, publishes_events: bool, reported: str | None) -> IndexChoice:
        """An instance's index and scheme, from its config (``spec``: block size, algorithm, seed,
        KV-event endpoint), whether its kind publishes KV events, and ``reported``: the algorithm
        its engine reports (:func:`engine_scheme`)."""
        scheme, why = engine_scheme(spec.block_size, spec.hash_algo, spec.hash_seed, reported)
        events = publishes_events and spec.kv_events_endpoint is not None
        exact = events and scheme is not None
        chosen = scheme if exact and scheme is not None else approximate_scheme(spec.block_size)
        chosen = self._schemes.setdefault(chosen, chosen)
        number = self._numbers.get((exact, chosen))
        if number is None:
            number = self._numbers[exact, chosen] = len(self.groups)
            self.groups.append((exact, chosen))
        return IndexChoice(chosen, exact, number, why if events and not exact else "")


def keyed(scheme: HashScheme, hashes: PromptHashes, lora_path: str | None) -> HashScheme:
    """``scheme`` (an instance's) for the request ``hashes`` is of: its adapter (loaded from
    ``lora_path`` on that instance) and its salt; built once per request and (scheme, path)."""
    key = (scheme, lora_path)
    found = hashes.keyed_schemes.get(key)
    if found is None:
        lora = LoraAdapter(hashes.lora, lora_path) if hashes.lora is not None and lora_path is not None else None
        found = hashes.keyed_schemes[key] = scheme.with_keys(request_keys(lora=lora, cache_salt=hashes.cache_salt))
    return found


class PromptHashes:
    """One prompt's chained block hashes (as KV events publish them) under each scheme asked for.

    ``lora`` (the adapter's name) and ``cache_salt`` are the request's extra keys; each instance
    turns them into its own scheme (the adapter's path is the instance's). :meth:`chain` hashes a
    scheme on first use and keeps it: equal schemes share one pass.
    """

    __slots__ = ("cache_salt", "chains", "keyed_schemes", "lora", "token_ids")

    def __init__(self, token_ids: Sequence[int], lora: str | None = None, cache_salt: str | None = None) -> None:
        self.token_ids = token_ids
        self.lora = lora
        self.cache_salt = cache_salt or None
        self.chains: dict[HashScheme, list[int]] = {}
        # (an instance's scheme, the adapter's path there) -> this request's scheme on it, built once
        self.keyed_schemes: dict[tuple[HashScheme, str | None], HashScheme] = {}

    @classmethod
    def of(
        cls,
        token_ids: Sequence[int],
        schemes: Iterable[HashScheme],
        *,
        lora: str | None = None,
        cache_salt: str | None = None,
    ) -> PromptHashes:
        """The prompt hashed under each of ``schemes`` now."""
        hashes = cls(token_ids, lora, cache_salt)
        for scheme in schemes:
            hashes.chain(scheme)
        return hashes

    @property
    def keyed(self) -> bool:
        """Whether the request has extra keys (an adapter or a salt): its schemes differ per instance."""
        return self.lora is not None or self.cache_salt is not None

    def chain(self, scheme: HashScheme) -> list[int]:
        chain = self.chains.get(scheme)
        if chain is None:
            chain = self.chains[scheme] = scheme.chain(self.token_ids)
        return chain

    def first_chain(self) -> list[int]:
        """The chain of the first scheme hashed (empty before any): the request's block hashes as
        the scheduler sees them (``RequestInfo.block_hashes``)."""
        return next(iter(self.chains.values()), [])
