#!/usr/bin/env python3
"""Fidelity of the simulated engine's performance model against the measured vidur profiles.

    python benchmarks/sim_fidelity.py [--vidur DIR] [--fit-roofline]

Compares what the *shipped* profiles (pdgate/common/profiles/*.json) and the
roofline fallback predict with the measured operator times they were compiled
from, and prints markdown tables of mean absolute percentage error (MAPE) and
maximum absolute percentage error.  "held-out" columns use only measurements
the profile does not store (num_tokens between the kept breakpoints, message
sizes between kept sizes, attention rows left out of the fit).  Exits 0 with a
SKIP message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compile_sim_profiles as csp
from compile_sim_profiles import GROUPS, OpTable

from pdgate.common import perf_model as pm

# Held-out check of the cross-GPU derivation: (target model, reference model) pairs measured on both GPUs.
DERIVATION_CHECKS = (
    ("llama-2-7b", "internlm-20b"),
    ("internlm-20b", "llama-2-7b"),
    ("codellama-34b", "llama-2-70b"),
    ("llama-2-70b", "codellama-34b"),
    ("qwen-72b", "llama-2-70b"),
)
# Shipped profiles whose per-GPU attention shape is exactly that of attention.csv (64 q / 8 kv heads, TP2).
STEP_CHECK_PROFILES = ("a100-llama-2-70b-tp2", "a100-llama-3-70b-tp2", "a100-codellama-34b-tp2")


def ape(pred: np.ndarray, meas: np.ndarray) -> np.ndarray:
    """Absolute percentage errors."""
    return 100.0 * np.abs(np.asarray(pred, float) - meas) / meas


def fmt(errors: np.ndarray) -> str:
    """'MAPE / max' cell."""
    return f"{errors.mean():5.1f} / {errors.max():5.1f}" if len(errors) else "   -"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def interp_tail(xs, ys, x, tail):
    """np.interp with linear extrapolation at ``tail`` slope past the last point (as the profiles do)."""
    x = np.asarray(x, dtype=float)
    return np.where(x > xs[-1], ys[-1] + tail * (x - xs[-1]), np.interp(x, xs, ys))


def profile_groups(doc: dict, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Per-group ms predicted by a profile JSON at ``tokens``."""
    dense = doc["dense"]
    return {
        g: interp_tail(dense["num_tokens"], dense[f"{g}_ms"], tokens, dense["tail_ms_per_token"][g]) for g in GROUPS
    }


def profile_allreduce(doc: dict, nbytes: np.ndarray) -> np.ndarray:
    ar = doc["allreduce"]
    return interp_tail(ar["bytes"], ar["ms"], nbytes, ar["tail_ms_per_byte"])


def measured_allreduce(network, gpu: str, tp: int, nbytes: np.ndarray) -> np.ndarray:
    sizes, times = network[(gpu, tp)]
    return np.interp(nbytes, sizes, times)


def max_allreduce_bytes(network, doc: dict) -> float:
    return float(network[(doc["gpu"], doc["tp"])][0][-1]) if doc["tp"] > 1 else float("inf")


def load_docs() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(pm.PROFILE_DIR.glob("*.json"))}


# --------------------------------------------------------------------------- sections


