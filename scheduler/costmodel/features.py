"""Request features for the cost model: sizes, names and a stable hash of the prompt's words.

The prompt text itself is never kept: :func:`hash_text` turns it into a sparse vector of hashed
word unigrams and bigrams (``{index: weight}``), which is what the gateway logs and what the
output-length model reads. The hash is part of the on-disk contract (gateway logs and trained
models both hold indices), so it must never change silently:

* text: only the first and last :data:`EDGE_CHARS` characters of a long text are read
  (instructions sit at the ends), lower-cased, UTF-8 encoded;
* words: maximal runs of ASCII letters, digits and ``_`` and of non-ASCII bytes (every other
  ASCII byte separates words; close to regex ``\\w+`` without its per-word cost);
* unigram index: ``zlib.crc32(word) % n_features``;
* bigram index: a splitmix64-style mix of the two words' CRC32s in unsigned 64-bit arithmetic
  (:func:`_bigram_hashes`), ``% n_features``;
* weight: ``1 + ln(count)`` per index, then the vector is scaled to unit L2 norm.

CRC32 and wrap-around 64-bit integer arithmetic are the same on every platform, process and
Python version (unlike ``hash()``), so indices are stable.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard
from zlib import crc32

import numpy as np

from pdgate.common.tokenizer import message_text

N_FEATURES = 1 << 14
"""Default hash space size."""

EDGE_CHARS = 2000
"""A text longer than ``2 * EDGE_CHARS`` is hashed as its first and last ``EDGE_CHARS`` characters."""

ENDPOINTS: tuple[str, ...] = ("completion", "chat")

# Byte translation table: ASCII letters/digits/underscore and non-ASCII bytes are kept, every
# other byte becomes a space. bytes are immutable, so this is a constant.
_WORD_BYTES = bytes(c if (c >= 128 or chr(c).isalnum() or c == 0x5F) else 0x20 for c in range(256))
_MIX1 = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xBF58476D1CE4E5B9)
_MIX3 = np.uint64(0x94D049BB133111EB)
_SHIFT_A = np.uint64(30)
_SHIFT_B = np.uint64(27)
_SHIFT_C = np.uint64(31)


def _sublinear_table(size: int) -> np.ndarray:
    table = np.zeros(size)
    table[1:] = 1.0 + np.log(np.arange(1, size))
    table.flags.writeable = False
    return table


# 1 + ln(count) for every count a capped text can produce (fewer than 4 * 2 * EDGE_CHARS n-grams).
_SUBLINEAR = _sublinear_table(8 * EDGE_CHARS)


_MASK64 = (1 << 64) - 1
_MIX1_INT, _MIX2_INT, _MIX3_INT = int(_MIX1), int(_MIX2), int(_MIX3)
_NUMPY_FROM_WORDS = 24
"""From this many words on, :func:`hash_text` computes with numpy; below it (a short prompt),
numpy's per-call cost exceeds the work and plain integers are faster (same indices, same weights)."""


def _bigram_hashes(unigrams: np.ndarray) -> np.ndarray:
    """64-bit hashes of consecutive word pairs from the words' CRC32s (``uint64`` array)."""
    h = unigrams[:-1] * _MIX1 + unigrams[1:]
    h ^= h >> _SHIFT_A
    h *= _MIX2
    h ^= h >> _SHIFT_B
    h *= _MIX3
    h ^= h >> _SHIFT_C
    return np.asarray(h, dtype=np.uint64)


def _ngram_indices(words: list[bytes], n_features: int) -> list[int]:
    """The feature index of every unigram, then of every bigram, of a few ``words``: the scheme
    of :func:`_bigram_hashes` in Python integers, wrapped to 64 bits as numpy's ``uint64`` wraps."""
    crcs = list(map(crc32, words))
    indices = [c % n_features for c in crcs]
    previous = crcs[0]
    for current in crcs[1:]:
        h = (previous * _MIX1_INT + current) & _MASK64
        h ^= h >> 30
        h = (h * _MIX2_INT) & _MASK64
        h ^= h >> 27
        h = (h * _MIX3_INT) & _MASK64
        indices.append((h ^ (h >> 31)) % n_features)
        previous = current
    return indices


