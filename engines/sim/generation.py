"""Deterministic "model outputs" for the simulated engine.

Contract: every generated token, and the decision to stop with EOS, is a pure function of the
full token context (prompt + tokens generated so far) and, when sampling, the request's seed.
Continuing a request from ``prompt + first k generated tokens`` therefore yields exactly the
tokens the uninterrupted request would have produced: the property migration and failover
tests rely on.

The context is summarised by a polynomial rolling hash modulo 2**64 (O(prompt) once, O(1) per
generated token) followed by a splitmix64 finaliser.

Natural output length: at every step, EOS is emitted with probability ``1 / mean_length``, where
``mean_length`` is drawn once per conversation from a log-normal distribution seeded by the
first :data:`LENGTH_KEY_TOKENS` tokens of the context. A per-step (memoryless) hazard is what
keeps the stop decision a function of the context alone; the log-normal mixture of geometric
lengths gives the heavy right tail seen in real chat traces.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1
_MULT = 0x100000001B3  # FNV-64 prime: odd, so the polynomial hash is a bijection per step
LENGTH_KEY_TOKENS = 16
_SALT_TOKEN = 0x9E3779B97F4A7C15
_SALT_EOS = 0xC2B2AE3D27D4EB4F
_SALT_LENGTH = 0x165667B19E3779F9


def splitmix64(x: int) -> int:
    """A strong 64-bit integer mixer (finaliser of splitmix64)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text``, the same in every process (``hash()`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _unit(x: int) -> float:
    """Map a 64-bit integer to [0, 1)."""
    return (x >> 11) * (1.0 / (1 << 53))


class ContextHash:
    """Rolling hash of a token sequence: ``h = sum((t_i + 1) * M**(n-1-i)) mod 2**64``."""

    __slots__ = ("length", "value")

    def __init__(self, value: int = 0, length: int = 0) -> None:
        self.value = value
        self.length = length

    @classmethod
    def of(cls, tokens: Sequence[int]) -> ContextHash:
        n = len(tokens)
        if n == 0:
            return cls()
        arr = np.asarray(tokens, dtype=np.uint64) + np.uint64(1)
        powers = np.empty(n, dtype=np.uint64)
        powers[0] = 1
        if n > 1:
            powers[1:] = np.uint64(_MULT)
            with np.errstate(over="ignore"):
                powers = np.cumprod(powers, dtype=np.uint64)
        with np.errstate(over="ignore"):
            value = int(np.sum(arr * powers[::-1], dtype=np.uint64))
        return cls(value, n)

    def append(self, token: int) -> None:
        self.value = (self.value * _MULT + token + 1) & MASK64
        self.length += 1

    def copy(self) -> ContextHash:
        return ContextHash(self.value, self.length)


@dataclass(frozen=True)
class LengthModel:
    """Log-normal distribution of per-conversation mean output lengths (tokens)."""

    median: float = 180.0
    sigma: float = 0.9
    min_mean: float = 2.0

    def mean_length(self, key: int) -> float:
        u1 = max(_unit(splitmix64(key ^ _SALT_LENGTH)), 1e-12)
        u2 = _unit(splitmix64(key ^ _SALT_LENGTH ^ 0xFF))
        normal = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)  # Box-Muller
        return max(self.min_mean, self.median * math.exp(self.sigma * normal))


class TokenGenerator:
    """Chooses the next token for a context: the simulated model's "forward + sample"."""

    def __init__(self, generatable_ids: Sequence[int], eos_token_id: int, length_model: LengthModel) -> None:
        if not generatable_ids:
            raise ValueError("the tokenizer exposes no generatable tokens")
        self._ids = list(generatable_ids)
        self._n = len(self._ids)
        self.eos_token_id = eos_token_id
        self.length_model = length_model

    def length_key(self, context: Sequence[int]) -> int:
        """Hash of the context's first tokens: fixes the conversation's mean output length."""
        return ContextHash.of(context[:LENGTH_KEY_TOKENS]).value

    def next_token(self, context: ContextHash, length_key: int, *, seed: int | None, allow_eos: bool) -> int:
        """The token that follows ``context``. ``seed`` is None for greedy decoding."""
        state = context.value if seed is None else splitmix64(context.value ^ (seed & MASK64))
        if allow_eos:
            mean = self.length_model.mean_length(length_key)
            if _unit(splitmix64(state ^ _SALT_EOS)) < 1.0 / mean:
                return self.eos_token_id
        return self._ids[splitmix64(state ^ _SALT_TOKEN) % self._n]
