"""Per-step execution-time model of the simulated LLM engine.

The simulated engine runs a vLLM-like step loop; every step it asks an
:class:`EngineProfile` how long one forward pass over a :class:`StepBatch`
takes.  Calibrated profiles are small JSON tables compiled from operator times
measured on real GPUs (microsoft/vidur profiling data, MIT licence, see
``profiles/ATTRIBUTION.md``) by ``benchmarks/compile_sim_profiles.py``; for any
other (model, GPU, TP) combination :func:`roofline_profile` builds the same
structure from model dimensions and GPU FLOP/s and bandwidth.

Step time (seconds)::

    step = overhead + overhead_per_seq * rows              (CPU: scheduling, launch, sampling)
         + dense(T)                                        (all layers' GEMMs, norms, activations,
                                                            embedding, TP all-reduces), T = prefill_tokens + decode_seqs
         + [P > 0] (pa + pb * prefill_attn_pairs + pc * P) (prefill attention, compute bound)
         + [D > 0] (da + db * decode_kv_tokens + dc * D)   (decode attention, memory bound)
         + max(lm_w, lm_r * rows)                          (lm head: weight read vs compute)

with ``rows = decode_seqs + (1 if prefill_tokens else 0)``.  ``dense`` is a
piecewise-linear table over T with linear extrapolation past its last point.
See ``docs/sim-performance-model.md`` for the derivation and the error table.

The runtime needs only the standard library.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

__all__ = [
    "GPUS",
    "MODELS",
    "ROOFLINE",
    "AttentionCoeffs",
    "EngineProfile",
    "GpuSpec",
    "ModelSpec",
    "RooflineFactors",
    "StepBatch",
    "available_profiles",
    "load_profile",
    "profile_name",
    "resolve_profile",
    "roofline_profile",
]

PROFILE_DIR = Path(__file__).with_name("profiles")

GiB = 1 << 30
MiB = 1 << 20

# --- CPU-side constants (not in the measured data; see the docs) -------------
STEP_OVERHEAD_S = 1.0e-3
"""Fixed CPU cost per engine step (scheduling, input preparation, launches)."""
SEQ_OVERHEAD_S = 5.0e-6
"""Extra CPU cost per sequence that produces a token in the step (sampling, output processing)."""
ACTIVATION_RESERVE_BYTES = 2 * GiB
"""Per-GPU memory kept out of the KV cache: activations, CUDA graphs, allocator slack."""

_ROOFLINE_MAX_TOKENS = 65536


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer (whole model, before tensor parallelism)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_model_len: int
    dtype_bytes: int = 2
    gated_mlp: bool = True  # SwiGLU (gate + up projections); False for a plain 2-matrix MLP

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token occupies, summed over all layers and TP shards."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def num_params(self) -> int:
        """Approximate parameter count: embeddings, untied lm head, attention, MLP and norms."""
        h = self.hidden_size
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + self.num_heads * self.head_dim * h
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return 2 * self.vocab_size * h + self.num_layers * (attn + mlp + 2 * h) + h


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures of one GPU."""

    name: str
    dense_flops: float  # bf16 dense FLOP/s
    mem_bandwidth: float  # HBM bytes/s
    mem_bytes: int
    interconnect_bandwidth: float = 0.0  # per-direction GPU-to-GPU bytes/s (roofline all-reduce)


@dataclass(frozen=True)
class StepBatch:
    """What one engine step computes."""

    prefill_tokens: int = 0  # new prompt tokens computed this step (all prefill chunks)
    prefill_attn_pairs: int = 0  # sum over chunks of chunk_len * (tokens before the chunk + chunk_len)
    decode_seqs: int = 0  # sequences generating one token this step
    decode_kv_tokens: int = 0  # sum of the context lengths of those sequences


@dataclass(frozen=True)
class RooflineFactors:
    """Efficiency factors of the roofline fallback.

    The GEMM and element-wise values are a grid-search fit to every per-layer
    table in the vidur data (``benchmarks/sim_fidelity.py --fit-roofline``); the
    attention values are implied by the attention.csv fit; the all-reduce values
    fit the a100/h100 DGX all_reduce.csv tables.
    """

    gemm_compute_eff: float = 0.70  # fraction of dense bf16 FLOP/s reached by large GEMMs
    gemm_memory_eff: float = 0.80  # fraction of HBM bandwidth reached by weight-streaming GEMMs
    gemm_launch_s: float = 10e-6  # fixed time per GEMM
    elementwise_eff: float = 0.60  # HBM fraction of norms, activation, rotary embedding, adds
    elementwise_launch_s: float = 2e-6  # fixed time per element-wise kernel
    attn_prefill_eff: float = 0.45  # FLOP/s fraction, counting 4 * head_dim FLOPs per StepBatch query-key pair
    attn_decode_eff: float = 0.77  # HBM fraction while streaming the KV cache
    attn_launch_s: float = 15.5e-6  # fixed time per attention call (per layer)
    allreduce_latency_s: float = 27.5e-6  # fixed time of one all-reduce
    allreduce_eff: float = 0.675  # fraction of per-direction interconnect bandwidth reached by a ring all-reduce


