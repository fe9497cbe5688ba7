#!/usr/bin/env python3
"""Compile the simulated engine's calibrated profiles from the microsoft/vidur profiling data.

    python benchmarks/compile_sim_profiles.py [--vidur DIR] [--out DIR]

Reads ``DIR/data/profiling/{compute,a100,network}`` (default ``../shared/data/vidur``
next to the repository) and writes one small JSON per profile into
``pdgate/common/profiles`` (deterministic: same data in, same bytes out).  The
format and the model are described in ``docs/sim-performance-model.md``; the
helpers here are also used by ``benchmarks/sim_fidelity.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pdgate.common import perf_model as pm

DEFAULT_VIDUR = REPO_ROOT.parent / "shared" / "data" / "vidur"
DEFAULT_OUT = REPO_ROOT / "pdgate" / "common" / "profiles"

MODEL_DIRS = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "codellama-34b": "codellama/CodeLlama-34b-Instruct-hf",
    "qwen-72b": "Qwen/Qwen-72B",
    "internlm-20b": "internlm/internlm-20b",
    "phi-2": "microsoft/phi-2",
}
GPU_NAMES = ("a100", "h100", "a40")
TP_DEGREES = (1, 2, 4, 8)
GROUP_OPS = {
    "linear": ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj"),
    "elementwise": ("input_layernorm", "post_attention_layernorm", "attn_rope", "mlp_act", "add"),
    "embedding": ("emb",),
}
GROUPS = tuple(GROUP_OPS)
NETWORK_DIRS = {"a100": "a100_dgx", "h100": "h100_dgx"}  # NVSwitch nodes; no all-reduce data for a40
REFERENCE_GPU = "a100"  # GPU of attention.csv
# Profiles not measured in the data: (gpu, model) -> reference model measured on both REFERENCE_GPU and gpu.
DERIVED = {("h100", "llama-3-8b"): "llama-2-7b", ("h100", "llama-3-70b"): "llama-2-70b"}
# Per-GPU attention shape of attention.csv: n_embd 8192, 64 query / 8 KV heads, TP2.
ATTN_HEADS, ATTN_KV_HEADS, ATTN_HEAD_DIM, ATTN_DTYPE = 32, 4, 128, 2
GRID_STEP = 2 ** (1 / 3)  # spacing of the num_tokens breakpoints kept in a profile
HOLDOUT_EVERY, HOLDOUT_PHASE = 5, 2  # attention rows i % 5 == 2 are held out of the fit
MIN_KV_FRACTION = 1.0  # ship a profile only if its KV cache holds >= this many max_model_len sequences


def compute_csv(gpu: str, model: str) -> str:
    return f"data/profiling/compute/{gpu}/{MODEL_DIRS[model]}/mlp.csv"


ATTENTION_CSV = "data/profiling/a100/attention.csv"


def allreduce_csv(gpu: str) -> str:
    return f"data/profiling/network/{NETWORK_DIRS[gpu]}/all_reduce.csv"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _num(row: dict[str, str], key: str) -> float:
    value = row.get(key)
    return float(value) if value not in (None, "") else 0.0


# --------------------------------------------------------------------------- per-operator tables


@dataclass(frozen=True)
class OpTable:
    """Median per-operator times (ms, one GPU, one layer; ``emb`` once per step) by num_tokens."""

    tokens: np.ndarray
    ops: dict[str, np.ndarray]
    shape: dict[str, str]

    def group(self, name: str) -> np.ndarray:
        return sum((self.ops[o] for o in GROUP_OPS[name]), np.zeros(len(self.tokens)))

    def layer(self) -> np.ndarray:
        return self.group("linear") + self.group("elementwise")


def load_op_tables(vidur: Path) -> dict[tuple[str, str, int], OpTable]:
    """All (gpu, model, tp) operator tables; duplicate num_tokens rows are averaged, absent ops are 0."""
    tables = {}
    for gpu in GPU_NAMES:
        for model in MODEL_DIRS:
            path = vidur / compute_csv(gpu, model)
            if not path.exists():
                continue
            by_tp: dict[int, dict[int, list[dict[str, str]]]] = {}
            for row in read_csv(path):
                tp = int(row["num_tensor_parallel_workers"])
                by_tp.setdefault(tp, {}).setdefault(int(row["num_tokens"]), []).append(row)
            for tp, by_tokens in by_tp.items():
                tokens = np.array(sorted(by_tokens), dtype=float)
                ops = {
                    op: np.array(
                        [np.mean([_num(r, f"time_stats.{op}.median") for r in by_tokens[int(t)]]) for t in tokens]
                    )
                    for names in GROUP_OPS.values()
                    for op in names
                }
                first = by_tokens[int(tokens[0])][0]
                shape = {
                    k: first[k]
                    for k in ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp")
                }
                tables[(gpu, model, tp)] = OpTable(tokens, ops, shape)
    return tables


def isotonic(y: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit (pool adjacent violators)."""
    sums: list[float] = []
    counts: list[int] = []
    for v in y:
        sums.append(float(v))
        counts.append(1)
        while len(sums) > 1 and sums[-2] / counts[-2] > sums[-1] / counts[-1]:
            s, c = sums.pop(), counts.pop()
            sums[-1] += s
            counts[-1] += c
    return np.concatenate([np.full(c, s / c) for s, c in zip(sums, counts)])


