"""Roofline fallback of the performance model (:mod:`pdgate.common.perf_model`).

For a (model, GPU, TP) combination without a calibrated profile, :func:`roofline_profile`
builds an :class:`~pdgate.common.perf_step.EngineProfile` from the model's dimensions and the
GPU's FLOP/s and bandwidth, scaled by the efficiency factors in :data:`ROOFLINE`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from pdgate.common.perf_specs import GPUS, MODELS, GpuSpec, ModelSpec, lookup_spec
from pdgate.common.perf_step import AttentionCoeffs, EngineProfile, profile_name

__all__ = [
    "ROOFLINE",
    "RooflineFactors",
    "layer_elementwise_bytes",
    "layer_gemm_shapes",
    "logits_times",
    "roofline_allreduce_time",
    "roofline_attention",
    "roofline_layer_times",
    "roofline_profile",
]

_ROOFLINE_MAX_TOKENS = 65536


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


def logits_times(model: ModelSpec, gpu: GpuSpec, tp: int, f: RooflineFactors = ROOFLINE) -> tuple[float, float]:
    """Roofline lm head (vocab-parallel over ``tp``): (weight-read seconds, compute seconds per row).

    Calibrated profiles use it too: the profiling data has no lm head.
    """
    weights = model.vocab_size * model.hidden_size / tp
    read = weights * model.dtype_bytes / (f.gemm_memory_eff * gpu.mem_bandwidth) + f.gemm_launch_s
    return read, 2 * weights / (f.gemm_compute_eff * gpu.dense_flops)


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


@functools.lru_cache(maxsize=64)
def roofline_profile(model: ModelSpec | str, gpu: GpuSpec | str, tp: int = 1) -> EngineProfile:
    """Uncalibrated profile from model dimensions, GPU FLOP/s and bandwidth (factors: :data:`ROOFLINE`)."""
    m = lookup_spec(MODELS, model, "model") if isinstance(model, str) else model
    g = lookup_spec(GPUS, gpu, "GPU") if isinstance(gpu, str) else gpu
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
    logits, per_row = logits_times(m, g, tp)
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
