"""The step-time model of the performance model (:mod:`pdgate.common.perf_model`).

:class:`EngineProfile` turns a :class:`StepBatch` into the seconds one forward step takes (the
formula is in :mod:`pdgate.common.perf_model`'s docstring) and sizes the KV cache; how its
tables are built (calibrated or roofline) is the business of the modules that build it.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from pdgate.common.perf_specs import GiB, GpuSpec, ModelSpec

__all__ = [
    "ACTIVATION_RESERVE_BYTES",
    "SEQ_OVERHEAD_S",
    "STEP_OVERHEAD_S",
    "AttentionCoeffs",
    "EngineProfile",
    "StepBatch",
    "interp",
    "profile_name",
]

# --- CPU-side constants (not in the measured data; see the docs) -------------
STEP_OVERHEAD_S = 1.0e-3
"""Fixed CPU cost per engine step (scheduling, input preparation, launches)."""
SEQ_OVERHEAD_S = 5.0e-6
"""Extra CPU cost per sequence that produces a token in the step (sampling, output processing)."""
ACTIVATION_RESERVE_BYTES = 2 * GiB
"""Per-GPU memory kept out of the KV cache: activations, CUDA graphs, allocator slack."""


@dataclass(frozen=True)
class StepBatch:
    """What one engine step computes."""

    prefill_tokens: int = 0  # new prompt tokens computed this step (all prefill chunks)
    prefill_attn_pairs: int = 0  # sum over chunks of chunk_len * (tokens before the chunk + chunk_len)
    decode_seqs: int = 0  # sequences generating one token this step
    decode_kv_tokens: int = 0  # sum of the context lengths of those sequences


@dataclass(frozen=True)
class AttentionCoeffs:
    """Whole-model attention time (seconds, all layers) as affine functions of the batch."""

    prefill_base: float
    prefill_per_pair: float
    prefill_per_token: float
    decode_base: float
    decode_per_kv_token: float
    decode_per_seq: float


@dataclass(frozen=True, eq=False)
class EngineProfile:
    """Execution-time model of one engine instance (a model on ``tp`` GPUs of one kind).

    Build instances with :func:`~pdgate.common.perf_model.load_profile`,
    :func:`~pdgate.common.perf_model.roofline_profile` or
    :func:`~pdgate.common.perf_model.resolve_profile`.  ``dense_tokens``/``dense_seconds`` is the
    piecewise-linear table of non-attention forward time over the step's token
    count (ascending breakpoints, first at 1 token); ``dense_tail_slope`` extends
    it linearly (seconds per token) past the last breakpoint.
    """

    name: str
    model: ModelSpec
    gpu: GpuSpec
    tp: int
    source: str  # "vidur:<files>" for calibrated profiles, "roofline" otherwise
    dense_tokens: tuple[float, ...]
    dense_seconds: tuple[float, ...]
    dense_tail_slope: float
    attention: AttentionCoeffs
    logits_seconds: float  # lm head weight read (any step that samples)
    logits_per_row_seconds: float  # lm head compute per sampled row
    overhead_seconds: float = STEP_OVERHEAD_S
    overhead_per_seq_seconds: float = SEQ_OVERHEAD_S

    def __post_init__(self) -> None:
        xs, ys = self.dense_tokens, self.dense_seconds
        if len(xs) < 2 or len(xs) != len(ys) or any(b <= a for a, b in itertools.pairwise(xs)):
            raise ValueError(f"profile {self.name!r}: dense table needs >= 2 strictly ascending breakpoints")
        if self.tp < 1:
            raise ValueError(f"profile {self.name!r}: tp must be >= 1, got {self.tp}")

    def step_time(self, batch: StepBatch) -> float:
        """Seconds one forward step of ``batch`` takes; 0.0 for a batch without tokens.

        Non-decreasing in every field of ``batch``.  Hot path: pure arithmetic
        plus one bisect over a few dozen breakpoints.
        """
        prefill = batch.prefill_tokens
        decode = batch.decode_seqs
        tokens = prefill + decode
        if tokens <= 0:
            return 0.0
        xs = self.dense_tokens
        ys = self.dense_seconds
        if tokens >= xs[-1]:
            t = ys[-1] + self.dense_tail_slope * (tokens - xs[-1])
        else:
            i = bisect.bisect_right(xs, tokens) or 1
            x0 = xs[i - 1]
            y0 = ys[i - 1]
            t = y0 + (ys[i] - y0) * (tokens - x0) / (xs[i] - x0)
        a = self.attention
        rows = decode
        if prefill > 0:
            t += a.prefill_base + a.prefill_per_pair * batch.prefill_attn_pairs + a.prefill_per_token * prefill
            rows += 1
        if decode > 0:
            t += a.decode_base + a.decode_per_kv_token * batch.decode_kv_tokens + a.decode_per_seq * decode
        return (
            t
            + max(self.logits_seconds, self.logits_per_row_seconds * rows)
            + self.overhead_seconds
            + self.overhead_per_seq_seconds * rows
        )

    def breakdown(self, batch: StepBatch) -> dict[str, float]:
        """Components of :meth:`step_time` in seconds (their sum equals it): for reports and debugging."""
        prefill, decode = batch.prefill_tokens, batch.decode_seqs
        tokens = prefill + decode
        parts = dict.fromkeys(("overhead", "dense", "prefill_attention", "decode_attention", "logits"), 0.0)
        if tokens <= 0:
            return parts
        a = self.attention
        rows = decode + (1 if prefill > 0 else 0)
        parts["overhead"] = self.overhead_seconds + self.overhead_per_seq_seconds * rows
        parts["dense"] = self.dense_time(tokens)
        if prefill > 0:
            parts["prefill_attention"] = (
                a.prefill_base + a.prefill_per_pair * batch.prefill_attn_pairs + a.prefill_per_token * prefill
            )
        if decode > 0:
            parts["decode_attention"] = (
                a.decode_base + a.decode_per_kv_token * batch.decode_kv_tokens + a.decode_per_seq * decode
            )
        parts["logits"] = max(self.logits_seconds, self.logits_per_row_seconds * rows)
        return parts

    def dense_time(self, tokens: float) -> float:
        """Non-attention forward time (seconds) for ``tokens`` tokens: the interpolated dense table."""
        return interp(self.dense_tokens, self.dense_seconds, tokens, self.dense_tail_slope)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes per token over all shards; KV heads are replicated when ``tp`` exceeds their number."""
        m = self.model
        return 2 * m.num_layers * max(m.num_kv_heads, self.tp) * m.head_dim * m.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        """Bytes of model weights over all shards."""
        return self.model.num_params * self.model.dtype_bytes

    def kv_cache_tokens(self, gpu_memory_utilization: float = 0.9) -> int:
        """KV-cache capacity in tokens: what is left of ``utilization * memory`` on all ``tp`` GPUs
        after the weights and a per-GPU activation reserve, divided by the KV bytes per token (>= 0)."""
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        free = (
            gpu_memory_utilization * self.gpu.mem_bytes * self.tp
            - self.weight_bytes
            - ACTIVATION_RESERVE_BYTES * self.tp
        )
        return max(0, int(free // self.kv_bytes_per_token))


def interp(xs: Sequence[float], ys: Sequence[float], x: float, tail_slope: float | None = None) -> float:
    """Piecewise-linear interpolation; linear extrapolation on both sides (``tail_slope`` on the right)."""
    if x >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if tail_slope is None else tail_slope
        return ys[-1] + slope * (x - xs[-1])
    i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def profile_name(gpu: str, model: str, tp: int = 1) -> str:
    """Canonical profile name, e.g. ``h100-llama-3-8b`` or ``a100-llama-3-70b-tp4``."""
    return f"{gpu}-{model}" + (f"-tp{tp}" if tp > 1 else "")
