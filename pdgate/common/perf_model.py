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

The model lives in four modules; this one loads the calibrated profiles, picks a profile
(:func:`resolve_profile`) and re-exports the others' public names:

* :mod:`pdgate.common.perf_specs`: :class:`ModelSpec`, :class:`GpuSpec` and the :data:`MODELS` /
  :data:`GPUS` tables;
* :mod:`pdgate.common.perf_step`: :class:`StepBatch` and :class:`EngineProfile` (the step time
  above, KV-cache sizing);
* :mod:`pdgate.common.perf_roofline`: :func:`roofline_profile` and its :data:`ROOFLINE` factors.

The runtime needs only the standard library.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pdgate.common.perf_roofline import ROOFLINE, RooflineFactors, logits_times, roofline_profile
from pdgate.common.perf_roofline import layer_elementwise_bytes as layer_elementwise_bytes
from pdgate.common.perf_roofline import layer_gemm_shapes as layer_gemm_shapes
from pdgate.common.perf_roofline import roofline_allreduce_time as roofline_allreduce_time
from pdgate.common.perf_roofline import roofline_attention as roofline_attention
from pdgate.common.perf_roofline import roofline_layer_times as roofline_layer_times
from pdgate.common.perf_specs import GPUS, MODELS, GpuSpec, ModelSpec, lookup_spec
from pdgate.common.perf_specs import GiB as GiB
from pdgate.common.perf_specs import MiB as MiB
from pdgate.common.perf_step import ACTIVATION_RESERVE_BYTES as ACTIVATION_RESERVE_BYTES
from pdgate.common.perf_step import SEQ_OVERHEAD_S as SEQ_OVERHEAD_S
from pdgate.common.perf_step import STEP_OVERHEAD_S as STEP_OVERHEAD_S
from pdgate.common.perf_step import AttentionCoeffs, EngineProfile, StepBatch, interp, profile_name

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
    ys = [interp(xs_a, ys_a, x, tail_a) + interp(xs_b, ys_b, x, tail_b) for x in xs]
    return tuple(xs), tuple(ys), tail_a + tail_b


def _from_json(data: Mapping[str, Any]) -> EngineProfile:
    model = lookup_spec(MODELS, data["model"], "model")
    gpu = lookup_spec(GPUS, data["gpu"], "GPU")
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
    logits, per_row = logits_times(model, gpu, tp)
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