def text_words(text: str) -> list[bytes]:
    """The words :func:`hash_text` hashes (after the edge cap), as UTF-8 bytes."""
    if len(text) > 2 * EDGE_CHARS:
        text = text[:EDGE_CHARS] + " " + text[-EDGE_CHARS:]
    return text.lower().encode("utf-8", "surrogatepass").translate(_WORD_BYTES).split()


def prompt_digest(text: str) -> int:
    """A 64-bit digest of a prompt's text (BLAKE2b): the same prompt asked again has the same one,
    in every process. The output-length model remembers how long the answers to a prompt ran."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def hash_text(text: str, n_features: int = N_FEATURES) -> dict[int, float]:
    """Sparse unit-norm vector ``{index: weight}`` of the hashed word unigrams and bigrams of ``text``.

    Empty (``{}``) when the text has no words. Deterministic across processes, platforms and
    Python versions (see the module docstring for the exact scheme); the indices come in
    ascending order. Costs a few microseconds for a short prompt, tens for a few hundred words;
    texts longer than ``2 * EDGE_CHARS`` characters cost no more.
    """
    if n_features < 1:
        raise ValueError("n_features must be positive")
    words = text_words(text)
    if not words:
        return {}
    if len(words) < _NUMPY_FROM_WORDS:
        return _small_text_vector(_ngram_indices(words, n_features))
    unigrams = np.fromiter(map(crc32, words), np.uint64, len(words))
    index = np.concatenate((unigrams, _bigram_hashes(unigrams))) % np.uint64(n_features)
    keys, counts = np.unique(index, return_counts=True)
    if len(keys) == len(index):  # every n-gram once: all weights equal
        return dict.fromkeys(keys.tolist(), 1.0 / math.sqrt(len(keys)))
    return _unit_weights(keys.tolist(), _SUBLINEAR[counts])


def _small_text_vector(index: list[int]) -> dict[int, float]:
    """:func:`hash_text`'s vector from the n-gram indices of a short text (no numpy until an index repeats)."""
    keys = sorted(set(index))
    if len(keys) == len(index):  # every n-gram once: all weights equal
        return dict.fromkeys(keys, 1.0 / math.sqrt(len(keys)))
    counts = Counter(index)
    return _unit_weights(keys, _SUBLINEAR[[counts[k] for k in keys]])


def _unit_weights(keys: list[int], weights: np.ndarray) -> dict[int, float]:
    """``{key: weight}`` with the weights (``1 + ln(count)``, in ``keys``' order) scaled to unit L2 norm."""
    weights = weights * (1.0 / math.sqrt(float(weights @ weights)))
    return dict(zip(keys, weights.tolist()))