def grid_indices(tokens: np.ndarray) -> list[int]:
    """Indices of the measured num_tokens nearest (in log space) to 1, GRID_STEP, GRID_STEP**2, ... and the last."""
    logs = np.log(tokens)
    n = math.floor(math.log(tokens[-1]) / math.log(GRID_STEP) + 1e-9)
    picks = {int(np.argmin(np.abs(logs - k * math.log(GRID_STEP)))) for k in range(n + 1)}
    return sorted(picks | {0, len(tokens) - 1})


def tail_slope(tokens: np.ndarray, values: np.ndarray) -> float:
    """Slope over the last doubling of num_tokens (ms per token), used to extrapolate."""
    j = int(np.argmin(np.abs(tokens - tokens[-1] / 2)))
    return float((values[-1] - values[j]) / (tokens[-1] - tokens[j]))


def dense_section(tokens: np.ndarray, smoothed: dict[str, np.ndarray]) -> dict:
    """The ``dense`` JSON section: smoothed group times at the grid breakpoints plus tail slopes."""
    idx = grid_indices(tokens)
    section = {"num_tokens": [int(tokens[i]) for i in idx]}
    for g in GROUPS:
        section[f"{g}_ms"] = [float(smoothed[g][i]) for i in idx]
    section["tail_ms_per_token"] = {g: tail_slope(tokens, smoothed[g]) for g in GROUPS}
    return section


def measured_series(table: OpTable) -> dict[str, np.ndarray]:
    return {g: isotonic(table.group(g)) for g in GROUPS}


def derived_series(source: OpTable, ref_source: OpTable, ref_target: OpTable) -> dict[str, np.ndarray]:
    """``source`` times scaled per group by the target/source ratio measured on a reference model at
    equal num_tokens; past the reference's last num_tokens the ratio is held at its last value."""
    out = {}
    for g in GROUPS:
        t = np.minimum(source.tokens, ref_source.tokens[-1])
        ratio = np.interp(t, ref_target.tokens, isotonic(ref_target.group(g))) / np.interp(
            t, ref_source.tokens, isotonic(ref_source.group(g))
        )
        out[g] = isotonic(isotonic(source.group(g)) * ratio)
    return out


# --------------------------------------------------------------------------- network


def load_allreduce(vidur: Path) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(gpu, workers) -> (message bytes, median ms) for all-reduces within one node."""
    out = {}
    for gpu in NETWORK_DIRS:
        by_key: dict[int, dict[int, list[float]]] = {}
        for row in read_csv(vidur / allreduce_csv(gpu)):
            n = int(row["num_workers"])
            if n != int(row["devices_per_node"]):
                continue
            by_key.setdefault(n, {}).setdefault(int(row["size"]), []).append(_num(row, "time_stats.all_reduce.median"))
        for n, by_size in by_key.items():
            sizes = np.array(sorted(by_size), dtype=float)
            out[(gpu, n)] = sizes, np.array([np.mean(by_size[int(s)]) for s in sizes])
    return out


def allreduce_section(sizes: np.ndarray, times: np.ndarray, source: str) -> dict:
    smooth = isotonic(times)
    logs = np.log2(sizes)
    picks = sorted(
        {int(np.argmin(np.abs(logs - k))) for k in range(int(logs[0]), int(logs[-1]) + 1)} | {0, len(sizes) - 1}
    )
    j = int(np.argmin(np.abs(sizes - sizes[-1] / 2)))
    return {
        "bytes": [int(sizes[i]) for i in picks],
        "ms": [float(smooth[i]) for i in picks],
        "tail_ms_per_byte": float((smooth[-1] - smooth[j]) / (sizes[-1] - sizes[j])),
        "source": source,
    }


# --------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class AttentionFit:
    """Affine attention models (ms per layer) fitted on attention.csv, with the samples used."""

    decode_coef: np.ndarray  # base, per kv token, per sequence
    prefill_coef: np.ndarray  # base, per query-key pair, per token
    decode_x: np.ndarray  # rows of (batch_size, kv_cache_size)
    decode_y: np.ndarray
    prefill_x: np.ndarray  # rows of (prefill_chunk_size, kv_cache_size)
    prefill_y: np.ndarray

    @staticmethod
    def decode_features(x: np.ndarray) -> np.ndarray:
        b, k = x[:, 0], x[:, 1]
        return np.column_stack([np.ones(len(x)), b * k, b])

    @staticmethod
    def prefill_features(x: np.ndarray) -> np.ndarray:
        c, k = x[:, 0], x[:, 1]
        return np.column_stack([np.ones(len(x)), c * (k + c), c])


def holdout_mask(n: int) -> np.ndarray:
    return np.arange(n) % HOLDOUT_EVERY == HOLDOUT_PHASE


def fit_relative(features: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares on relative error with non-negative coefficients (negative ones dropped, refit)."""
    keep = np.ones(features.shape[1], dtype=bool)
    while True:
        coef = np.zeros(features.shape[1])
        w = 1.0 / y
        coef[keep] = np.linalg.lstsq(features[:, keep] * w[:, None], y * w, rcond=None)[0]
        if (coef >= 0).all():
            return coef
        keep &= coef > 0


