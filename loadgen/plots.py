"""Plots of benchmark runs: TTFT/TPOT CDFs, latency and throughput over time, attainment vs rate.

Plots use matplotlib's Agg canvas directly (no pyplot, no display, no global figure registry).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pdgate.loadgen.stats import max_rate_meeting
from pdgate.loadgen.types import RequestResult

FIG_DPI = 100


def _save(fig: Figure, out_png: str | Path) -> Path:
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=FIG_DPI)
    fig.clear()
    return path


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_attainment_vs_rate(
    sweeps: Mapping[str, Iterable[tuple[float, float | None]]], target_pct: float, out_png: str | Path
) -> Path:
    """SLO attainment (fractions in ``sweeps``, drawn in %) against request rate, one line per
    target, the ``target_pct`` line, and each target's highest rate meeting it
    (:func:`~loadgen.stats.max_rate_meeting`) in the legend."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    drawn = False
    for target, points in sweeps.items():
        pts = sorted((float(rate), att) for rate, att in points if att is not None)
        if not pts:
            continue
        best = max_rate_meeting(pts, target_pct / 100)
        label = f"{target} (max {best:g} req/s)" if best is not None else f"{target} (misses target)"
        ax.plot([p[0] for p in pts], [p[1] * 100 for p in pts], marker="o", label=label)
        drawn = True
    ax.axhline(target_pct, color="grey", linestyle="--", linewidth=1, label=f"target {target_pct:g}%")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    if not drawn:
        _no_data(ax)
    ax.legend(fontsize="small")
    return _save(fig, out_png)


def _cdf(ax: Any, values: Sequence[float], label: str) -> bool:
    if not values:
        return False
    data = np.sort(np.asarray(values, dtype=float)) * 1e3
    ax.step(data, np.arange(1, data.size + 1) / data.size, where="post", label=label)
    return True


def plot_cdfs(runs: Mapping[str, Sequence[RequestResult]], out_png: str | Path) -> Path:
    """TTFT and TPOT CDFs (two panels, ms) of the successful requests, one line per run."""
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, title in ((axes[0], "ttft_s", "TTFT"), (axes[1], "tpot_s", "TPOT")):
        drawn = False
        for name, results in runs.items():
            values = [v for r in results if r.ok and (v := getattr(r, metric)) is not None]
            drawn |= _cdf(ax, values, name)
        ax.set_title(f"{title} CDF")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            _no_data(ax)
    return _save(fig, out_png)


def _binned_percentiles(times: np.ndarray, values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p50 and p99 of ``values`` per time bin (NaN for empty bins)."""
    n = edges.size - 1
    p50 = np.full(n, np.nan)
    p99 = np.full(n, np.nan)
    if values.size:
        idx = np.clip(np.digitize(times, edges) - 1, 0, n - 1)
        for b in range(n):
            sel = values[idx == b]
            if sel.size:
                p50[b], p99[b] = np.percentile(sel, [50, 99])
    return p50, p99


def plot_timeseries(results: Sequence[RequestResult], out_png: str | Path, bin_s: float = 1.0) -> Path:
    """Over the run, in ``bin_s`` bins: TTFT and TPOT p50/p99 (by send time) and throughput
    (output tokens/s, each request's tokens spread evenly over its chunks; completed
    requests/s by end time)."""
    if bin_s <= 0:
        raise ValueError("bin_s must be positive")
    fig = Figure(figsize=(7, 7), layout="constrained")
    ax_ttft, ax_tpot, ax_tput = fig.subplots(3, 1, sharex=True)
    good = [r for r in results if r.ok]
    end = max((r.end_s for r in results), default=0.0)
    edges = np.arange(0.0, end + bin_s, bin_s)
    if edges.size < 2:
        edges = np.array([0.0, bin_s])
    mids = (edges[:-1] + edges[1:]) / 2
    for ax, metric, title in ((ax_ttft, "ttft_s", "TTFT"), (ax_tpot, "tpot_s", "TPOT")):
        pairs = [(r.sent_s, v) for r in good if (v := getattr(r, metric)) is not None]
        if pairs:
            t, v = (np.asarray(x, dtype=float) for x in zip(*pairs, strict=True))
            p50, p99 = _binned_percentiles(t, v * 1e3, edges)
            ax.plot(mids, p50, marker=".", label="p50")
            ax.plot(mids, p99, marker=".", label="p99")
            ax.legend(fontsize="small")
        else:
            _no_data(ax)
        ax.set_ylabel(f"{title} (ms)")
        ax.grid(alpha=0.3)
    times: list[float] = []
    weights: list[float] = []
    for r in good:
        if r.chunk_times:
            times += r.chunk_times
            weights += [r.output_tokens / len(r.chunk_times)] * len(r.chunk_times)
        else:
            times.append(r.end_s)
            weights.append(float(r.output_tokens))
    tokens, _ = np.histogram(times, bins=edges, weights=weights)
    done, _ = np.histogram([r.end_s for r in good], bins=edges)
    ax_tput.plot(mids, tokens / bin_s, color="tab:blue", label="output tok/s")
    ax_tput.set_ylabel("output tok/s")
    ax_req = ax_tput.twinx()
    ax_req.plot(mids, done / bin_s, color="tab:orange", linestyle="--", label="completed req/s")
    ax_req.set_ylabel("req/s")
    ax_tput.set_xlabel("time since start (s)")
    ax_tput.grid(alpha=0.3)
    if not good:
        _no_data(ax_tput)
    handles, labels = ax_tput.get_legend_handles_labels()
    more_handles, more_labels = ax_req.get_legend_handles_labels()
    ax_tput.legend(handles + more_handles, labels + more_labels, loc="upper left", fontsize="small")
    return _save(fig, out_png)
