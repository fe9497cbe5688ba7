"""vLLM's KV-cache event wire format, defined once: the event types, their encoding and decoding.

The simulated engine's publisher (``engines/sim/kv_events.py``) encodes with :func:`encode_batch`;
the gateway's subscriber (``adapters/kv_events.py``) decodes with :func:`decode_batch` and feeds the
events to the prefix index (``scheduler/prefix_index.py``). Sockets live in those two modules; this
one is pure (msgpack, no I/O).

Sources read: ``vllm-project/vllm`` ``vllm/distributed/kv_events.py`` (commit
0181ea3 and the older b4e69e0), the newer tree in ``local-inference-lab/vllm``
(same path), a real vLLM 0.26 capture quoted in volcano-sh/kthena#1535, and vLLM 0.32's
installed source (``BlockStored`` of 14 fields: the upstream 11 + ``locality``, ``ownership``,
``session_id``; ``BlockRemoved`` + ``locality``, ``ownership``; :data:`VLLM_032_SCHEMA`).
vLLM PR #42892 dropped ``array_like`` from the *event* structs; the batch
stayed array-like (0.26 capture: ``[ts, [{'type': 'BlockStored', ...}], 0]``).

Structs (msgspec; ``omit_defaults=True, gc=False``; fields in declaration order)::

    EventBatch(array_like=True): ts: float, events: list, data_parallel_rank: int|None = None
    KVCacheEvent(tag=True):      base class; map-encoded, tag key "type" = class name, first
    BlockStored:      block_hashes, parent_block_hash, token_ids, block_size,
                      lora_id, medium, lora_name                   # no default: always sent
                      extra_keys, group_idx, kv_cache_spec_kind,
                      kv_cache_spec_sliding_window                 # =None  (vllm-project/vllm)
                      locality, ownership, session_id, skipped_parent_block_hash,
                      skipped_token_ids, skipped_extra_keys        # =None  (newer tree)
    BlockRemoved:     block_hashes, medium                         # no default
                      group_idx                                    # =None  (vllm-project/vllm)
                      locality, ownership                          # =None  (newer tree)
    AllBlocksCleared: no fields
    (b4e69e0, pre-#42892: events array_like too -> ["BlockStored", hashes,
     parent, tokens, block_size, lora_id]; BlockRemoved [tag, hashes].)

msgspec encoding details reproduced by :func:`encode_batch` (checked against msgspec 0.22):

* The batch is always a 3-element array ``[ts(float64), [events], rank]``:
  ``omit_defaults`` does not shorten array-like structs, a ``None`` rank is nil.
* Event maps hold ``type``, every no-default field (even when nil), then each
  defaulted field whose value is not ``None``, in declaration order.
* The map header width depends on the number of *declared* fields, not on the
  number written: ``fields + 1 (tag) < 16`` -> fixmap, else map16. Hence the
  vLLM tree matters for byte identity (the 11-field upstream ``BlockStored``
  uses fixmap, the 17-field newer one map16); see :class:`WireSchema`.
* Hashes are uint64 (``pdgate.common.block_hash.to_event_hash``), or raw digest
  ``bytes`` (msgpack bin) when vLLM runs with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``.
* A LoRA request's blocks (vLLM 0.32, checked on the CPU build): ``lora_id`` the engine's adapter
  id (1, 2, ... in load order), ``lora_name`` the adapter's name, ``extra_keys`` one entry per
  block, untagged (``["sql-lora"]``, with a ``cache_salt`` on the first block
  ``["sql-lora", "salt"]``); a base-model request sends nil ``lora_id``/``lora_name`` and
  ``[None, ...]``. The hashes themselves include the adapter (``pdgate.common.block_hash``).

Decoding (:func:`decode_batch`) accepts both event forms: maps tagged by ``"type"`` (vLLM >= PR
#42892) and, from older vLLM, arrays with the tag first:
``["BlockStored", hashes, parent, token_ids, block_size, lora_id, medium?, ...]``,
``["BlockRemoved", hashes, medium?]``, ``["AllBlocksCleared"]``. Digest hashes are folded to 64
bits with :func:`pdgate.common.block_hash.to_event_hash`, so decoded events always carry ints.

Transport (vLLM ``ZmqEventPublisher``):

* Frames ``[topic, seq (8-byte big-endian), payload]``; ``seq`` counts 0, 1, 2, ... per
  publisher process, so it restarts at 0 when the engine restarts.
* Replay: a DEALER sends ``[b"", start_seq]`` to the engine's ROUTER and receives
  ``[b"", seq, payload]`` for every buffered ``seq >= start``, then ``[b"", END_SEQ, b""]``.
* Bind or connect (:func:`engine_binds`): the engine *binds* its PUB when the endpoint contains
  ``*`` or ``::`` or is ``ipc://`` / ``inproc://``, otherwise it *connects* (and the subscriber
  binds). Only a bound PUB takes any number of subscribers (every gateway replica connects to
  ``tcp://<engine host>:PORT`` for ``tcp://*:PORT``, pdgate's default); a connecting one reaches
  the single subscriber bound at its address. The replay ROUTER is always bound by the engine.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

from pdgate.common.block_hash import to_event_hash

ExternalBlockHash: TypeAlias = int | bytes
"""Published block hash: uint64 by default, raw digest bytes if vLLM is configured so."""

MEDIUM_GPU = "GPU"
"""The ``medium`` of blocks in GPU memory (vLLM's ``MEDIUM_GPU``)."""

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""Sequence frame that ends a replay response (``b"\\xff" * 8``)."""

_U64_MASK = (1 << 64) - 1


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks newly cached (vLLM ``BlockStored``, same field order).

    Defaults are what the engine usually sends; on the wire ``token_ids``, ``block_size``,
    ``lora_id``, ``medium`` and ``lora_name`` are always present (nil allowed) and the remaining
    fields only when not ``None``. :func:`decode_batch` fills only what routing uses
    (``block_hashes`` as uint64, ``parent_block_hash``, ``medium``, ``lora_id``, ``lora_name``);
    the other fields keep their defaults.
    """

    block_hashes: Sequence[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None = None
    token_ids: Sequence[int] = ()
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None
    extra_keys: Sequence[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    skipped_parent_block_hash: ExternalBlockHash | None = None
    skipped_token_ids: Sequence[int] | None = None
    skipped_extra_keys: Sequence[tuple[Any, ...] | None] | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks evicted (vLLM ``BlockRemoved``); ``medium`` is always on the wire."""

    block_hashes: Sequence[ExternalBlockHash]
    medium: str | None = MEDIUM_GPU
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was reset (vLLM ``AllBlocksCleared``)."""


KvCacheEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared

# vLLM fields without a default (always encoded). All other fields default to None.
_REQUIRED: dict[type, tuple[str, ...]] = {
    BlockStored: (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ),
    BlockRemoved: ("block_hashes", "medium"),
    AllBlocksCleared: (),
}


# ----------------------------------------------------------------------------- addressing


def engine_binds(endpoint: str) -> bool:
    """vLLM's (and SGLang's) rule: the publisher binds wildcard / IPv6 / ipc / inproc endpoints, connects otherwise.

    ``tcp://*:5557`` binds; ``tcp://10.0.0.2:5557`` and ``tcp://0.0.0.0:5557`` connect (no ``*``).
    """
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class WireSchema:
    """Declared field order of vLLM's event structs in one vLLM tree.

    Only the declared *count* changes bytes (map header width); a field not in
    the schema cannot be sent and raises ``ValueError`` if set.
    """

    name: str
    block_stored: tuple[str, ...]
    block_removed: tuple[str, ...]

    def fields(self, cls: type) -> tuple[str, ...]:
        if cls is BlockStored:
            return self.block_stored
        if cls is BlockRemoved:
            return self.block_removed
        return ()


VLLM_UPSTREAM_SCHEMA = WireSchema(
    "vllm-project/vllm@0181ea3 (matches the vLLM 0.26 capture)",
    _REQUIRED[BlockStored] + ("extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window"),
    _REQUIRED[BlockRemoved] + ("group_idx",),
)
VLLM_EXTENDED_SCHEMA = WireSchema(
    "newer tree (local-inference-lab/vllm): + locality/ownership/session_id/skipped_*",
    VLLM_UPSTREAM_SCHEMA.block_stored
    + (
        "locality",
        "ownership",
        "session_id",
        "skipped_parent_block_hash",
        "skipped_token_ids",
        "skipped_extra_keys",
    ),
    VLLM_UPSTREAM_SCHEMA.block_removed + ("locality", "ownership"),
)
VLLM_032_SCHEMA = WireSchema(
    "vLLM 0.32: upstream + locality/ownership/session_id",
    VLLM_UPSTREAM_SCHEMA.block_stored + ("locality", "ownership", "session_id"),
    VLLM_UPSTREAM_SCHEMA.block_removed + ("locality", "ownership"),
)
DEFAULT_SCHEMA = VLLM_UPSTREAM_SCHEMA


def _msgspec_map_header(declared_fields: int, entries: int) -> bytes:
    """msgspec sizes a struct's map header by its declared field count (+1 for the tag)."""
    if declared_fields + 1 < 16:
        return bytes((0x80 | entries,))
    return b"\xde" + struct.pack(">H", entries)


def _encode_event(event: KvCacheEvent, schema: WireSchema, pack: msgpack.Packer) -> bytes:
    cls = type(event)
    if cls not in _REQUIRED:
        raise TypeError(f"not a KV event: {event!r}")
    declared = schema.fields(cls)
    required = _REQUIRED[cls]
    items: list[tuple[str, Any]] = [("type", cls.__name__)]
    items += [(name, getattr(event, name)) for name in required]
    items += [(name, value) for name in declared[len(required) :] if (value := getattr(event, name)) is not None]
    for name in getattr(event, "__dataclass_fields__", {}):
        if name not in declared and getattr(event, name) is not None:
            raise ValueError(f"{cls.__name__}.{name} is not part of schema {schema.name!r}")
    body = b"".join(pack.pack(key) + pack.pack(value) for key, value in items)
    return _msgspec_map_header(len(declared), len(items)) + body


def encode_batch(
    ts: float,
    events: Sequence[KvCacheEvent],
    dp_rank: int | None = 0,
    *,
    schema: WireSchema = DEFAULT_SCHEMA,
) -> bytes:
    """Encode one ``KVEventBatch`` byte-identically to vLLM's ``msgspec.msgpack.Encoder``.

    ``ts`` is encoded as float64 (vLLM passes ``time.time()``); lists/tuples
    become arrays, ``bytes`` become bin. ``schema`` selects the vLLM tree
    whose struct declarations are mirrored.
    """
    pack = msgpack.Packer(use_bin_type=True)
    return b"".join(
        (
            pack.pack_array_header(3),
            pack.pack(float(ts)),
            pack.pack_array_header(len(events)),
            *(_encode_event(e, schema, pack) for e in events),
            pack.pack(dp_rank),
        )
    )


# ----------------------------------------------------------------------------- decoding


class DecodeError(ValueError):
    """A payload that is not a valid KV event batch."""


def _hash(value: Any) -> int:
    if isinstance(value, bytes):
        return to_event_hash(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value & _U64_MASK
    raise DecodeError(f"bad block hash {value!r}")


def _hashes(values: Any) -> tuple[int, ...]:
    if not isinstance(values, list):
        raise DecodeError(f"bad block hash list {values!r}")
    return tuple(_hash(v) for v in values)


def _medium(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DecodeError(f"bad medium {value!r}")


def _lora_id(value: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise DecodeError(f"bad lora_id {value!r}")


def _lora_name(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DecodeError(f"bad lora_name {value!r}")


def _decode_event(raw: Any) -> KvCacheEvent | None:
    """One event (map or legacy array form); ``None`` for event types we do not use."""
    if isinstance(raw, dict):
        kind = raw.get("type")
        if kind == "BlockStored":
            parent = raw.get("parent_block_hash")
            return BlockStored(
                _hashes(raw.get("block_hashes")),
                None if parent is None else _hash(parent),
                lora_id=_lora_id(raw.get("lora_id")),
                medium=_medium(raw.get("medium")),
                lora_name=_lora_name(raw.get("lora_name")),
            )
        if kind == "BlockRemoved":
            return BlockRemoved(_hashes(raw.get("block_hashes")), _medium(raw.get("medium")))
    elif isinstance(raw, list) and raw:
        kind = raw[0]
        if kind == "BlockStored" and len(raw) >= 5:
            parent = raw[2]
            return BlockStored(
                _hashes(raw[1]),
                None if parent is None else _hash(parent),
                lora_id=_lora_id(raw[5]) if len(raw) > 5 else None,
                medium=_medium(raw[6]) if len(raw) > 6 else None,
                lora_name=_lora_name(raw[7]) if len(raw) > 7 else None,
            )
        if kind == "BlockRemoved" and len(raw) >= 2:
            return BlockRemoved(_hashes(raw[1]), _medium(raw[2]) if len(raw) > 2 else None)
        if kind in ("BlockStored", "BlockRemoved"):
            raise DecodeError(f"truncated {kind} event")
    else:
        raise DecodeError(f"bad event {raw!r}")
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    if not isinstance(kind, str):
        raise DecodeError(f"event without a type: {raw!r}")
    return None


def decode_batch(payload: bytes) -> tuple[list[KvCacheEvent], int]:
    """Decode ``[ts, [events], dp_rank]``; return the events we use and how many were skipped.

    Decoded events carry uint64 hashes (digests folded) and, for ``BlockStored``, only the fields
    routing uses (see :class:`BlockStored`). Raises :class:`DecodeError` on anything malformed
    (the whole batch is then unusable).
    """
    try:
        batch = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise DecodeError(f"not msgpack: {exc}") from exc
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise DecodeError(f"not an event batch: {batch!r:.200}")
    events: list[KvCacheEvent] = []
    skipped = 0
    for raw in batch[1]:
        event = _decode_event(raw)
        if event is None:
            skipped += 1
        else:
            events.append(event)
    return events, skipped