def fit_attention(vidur: Path) -> AttentionFit:
    decode: dict[tuple[int, int], list[float]] = {}
    prefill: dict[tuple[int, int], list[float]] = {}
    for row in read_csv(vidur / ATTENTION_CSV):
        t = sum(
            _num(row, f"time_stats.{op}.median")
            for op in ("attn_input_reshape", "attn_decode", "attn_prefill", "attn_output_reshape")
        )
        if row["is_prefill"] == "True":
            prefill.setdefault((int(row["prefill_chunk_size"]), int(row["kv_cache_size"])), []).append(t)
        else:
            decode.setdefault((int(row["batch_size"]), int(row["kv_cache_size"])), []).append(t)

    def arrays(samples: dict[tuple[int, int], list[float]]) -> tuple[np.ndarray, np.ndarray]:
        keys = sorted(samples)
        return np.array(keys, dtype=float), np.array([np.mean(samples[k]) for k in keys])

    dx, dy = arrays(decode)
    px, py = arrays(prefill)
    dtrain, ptrain = ~holdout_mask(len(dy)), ~holdout_mask(len(py))
    return AttentionFit(
        decode_coef=fit_relative(AttentionFit.decode_features(dx)[dtrain], dy[dtrain]),
        prefill_coef=fit_relative(AttentionFit.prefill_features(px)[ptrain], py[ptrain]),
        decode_x=dx,
        decode_y=dy,
        prefill_x=px,
        prefill_y=py,
    )


def gpu_ratios(tables: dict[tuple[str, str, int], OpTable]) -> dict[str, dict[str, float]]:
    """Measured speed of each GPU relative to REFERENCE_GPU (time ratio, > 1 = faster) on the same GEMMs:
    ``compute`` at num_tokens 2048-4096 (FLOP bound), ``memory`` at num_tokens 1-8 with tp=1 (weight streaming)."""
    out = {}
    for gpu in GPU_NAMES:
        compute, memory = [], []
        for (g, model, tp), table in tables.items():
            ref = tables.get((REFERENCE_GPU, model, tp))
            if g != gpu or ref is None:
                continue
            for op in GROUP_OPS["linear"]:
                for t in (2048, 3072, 4096):
                    compute.append(np.interp(t, ref.tokens, ref.ops[op]) / np.interp(t, table.tokens, table.ops[op]))
                if tp == 1:
                    for t in (1, 2, 4, 8):
                        memory.append(np.interp(t, ref.tokens, ref.ops[op]) / np.interp(t, table.tokens, table.ops[op]))
        out[gpu] = {"compute": float(np.median(compute)), "memory": float(np.median(memory))}
    return out