def dense_fidelity(docs, tables, network) -> None:
    """Shipped dense tables vs the measured per-operator data they were compiled from."""
    rows = []
    for name, doc in docs.items():
        key = (doc["gpu"], doc["model"], doc["tp"])
        if doc["derivation"] != "measured":
            continue
        meas: OpTable = tables[key]
        model = pm.MODELS[doc["model"]]
        held = ~np.isin(meas.tokens, doc["dense"]["num_tokens"])
        pred = profile_groups(doc, meas.tokens)
        err = {g: ape(pred[g], meas.group(g)) for g in GROUPS}
        layer = ape(pred["linear"] + pred["elementwise"], meas.layer())
        # whole non-attention step: layers + embedding (+ two all-reduces per layer)
        step_meas = model.num_layers * meas.layer() + meas.group("embedding")
        prof = pm.load_profile(name)
        if doc["tp"] > 1:
            step_meas = step_meas + 2 * model.num_layers * measured_allreduce(
                network, doc["gpu"], doc["tp"], meas.tokens * model.hidden_size * model.dtype_bytes
            )
        step = ape(np.array([prof.dense_time(t) * 1e3 for t in meas.tokens]), step_meas)
        # past the largest measured all-reduce (64 MiB) there is nothing measured to compare with
        in_range = meas.tokens * model.hidden_size * model.dtype_bytes <= max_allreduce_bytes(network, doc)
        rows.append(
            [
                name,
                str(len(doc["dense"]["num_tokens"])),
                f"{held.sum()}",
                fmt(step[held & in_range]),
                fmt(step[in_range]),
                fmt(layer[held]),
                fmt(err["linear"][held]),
                fmt(err["elementwise"][held]),
                fmt(err["embedding"][held]),
            ]
        )
    table(
        "Dense (non-attention) time: shipped tables vs measured mlp.csv (+ all_reduce.csv for TP > 1; step "
        "columns only up to the largest measured all-reduce, 64 MiB), MAPE / max %",
        [
            "profile",
            "points kept",
            "held-out",
            "step held-out",
            "step all",
            "layer held-out",
            "linear held-out",
            "elementwise held-out",
            "embedding held-out",
        ],
        rows,
    )


def allreduce_fidelity(docs, network) -> None:
    rows = []
    seen = set()
    for doc in docs.values():
        if doc["tp"] == 1 or (doc["gpu"], doc["tp"]) in seen:
            continue
        seen.add((doc["gpu"], doc["tp"]))
        sizes, times = network[(doc["gpu"], doc["tp"])]
        held = ~np.isin(sizes, doc["allreduce"]["bytes"])
        pred = profile_allreduce(doc, sizes)
        roof = np.array([pm.roofline_allreduce_time(pm.GPUS[doc["gpu"]], doc["tp"], s) * 1e3 for s in sizes])
        rows.append(
            [
                f"{doc['gpu']} x{doc['tp']}",
                str(len(doc["allreduce"]["bytes"])),
                str(held.sum()),
                fmt(ape(pred, times)[held]),
                fmt(ape(roof, times)),
            ]
        )
    table(
        "TP all-reduce (2 KiB - 64 MiB): shipped table vs measured all_reduce.csv, MAPE / max %",
        ["GPU x workers", "sizes kept", "held-out", "table held-out", "roofline all"],
        sorted(rows),
    )


def derivation_fidelity(tables) -> None:
    """The h100 derivation applied where the h100 answer is known (target model held out)."""
    rows = []
    for target, ref in DERIVATION_CHECKS:
        for tp in csp.TP_DEGREES:
            keys = [("a100", target, tp), ("a100", ref, tp), ("h100", ref, tp), ("h100", target, tp)]
            if not all(k in tables for k in keys):
                continue
            src, ref_src, ref_dst, truth = (tables[k] for k in keys)
            series = csp.derived_series(src, ref_src, ref_dst)
            layer = np.interp(truth.tokens, src.tokens, series["linear"] + series["elementwise"])
            rows.append([f"h100-{target}" + (f"-tp{tp}" if tp > 1 else ""), ref, fmt(ape(layer, truth.layer()))])
    table(
        "Cross-GPU derivation check (how h100-llama-3-8b/-70b are built): a100 table of the target x "
        "h100/a100 ratio of a reference model, vs the measured h100 table of the target; per-layer time, "
        "MAPE / max %",
        ["derived profile (target held out)", "reference model", "layer, all points"],
        rows,
    )


