"""Model and GPU specifications of the performance model (:mod:`pdgate.common.perf_model`).

:class:`ModelSpec` is the shape of a decoder-only transformer, :class:`GpuSpec` the datasheet
figures of one GPU; :data:`MODELS` and :data:`GPUS` are the read-only tables of the ones in the
profiling data, looked up case-insensitively by :func:`lookup_spec`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

__all__ = ["GPUS", "MODELS", "GiB", "GpuSpec", "MiB", "ModelSpec", "lookup_spec"]

GiB = 1 << 30
MiB = 1 << 20


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


def lookup_spec(table: Mapping[str, _Spec], key: str, kind: str) -> _Spec:
    """``table[key.lower()]``; ValueError naming the known keys (``kind``: "model", "GPU") if absent."""
    try:
        return table[key.lower()]
    except KeyError:
        raise ValueError(f"unknown {kind} {key!r}; known: {', '.join(sorted(table))}") from None