def attention_section(fit: AttentionFit, model: pm.ModelSpec, tp: int, ratio: dict[str, float]) -> dict:
    """Per-layer attention coefficients (ms) for ``model`` on ``tp`` GPUs: the attention.csv fit scaled by
    query width (prefill FLOPs), KV bytes (decode) and the GPU's measured compute/memory ratio."""
    heads = model.num_heads / tp
    kv_heads = max(1.0, model.num_kv_heads / tp)
    q_scale = heads * model.head_dim / (ATTN_HEADS * ATTN_HEAD_DIM)
    kv_scale = kv_heads * model.head_dim * model.dtype_bytes / (ATTN_KV_HEADS * ATTN_HEAD_DIM * ATTN_DTYPE)
    d_base, d_kv, d_seq = fit.decode_coef
    p_base, p_pair, p_tok = fit.prefill_coef
    return {
        "prefill_base": float(p_base),
        "prefill_per_pair": float(p_pair * q_scale / ratio["compute"]),
        "prefill_per_token": float(p_tok * q_scale / ratio["memory"]),
        "decode_base": float(d_base),
        "decode_per_kv_token": float(d_kv * kv_scale / ratio["memory"]),
        "decode_per_seq": float(d_seq * q_scale / ratio["memory"]),
    }


# --------------------------------------------------------------------------- profiles


def feasible(model: str, gpu: str, tp: int) -> bool:
    """Whether the weights fit with room for MIN_KV_FRACTION full-length sequences at 90% memory."""
    spec = pm.MODELS[model]
    return pm.roofline_profile(spec, gpu, tp).kv_cache_tokens(0.9) >= MIN_KV_FRACTION * spec.max_model_len


def profile_keys(tables: dict[tuple[str, str, int], OpTable]) -> list[tuple[str, str, int]]:
    keys = set(tables)
    for (gpu, model), ref in DERIVED.items():
        for tp in TP_DEGREES:
            if (REFERENCE_GPU, model, tp) in tables and (REFERENCE_GPU, ref, tp) in tables and (gpu, ref, tp) in tables:
                keys.add((gpu, model, tp))
    return sorted(k for k in keys if (k[2] == 1 or k[0] in NETWORK_DIRS) and feasible(k[1], k[0], k[2]))


def build_profiles(vidur: Path) -> dict[str, dict]:
    """name -> JSON document of every shipped profile."""
    tables = load_op_tables(vidur)
    network = load_allreduce(vidur)
    fit = fit_attention(vidur)
    ratios = gpu_ratios(tables)
    profiles = {}
    for gpu, model, tp in profile_keys(tables):
        name = pm.profile_name(gpu, model, tp)
        if (gpu, model, tp) in tables:
            table = tables[(gpu, model, tp)]
            series = measured_series(table)
            files = [compute_csv(gpu, model)]
            derivation = "measured"
        else:
            ref = DERIVED[(gpu, model)]
            table = tables[(REFERENCE_GPU, model, tp)]
            series = derived_series(table, tables[(REFERENCE_GPU, ref, tp)], tables[(gpu, ref, tp)])
            files = [compute_csv(REFERENCE_GPU, model), compute_csv(REFERENCE_GPU, ref), compute_csv(gpu, ref)]
            derivation = (
                f"{REFERENCE_GPU} {MODEL_DIRS[model]} per-group times x measured {gpu}/{REFERENCE_GPU} "
                f"time ratio of {MODEL_DIRS[ref]} at equal num_tokens (tp={tp})"
            )
        files.append(ATTENTION_CSV)
        doc = {
            "name": name,
            "gpu": gpu,
            "model": model,
            "tp": tp,
            "derivation": derivation,
            "vidur_shape": table.shape,
            "dense": dense_section(table.tokens, series),
            "attention_per_layer_ms": attention_section(fit, pm.MODELS[model], tp, ratios[gpu]),
            "gpu_ratio_vs_a100": ratios[gpu],
            "generated_by": "benchmarks/compile_sim_profiles.py",
        }
        if tp > 1:
            sizes, times = network[(gpu, tp)]
            doc["allreduce"] = allreduce_section(sizes, times, allreduce_csv(gpu))
            files.append(allreduce_csv(gpu))
        doc["source"] = "vidur:" + ",".join(files)
        profiles[name] = doc
    return profiles


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def render(doc: dict) -> str:
    return json.dumps(_rounded(doc), indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vidur", type=Path, default=DEFAULT_VIDUR, help="vidur data folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.vidur / "data" / "profiling").is_dir():
        print(f"error: no vidur profiling data under {args.vidur}", file=sys.stderr)
        return 2
    profiles = build_profiles(args.vidur)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in sorted(args.out.glob("*.json")):
        if stale.stem not in profiles:
            stale.unlink()
    total = 0
    for name, doc in profiles.items():
        text = render(doc)
        (args.out / f"{name}.json").write_text(text, encoding="utf-8")
        total += len(text)
    print(f"wrote {len(profiles)} profiles ({total / 1024:.0f} KiB) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