def attention_fidelity(fit: csp.AttentionFit) -> None:
    rows = []
    for label, feats, coef, x, y in (
        ("decode (batch 1-128, kv 32-4032)", fit.decode_features, fit.decode_coef, fit.decode_x, fit.decode_y),
        ("prefill (chunk 64-4096, prior 0-4032)", fit.prefill_features, fit.prefill_coef, fit.prefill_x, fit.prefill_y),
    ):
        held = csp.holdout_mask(len(y))
        err = ape(feats(x) @ coef, y)
        rows.append(
            [
                label,
                f"{(~held).sum()} / {held.sum()}",
                fmt(err[~held]),
                fmt(err[held]),
                ", ".join(f"{c:.4g}" for c in coef),
            ]
        )
    table(
        "Attention kernel fit on a100/attention.csv (per layer, 70B-class shape, TP2), MAPE / max %",
        ["rows", "fit / held-out rows", "fit rows", "held-out rows", "coefficients (ms)"],
        rows,
    )
    model, gpu = pm.MODELS["llama-2-70b"], pm.GPUS["a100"]
    roof = pm.roofline_attention(model, gpu, 2)
    L = model.num_layers
    d = ape(
        1e3
        / L
        * (
            roof.decode_base
            + roof.decode_per_kv_token * fit.decode_x.prod(axis=1)
            + roof.decode_per_seq * fit.decode_x[:, 0]
        ),
        fit.decode_y,
    )
    c, k = fit.prefill_x[:, 0], fit.prefill_x[:, 1]
    p = ape(
        1e3 / L * (roof.prefill_base + roof.prefill_per_pair * c * (k + c) + roof.prefill_per_token * c), fit.prefill_y
    )
    print(f"\nRoofline attention vs the same rows: decode {fmt(d)}, prefill {fmt(p)} (MAPE / max %)")


def _measured_step_ms(meas: OpTable, network, doc: dict, tokens: np.ndarray, attention_ms: np.ndarray) -> np.ndarray:
    """Measured GPU step: layers x (layer ops + attention + 2 all-reduces) + embedding, interpolated at ``tokens``."""
    model = pm.MODELS[doc["model"]]
    layer = np.interp(tokens, meas.tokens, meas.layer())
    emb = np.interp(tokens, meas.tokens, meas.group("embedding"))
    ar = measured_allreduce(network, doc["gpu"], doc["tp"], tokens * model.hidden_size * model.dtype_bytes)
    return model.num_layers * (layer + attention_ms + 2 * ar) + emb


def _gpu_step_ms(prof: pm.EngineProfile, batch: pm.StepBatch) -> float:
    """Modelled GPU step without the CPU overhead and the lm head (not in the data)."""
    parts = prof.breakdown(batch)
    return 1e3 * (parts["dense"] + parts["prefill_attention"] + parts["decode_attention"])


def step_fidelity(docs, tables, network, fit: csp.AttentionFit) -> None:
    """Whole GPU step (everything but the CPU overhead and lm head, which the data does not measure)
    for held-out attention rows, on profiles whose attention shape is the one attention.csv measured."""
    rows = []
    for name in STEP_CHECK_PROFILES:
        if name not in docs:
            continue
        doc, prof = docs[name], pm.load_profile(name)
        meas = tables[(doc["gpu"], doc["model"], doc["tp"])]
        dh = csp.holdout_mask(len(fit.decode_y))
        b, kv = fit.decode_x[dh, 0], fit.decode_x[dh, 1]
        dec_pred = [
            _gpu_step_ms(prof, pm.StepBatch(decode_seqs=int(s), decode_kv_tokens=int(s * c))) for s, c in zip(b, kv)
        ]
        dec_err = ape(dec_pred, _measured_step_ms(meas, network, doc, b, fit.decode_y[dh]))
        ph = csp.holdout_mask(len(fit.prefill_y))
        c, k = fit.prefill_x[ph, 0], fit.prefill_x[ph, 1]
        pre_pred = [
            _gpu_step_ms(prof, pm.StepBatch(prefill_tokens=int(n), prefill_attn_pairs=int(n * (p + n))))
            for n, p in zip(c, k)
        ]
        pre_err = ape(pre_pred, _measured_step_ms(meas, network, doc, c, fit.prefill_y[ph]))
        rows.append([name, f"{len(dec_err)}", fmt(dec_err), f"{len(pre_err)}", fmt(pre_err)])
    table(
        "Per-step GPU time (dense + attention + all-reduce) vs measured operator sums, held-out attention "
        "rows, MAPE / max %",
        ["profile", "decode steps", "decode", "prefill steps", "prefill"],
        rows,
    )