def chat_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text to hash for a chat request.

    The last user message comes first, then the system (and developer) messages in order; the
    other turns are left out (the length of the answer depends on what was asked last and on
    standing instructions, and :func:`hash_text` reads the ends of long texts). A conversation
    without a user message hashes every message's text in order. Content is a string or a list
    of parts, of which only the text parts are read.
    """
    texts: list[tuple[str, str]] = [(str(m.get("role", "")), _content_text(m.get("content"))) for m in messages]
    last_user = next((i for i in range(len(texts) - 1, -1, -1) if texts[i][0] == "user"), None)
    if last_user is None:
        return "\n".join(t for _, t in texts if t)
    parts = [texts[last_user][1]]
    parts += [t for role, t in texts if role in ("system", "developer") and t]
    return "\n".join(parts)


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # text parts only; images and audio carry no words
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return message_text(content)


@dataclass(frozen=True)
class RequestFeatures:
    """What the cost model knows about a request before it runs.

    ``text_hash`` is :func:`hash_text` of the prompt (:func:`chat_text` for chat requests); it is
    empty when there is no text (e.g. a prompt given as token ids).
    """

    prompt_tokens: int
    max_tokens: int | None
    endpoint: str
    model: str
    tag: str | None = None
    text_hash: Mapping[int, float] = field(default_factory=dict)
    length_fixed: bool = (
        False  # the client fixed the output length (``ignore_eos``): it says nothing of natural lengths
    )
    cues: tuple[float, ...] = ()
    """:func:`~scheduler.costmodel.cues.request_cues` of the prompt (what it asks for); empty when
    unknown (no text, or a record written before cues existed)."""
    prompt_digest: int | None = None
    """:func:`prompt_digest` of the text ``text_hash`` was made from; ``None`` when unknown."""

    def to_record(self) -> dict[str, Any]:
        """JSON-able dict (``text_hash`` as ``((index, weight), ...)``, which JSON writes as
        ``[[index, weight], ...]``); inverse of :meth:`from_record`.

        Tuples, not lists: a record is kept in memory for the refits, and a record holding only
        tuples, numbers, strings and dicts of them is one the garbage collector stops tracking."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "endpoint": self.endpoint,
            "model": self.model,
            "tag": self.tag,
            # hash_text and parse_text_hash give plain ints and floats already
            "text_hash": tuple(self.text_hash.items()),
            "length_fixed": self.length_fixed,
            "cues": self.cues,
            "prompt_digest": self.prompt_digest,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RequestFeatures:
        """Features from :meth:`to_record`'s dict (or a gateway log row); ``ValueError`` when malformed."""
        prompt_tokens = record.get("prompt_tokens")
        if not _is_int(prompt_tokens) or prompt_tokens < 0:
            raise ValueError("prompt_tokens must be a non-negative integer")
        max_tokens = record.get("max_tokens")
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            raise ValueError("max_tokens must be a positive integer or null")
        endpoint = record.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        model = record.get("model")
        if not isinstance(model, str):
            raise ValueError("model must be a string")
        tag = record.get("tag")
        if tag is not None and not isinstance(tag, str):
            raise ValueError("tag must be a string or null")
        fixed = record.get("length_fixed", False)
        if not isinstance(fixed, bool):
            raise ValueError("length_fixed must be a boolean")
        text_hash = parse_text_hash(record.get("text_hash") or [])
        cues = parse_cues(record.get("cues"))
        digest = parse_prompt_digest(record.get("prompt_digest"))
        return cls(prompt_tokens, max_tokens, endpoint, model, tag, text_hash, fixed, cues, digest)


def parse_text_hash(pairs: Any) -> dict[int, float]:
    """``{index: weight}`` from ``[[index, weight], ...]`` (lists or tuples); ``ValueError`` when malformed."""
    if not isinstance(pairs, list | tuple):
        raise ValueError("text_hash must be a list of [index, weight] pairs")
    out: dict[int, float] = {}
    for pair in pairs:
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not _is_int(pair[0])
            or pair[0] < 0
            or not isinstance(pair[1], int | float)
            or isinstance(pair[1], bool)
        ):
            raise ValueError("text_hash must be a list of [index, weight] pairs")
        out[pair[0]] = float(pair[1])
    return out


MAX_CUES = 64
"""Longest cue vector a record may carry (the current layout has fewer; later ones append)."""


def parse_cues(values: Any) -> tuple[float, ...]:
    """A record's cue vector (``None`` or missing: empty); ``ValueError`` unless a list of at most
    :data:`MAX_CUES` finite numbers."""
    if values is None:
        return ()
    if not isinstance(values, list | tuple) or len(values) > MAX_CUES:
        raise ValueError(f"cues must be a list of at most {MAX_CUES} numbers")
    out = []
    for value in values:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError("cues must be finite numbers")
        out.append(float(value))
    return tuple(out)


def parse_prompt_digest(value: Any) -> int | None:
    """A record's prompt digest (``None`` stays ``None``); ``ValueError`` unless an unsigned 64-bit integer."""
    if value is not None and (not _is_int(value) or not 0 <= value < 1 << 64):
        raise ValueError("prompt_digest must be an unsigned 64-bit integer or null")
    return value


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