ROOFLINE = RooflineFactors()


_Spec = TypeVar("_Spec", ModelSpec, GpuSpec)


def _spec_table(*specs: _Spec) -> Mapping[str, _Spec]:
    return MappingProxyType({s.name: s for s in specs})


MODELS: Mapping[str, ModelSpec] = _spec_table(
    ModelSpec("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, 4096),
    ModelSpec("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256, 8192),
    ModelSpec("llama-2-70b", 80, 8192, 64, 8, 128, 28672, 32000, 4096),
    ModelSpec("llama-3-70b", 80, 8192, 64, 8, 128, 28672, 128256, 8192),
    ModelSpec("codellama-34b", 48, 8192, 64, 8, 128, 22016, 32000, 16384),
    ModelSpec("qwen-72b", 80, 8192, 64, 64, 128, 24576, 152064, 32768),
    ModelSpec("internlm-20b", 60, 5120, 40, 40, 128, 13824, 103168, 16384),
    ModelSpec("phi-2", 32, 2560, 32, 32, 80, 10240, 51200, 2048, gated_mlp=False),
)
"""Published shapes (Hugging Face configs) of the models in the profiling data."""

GPUS: Mapping[str, GpuSpec] = _spec_table(
    GpuSpec("h100", 989.4e12, 3.35e12, 81559 * MiB, 450e9),  # H100 SXM5 80GB, NVLink 4
    GpuSpec("a100", 312e12, 2.039e12, 81920 * MiB, 300e9),  # A100 SXM4 80GB, NVLink 3
    GpuSpec("a40", 149.7e12, 696e9, 46068 * MiB, 32e9),  # A40 48GB, PCIe 4.0 x16
)
"""Datasheet figures; memory sizes are the totals nvidia-smi reports."""


# --------------------------------------------------------------------------- profile


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

    Build instances with :func:`load_profile`, :func:`roofline_profile` or
    :func:`resolve_profile`.  ``dense_tokens``/``dense_seconds`` is the
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
        return _interp(self.dense_tokens, self.dense_seconds, tokens, self.dense_tail_slope)

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


def _interp(xs: Sequence[float], ys: Sequence[float], x: float, tail_slope: float | None = None) -> float:
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


def _logits_times(model: ModelSpec, gpu: GpuSpec, tp: int, f: RooflineFactors = ROOFLINE) -> tuple[float, float]:
    """Roofline lm head (vocab-parallel over ``tp``): (weight-read seconds, compute seconds per row)."""
    weights = model.vocab_size * model.hidden_size / tp
    read = weights * model.dtype_bytes / (f.gemm_memory_eff * gpu.mem_bandwidth) + f.gemm_launch_s
    return read, 2 * weights / (f.gemm_compute_eff * gpu.dense_flops)


# --------------------------------------------------------------------------- roofline


def _shard(model: ModelSpec, tp: int) -> tuple[float, float, float]:
    """Per-GPU (query heads, KV heads, intermediate size) under tensor parallelism ``tp``."""
    return model.num_heads / tp, max(1.0, model.num_kv_heads / tp), model.intermediate_size / tp


def layer_gemm_shapes(model: ModelSpec, tp: int) -> tuple[tuple[float, float], ...]:
    """(K, N) of the four per-GPU GEMMs of one layer: QKV, attention output, gate/up, down."""
    h, hd = model.hidden_size, model.head_dim
    heads, kv_heads, inter = _shard(model, tp)
    return (
        (h, (heads + 2 * kv_heads) * hd),
        (heads * hd, h),
        (h, (2 if model.gated_mlp else 1) * inter),
        (inter, h),
    )


def layer_elementwise_bytes(model: ModelSpec, tp: int, tokens: float) -> float:
    """HBM bytes moved by one layer's two norms, activation, rotary embedding and residual add."""
    h = model.hidden_size
    heads, kv_heads, inter = _shard(model, tp)
    per_token = 4 * h + inter * (3 if model.gated_mlp else 2) + 2 * (heads + kv_heads) * model.head_dim + 3 * h
    return model.dtype_bytes * tokens * per_token


def roofline_layer_times(
    model: ModelSpec, gpu: GpuSpec, tp: int, tokens: float, f: RooflineFactors = ROOFLINE
) -> tuple[float, float]:
    """Roofline (linear, element-wise) seconds of one transformer layer on one GPU for ``tokens`` tokens.

    A GEMM (T x K) @ (K x N) takes ``max(2TKN / (compute_eff * FLOP/s),
    bytes(KN + TK + TN) / (memory_eff * bandwidth)) + launch``; element-wise
    kernels stream their bytes at ``elementwise_eff`` of the bandwidth.
    """
    flops_rate = f.gemm_compute_eff * gpu.dense_flops
    bytes_rate = f.gemm_memory_eff * gpu.mem_bandwidth
    d = model.dtype_bytes
    linear = 0.0
    for k, n in layer_gemm_shapes(model, tp):
        linear += max(2 * tokens * k * n / flops_rate, d * (k * n + tokens * (k + n)) / bytes_rate) + f.gemm_launch_s
    elementwise = (
        layer_elementwise_bytes(model, tp, tokens) / (f.elementwise_eff * gpu.mem_bandwidth)
        + 5 * f.elementwise_launch_s
    )
    return linear, elementwise


def roofline_allreduce_time(gpu: GpuSpec, tp: int, nbytes: float, f: RooflineFactors = ROOFLINE) -> float:
    """Roofline ring all-reduce of ``nbytes`` over ``tp`` GPUs (0 when tp == 1)."""
    if tp <= 1:
        return 0.0
    if gpu.interconnect_bandwidth <= 0:
        raise ValueError(f"GPU {gpu.name!r} has no interconnect_bandwidth; cannot model tp={tp}")
    return f.allreduce_latency_s + 2 * (tp - 1) / tp * nbytes / (f.allreduce_eff * gpu.interconnect_bandwidth)


def roofline_attention(model: ModelSpec, gpu: GpuSpec, tp: int, f: RooflineFactors = ROOFLINE) -> AttentionCoeffs:
    """Roofline attention coefficients (whole model, seconds)."""
    layers, hd, d = model.num_layers, model.head_dim, model.dtype_bytes
    heads, kv_heads, _ = _shard(model, tp)
    per_token_io = d * hd * 2 * (heads + kv_heads) / (f.elementwise_eff * gpu.mem_bandwidth)  # q, out, k/v writes
    return AttentionCoeffs(
        prefill_base=layers * f.attn_launch_s,
        prefill_per_pair=layers * 4 * heads * hd / (f.attn_prefill_eff * gpu.dense_flops),
        prefill_per_token=layers * per_token_io,
        decode_base=layers * f.attn_launch_s,
        decode_per_kv_token=layers * 2 * kv_heads * hd * d / (f.attn_decode_eff * gpu.mem_bandwidth),
        decode_per_seq=layers * per_token_io,
    )


def _lookup(table: Mapping[str, _Spec], key: str, kind: str) -> _Spec:
    try:
        return table[key.lower()]
    except KeyError:
        raise ValueError(f"unknown {kind} {key!r}; known: {', '.join(sorted(table))}") from None


@functools.lru_cache(maxsize=64)
def roofline_profile(model: ModelSpec | str, gpu: GpuSpec | str, tp: int = 1) -> EngineProfile:
    """Uncalibrated profile from model dimensions, GPU FLOP/s and bandwidth (factors: :data:`ROOFLINE`)."""
    m = _lookup(MODELS, model, "model") if isinstance(model, str) else model
    g = _lookup(GPUS, gpu, "GPU") if isinstance(gpu, str) else gpu
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    tokens = [float(2 ** (k / 2)) for k in range(2 * int(math.log2(_ROOFLINE_MAX_TOKENS)) + 1)]
    act_bytes = m.hidden_size * m.dtype_bytes
    seconds = []
    for t in tokens:
        linear, elementwise = roofline_layer_times(m, g, tp, t)
        embedding = 2 * t * act_bytes / (ROOFLINE.elementwise_eff * g.mem_bandwidth) + ROOFLINE.elementwise_launch_s
        allreduce = 2 * m.num_layers * roofline_allreduce_time(g, tp, t * act_bytes)
        seconds.append(m.num_layers * (linear + elementwise) + embedding + allreduce)
    logits, per_row = _logits_times(m, g, tp)
    return EngineProfile(
        name=profile_name(g.name, m.name, tp) + "-roofline",
        model=m,
        gpu=g,
        tp=tp,
        source="roofline",
        dense_tokens=tuple(tokens),
        dense_seconds=tuple(seconds),
        dense_tail_slope=(seconds[-1] - seconds[-2]) / (tokens[-1] - tokens[-2]),
        attention=roofline_attention(m, g, tp),
        logits_seconds=logits,
        logits_per_row_seconds=per_row,
    )


# --------------------------------------------------------------------------- calibrated


@functools.lru_cache(maxsize=1)
def _profile_files() -> Mapping[str, Path]:
    return MappingProxyType({p.stem: p for p in sorted(PROFILE_DIR.glob("*.json"))})


def available_profiles() -> list[str]:
    """Names of the shipped calibrated profiles, e.g. ``h100-llama-3-8b``, ``a100-llama-3-70b-tp4``."""
    return list(_profile_files())


def _union_table(
    xs_a: Sequence[float],
    ys_a: Sequence[float],
    tail_a: float,
    xs_b: Sequence[float],
    ys_b: Sequence[float],
    tail_b: float,
) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """Sum of two piecewise-linear functions, exact on the union of their breakpoints (from x = 1)."""
    xs = sorted({x for x in (*xs_a, *xs_b) if x >= 1.0} | {1.0})
    ys = [_interp(xs_a, ys_a, x, tail_a) + _interp(xs_b, ys_b, x, tail_b) for x in xs]
    return tuple(xs), tuple(ys), tail_a + tail_b


def _from_json(data: Mapping[str, Any]) -> EngineProfile:
    model = _lookup(MODELS, data["model"], "model")
    gpu = _lookup(GPUS, data["gpu"], "GPU")
    tp = int(data["tp"])
    layers = model.num_layers
    ms = 1e-3
    dense = data["dense"]
    tokens = [float(t) for t in dense["num_tokens"]]
    per_layer = [a + b for a, b in zip(dense["linear_ms"], dense["elementwise_ms"])]
    seconds = [ms * (layers * p + e) for p, e in zip(per_layer, dense["embedding_ms"])]
    tail = ms * (
        layers * (dense["tail_ms_per_token"]["linear"] + dense["tail_ms_per_token"]["elementwise"])
        + dense["tail_ms_per_token"]["embedding"]
    )
    xs, ys = tuple(tokens), tuple(seconds)
    if tp > 1:
        # two all-reduces per layer of the activations, T * hidden * dtype bytes
        allreduce = data["allreduce"]
        token_bytes = model.hidden_size * model.dtype_bytes
        ar_x = [b / token_bytes for b in allreduce["bytes"]]
        ar_y = [2 * layers * ms * v for v in allreduce["ms"]]
        ar_tail = 2 * layers * ms * allreduce["tail_ms_per_byte"] * token_bytes
        xs, ys, tail = _union_table(xs, ys, tail, ar_x, ar_y, ar_tail)
    att = data["attention_per_layer_ms"]
    scale = layers * ms
    attention = AttentionCoeffs(
        prefill_base=scale * att["prefill_base"],
        prefill_per_pair=scale * att["prefill_per_pair"],
        prefill_per_token=scale * att["prefill_per_token"],
        decode_base=scale * att["decode_base"],
        decode_per_kv_token=scale * att["decode_per_kv_token"],
        decode_per_seq=scale * att["decode_per_seq"],
    )
    logits, per_row = _logits_times(model, gpu, tp)
    return EngineProfile(
        name=data["name"],
        model=model,
        gpu=gpu,
        tp=tp,
        source=data["source"],
        dense_tokens=xs,
        dense_seconds=ys,
        dense_tail_slope=tail,
        attention=attention,
        logits_seconds=logits,
        logits_per_row_seconds=per_row,
    )


@functools.cache
def load_profile(name: str) -> EngineProfile:
    """Shipped calibrated profile ``name``; ValueError naming the available ones if there is none."""
    path = _profile_files().get(name.lower()) if isinstance(name, str) else None
    if path is None:
        raise ValueError(f"unknown engine profile {name!r}; available: {', '.join(available_profiles())}")
    with path.open(encoding="utf-8") as f:
        return _from_json(json.load(f))


def resolve_profile(
    name: str | None = None, *, model: str | None = None, gpu: str | None = None, tp: int = 1
) -> EngineProfile:
    """Profile ``name`` if given (must be shipped); else the shipped one for (gpu, model, tp); else roofline."""
    if name is not None:
        return load_profile(name)
    if model is None or gpu is None:
        raise ValueError("resolve_profile needs a profile name, or both model and gpu")
    shipped = profile_name(gpu.lower(), model.lower(), tp)
    if shipped in _profile_files():
        return load_profile(shipped)
    return roofline_profile(model, gpu, tp)