def roofline_fidelity(tables) -> None:
    rows = []
    for gpu in csp.GPU_NAMES:
        errs = []
        for (g, model, tp), meas in sorted(tables.items()):
            if g != gpu:
                continue
            spec = pm.MODELS[model]
            lin, ele = zip(*(pm.roofline_layer_times(spec, pm.GPUS[gpu], tp, t) for t in meas.tokens))
            errs.append(ape(1e3 * (np.array(lin) + np.array(ele)), meas.layer()))
        e = np.concatenate(errs)
        rows.append([gpu, str(len(errs)), str(len(e)), fmt(e), f"{np.percentile(e, 90):5.1f}"])
    table(
        "Roofline fallback vs measured per-layer time (all models x TP in the data), MAPE / max %",
        ["GPU", "model x TP tables", "points", "layer", "p90"],
        rows,
    )


HEADLINE_PROFILES = (
    "h100-llama-3-8b",
    "a100-llama-3-8b",
    "h100-llama-2-7b",
    "a100-llama-2-7b",
    "h100-llama-2-70b-tp4",
    "a100-llama-3-70b-tp4",
    "h100-llama-3-70b-tp4",
)
HEADLINE_BATCHES = (
    ("prefill 2048", pm.StepBatch(prefill_tokens=2048, prefill_attn_pairs=2048 * 2048)),
    ("decode 1 x 1k", pm.StepBatch(decode_seqs=1, decode_kv_tokens=1024)),
    ("decode 64 x 2k", pm.StepBatch(decode_seqs=64, decode_kv_tokens=64 * 2048)),
    (
        "512 chunk + 32 decodes",
        pm.StepBatch(prefill_tokens=512, prefill_attn_pairs=512 * 1536, decode_seqs=32, decode_kv_tokens=32 * 1024),
    ),
)


def headline(docs) -> None:
    """Whole step times (CPU overhead and lm head included) of the main profiles, calibrated vs roofline."""
    rows = []
    for name in HEADLINE_PROFILES:
        prof = pm.load_profile(name)
        roof = pm.roofline_profile(prof.model, prof.gpu, prof.tp)
        rows.append(
            [name, "measured" if docs[name]["derivation"] == "measured" else "derived"]
            + [f"{1e3 * prof.step_time(b):.1f} ({1e3 * roof.step_time(b):.1f})" for _, b in HEADLINE_BATCHES]
            + [f"{prof.kv_cache_tokens(0.9):,}"]
        )
    table(
        "Step time in ms, calibrated (roofline), including CPU overhead and lm head",
        ["profile", "table"] + [label for label, _ in HEADLINE_BATCHES] + ["KV tokens @0.9"],
        rows,
    )


def speed() -> None:
    prof = pm.load_profile("h100-llama-3-8b")
    batch = pm.StepBatch(prefill_tokens=512, prefill_attn_pairs=512 * 1024, decode_seqs=37, decode_kv_tokens=37 * 900)
    n = 200_000
    start = time.perf_counter()
    for _ in range(n):
        prof.step_time(batch)
    per_call = (time.perf_counter() - start) / n * 1e6
    print(f"\nstep_time cost: {per_call:.2f} us per call ({n} calls, h100-llama-3-8b, mixed batch)")


def _grid_best(score, *axes):
    """Arguments on the grid ``axes`` minimising ``score`` (first minimum in grid order)."""
    return min(itertools.product(*axes), key=lambda args: score(*args))


def fit_roofline(tables, network, fit: csp.AttentionFit) -> None:
    """Re-derive the RooflineFactors from the data (grid search) and print them next to the module's."""
    rows = []
    for (g, m, tp), meas in sorted(tables.items()):
        spec, gpu, t = pm.MODELS[m], pm.GPUS[g], meas.tokens
        shapes = pm.layer_gemm_shapes(spec, tp)
        rows.append(
            (
                gpu,
                [2 * t * k * n for k, n in shapes],
                [spec.dtype_bytes * (k * n + t * (k + n)) for k, n in shapes],
                pm.layer_elementwise_bytes(spec, tp, t),
                meas.group("linear") * 1e-3,
                meas.group("elementwise") * 1e-3,
            )
        )

    def elementwise(gpu, nbytes, eff, launch):
        return nbytes / (eff * gpu.mem_bandwidth) + 5 * launch

    def elementwise_score(eff, launch):
        return np.concatenate([ape(elementwise(gpu, eb, eff, launch), y) for gpu, _, _, eb, _, y in rows]).mean()

    def layer_score(ec, em, launch):  # linear factors scored on the layer total, element-wise factors fixed
        return np.concatenate(
            [
                ape(
                    sum(
                        np.maximum(f / (ec * gpu.dense_flops), b / (em * gpu.mem_bandwidth))
                        for f, b in zip(flops, nbytes)
                    )
                    + 4 * launch
                    + elementwise(gpu, eb, ee, el),
                    y1 + y2,
                )
                for gpu, flops, nbytes, eb, y1, y2 in rows
            ]
        ).mean()

    ar = [
        (pm.GPUS[g], n, sizes, times * 1e-3)
        for (g, n), sizes, times in ((k, *v) for k, v in sorted(network.items()))
        if n > 1
    ]

    def allreduce_score(latency, eff):
        factors = pm.RooflineFactors(allreduce_latency_s=latency, allreduce_eff=eff)
        return np.concatenate([ape(pm.roofline_allreduce_time(gpu, n, s, factors), t) for gpu, n, s, t in ar]).mean()

    steps = np.round(np.arange(0.20, 0.96, 0.05), 2)
    ee, el = _grid_best(elementwise_score, steps, np.arange(0, 5e-6, 1e-6))
    ec, em, gl = _grid_best(layer_score, steps[steps >= 0.4], steps[steps >= 0.4], np.arange(0, 25e-6, 2e-6))
    al, ae = _grid_best(allreduce_score, np.arange(5e-6, 80e-6, 2.5e-6), np.arange(0.2, 1.0, 0.025))
    a100 = pm.GPUS[csp.REFERENCE_GPU]
    fitted = {
        "gemm_compute_eff": ec,
        "gemm_memory_eff": em,
        "gemm_launch_s": gl,
        "elementwise_eff": ee,
        "elementwise_launch_s": el,
        "attn_prefill_eff": 4 * csp.ATTN_HEADS * csp.ATTN_HEAD_DIM / (fit.prefill_coef[1] * 1e-3 * a100.dense_flops),
        "attn_decode_eff": (
            2
            * csp.ATTN_KV_HEADS
            * csp.ATTN_HEAD_DIM
            * csp.ATTN_DTYPE
            / (fit.decode_coef[1] * 1e-3 * a100.mem_bandwidth)
        ),
        "attn_launch_s": 1e-3 * (fit.decode_coef[0] + fit.prefill_coef[0]) / 2,
        "allreduce_latency_s": al,
        "allreduce_eff": ae,
    }
    table(
        "Roofline factors re-derived from the data vs the module's ROOFLINE",
        ["factor", "fitted", "module"],
        [[k, f"{v:.4g}", f"{getattr(pm.ROOFLINE, k):.4g}"] for k, v in fitted.items()],
    )
    print(
        f"\nscores: layer MAPE {layer_score(ec, em, gl):.1f}%, element-wise {elementwise_score(ee, el):.1f}%, "
        f"all-reduce {allreduce_score(al, ae):.1f}%"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--vidur", type=Path, default=csp.DEFAULT_VIDUR, help="vidur data folder (default: %(default)s)"
    )
    parser.add_argument("--fit-roofline", action="store_true", help="also grid-search the roofline GEMM factors")
    args = parser.parse_args(argv)
    if not (args.vidur / "data" / "profiling").is_dir():
        print(f"SKIP: vidur profiling data not found under {args.vidur} (pass --vidur DIR)")
        return 0
    tables = csp.load_op_tables(args.vidur)
    network = csp.load_allreduce(args.vidur)
    fit = csp.fit_attention(args.vidur)
    docs = load_docs()
    print(f"Simulated-engine performance model fidelity: {len(docs)} shipped profiles, data {args.vidur}")
    dense_fidelity(docs, tables, network)
    allreduce_fidelity(docs, network)
    derivation_fidelity(tables)
    attention_fidelity(fit)
    step_fidelity(docs, tables, network, fit)
    roofline_fidelity(tables)
    headline(docs)
    speed()
    if args.fit_roofline:
        fit_roofline(tables, network, fit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
