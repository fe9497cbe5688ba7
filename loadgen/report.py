"""Saving, loading and showing benchmark runs: JSON + CSV per run, rich tables, matplotlib plots.

A run's JSON (written by :func:`write_run`, read by :func:`load_run`)::

    {"schema": 1, "run_meta": {...as given...}, "environment": {...},
     "stats": RunStats.to_dict(), "results": [RequestResult.to_dict(), ...]}

``run_meta`` is the caller's full configuration; two keys have a meaning here: ``name`` (the run's
name in tables and file names) and ``sweep`` (``{target: [[rate, attainment], ...]}``,
attainment as a fraction, drawn by :func:`render_report`).

Plots use matplotlib's Agg canvas directly (no pyplot, no display, no global figure registry).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from pdgate.common.version import package_version
from pdgate.loadgen.slo import GroupStats, RunStats, max_rate_meeting
from pdgate.loadgen.types import RequestResult

SCHEMA_VERSION = 1
CSV_COLUMNS: tuple[str, ...] = (
    "index",
    "target",
    "slo_class",
    "scheduled_s",
    "sent_s",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "output_tokens",
    "prompt_tokens",
    "cached_tokens",
    "status",
    "error",
    "met_slo",
)
FIG_DPI = 100


# --------------------------------------------------------------------------- files


def environment() -> dict[str, Any]:
    """Where and when a run was taken: Python, platform, host, pdgate version, time."""
    version = package_version()
    return {
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "pdgate_version": version,
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "unix_time": time.time(),
    }


def _json_default(obj: Any) -> Any:
    """Make ``run_meta`` values JSON-friendly: paths, dataclasses, pydantic models, sets, numpy."""
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def run_name(run_meta: Mapping[str, Any], fallback: str = "run") -> str:
    """The run's display name: ``run_meta["name"]``, else ``run_meta["target"]`` if a string,
    else ``fallback``."""
    for key in ("name", "target"):
        value = run_meta.get(key)
        if isinstance(value, str) and value:
            return value
    return fallback


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _cell(value: Any) -> Any:
    return "" if value is None else value


def write_run(
    path_dir: str | Path,
    run_meta: Mapping[str, Any],
    results: Sequence[RequestResult],
    stats: RunStats,
    *,
    stem: str | None = None,
) -> dict[str, Path]:
    """Write one run to ``path_dir`` (created if needed): ``<stem>.json`` (run_meta, environment,
    stats, every result) and ``<stem>.csv`` (one row per request, :data:`CSV_COLUMNS`; ``met_slo``
    against the SLOs in ``stats``). ``stem`` defaults to :func:`run_name`. Returns
    ``{"json": path, "csv": path}``."""
    out_dir = Path(path_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _file_stem(stem or run_name(run_meta))
    doc = {
        "schema": SCHEMA_VERSION,
        "run_meta": dict(run_meta),
        "environment": environment(),
        "stats": stats.to_dict(),
        "results": [r.to_dict() for r in results],
    }
    json_path = out_dir / f"{stem}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default))
    tmp.replace(json_path)

    spec = stats.slo
    csv_path = out_dir / f"{stem}.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            writer.writerow(
                [
                    r.index,
                    r.target,
                    r.slo_class,
                    r.scheduled_s,
                    r.sent_s,
                    _cell(r.ttft_s),
                    _cell(r.tpot_s),
                    r.e2e_s,
                    r.output_tokens,
                    _cell(r.prompt_tokens),
                    _cell(r.cached_tokens),
                    r.status,
                    _cell(r.error),
                    int(spec.meets(r)),
                ]
            )
    return {"json": json_path, "csv": csv_path}


def load_run(json_path: str | Path) -> tuple[dict[str, Any], list[RequestResult], RunStats]:
    """Read a run written by :func:`write_run`: ``(run_meta, results, stats)``."""
    doc = json.loads(Path(json_path).read_text())
    if doc.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{json_path}: unknown run schema {doc.get('schema')!r} (expected {SCHEMA_VERSION})")
    results = [RequestResult.from_dict(r) for r in doc["results"]]
    return doc["run_meta"], results, RunStats.from_dict(doc["stats"])


# --------------------------------------------------------------------------- tables


def fmt_ms(seconds: float | None) -> str:
    """Seconds as milliseconds: 2 decimals below 10 ms, else 1; ``-`` for no value."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.2f}" if abs(ms) < 10 else f"{ms:.1f}"


def fmt_pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.1f}%"


def fmt_rate(value: float) -> str:
    return f"{value:.2f}"


_ROWS: tuple[tuple[str, Callable[[GroupStats], str]], ...] = (
    ("requests", lambda s: str(s.total)),
    ("ok", lambda s: str(s.ok)),
    ("failed", lambda s: str(s.failed)),
    ("SLO attainment", lambda s: fmt_pct(s.attainment)),
    ("goodput (req/s)", lambda s: fmt_rate(s.goodput_rps)),
    ("throughput (req/s)", lambda s: fmt_rate(s.request_rps)),
    ("output (tok/s)", lambda s: f"{s.output_tps:.1f}"),
    ("input (tok/s)", lambda s: f"{s.input_tps:.1f}"),
    ("TTFT p50 (ms)", lambda s: fmt_ms(s.ttft.p50)),
    ("TTFT p99 (ms)", lambda s: fmt_ms(s.ttft.p99)),
    ("TPOT p50 (ms)", lambda s: fmt_ms(s.tpot.p50)),
    ("TPOT p99 (ms)", lambda s: fmt_ms(s.tpot.p99)),
    ("E2E p50 (ms)", lambda s: fmt_ms(s.e2e.p50)),
    ("E2E p99 (ms)", lambda s: fmt_ms(s.e2e.p99)),
    ("ITL p99 (ms)", lambda s: fmt_ms(s.itl.p99)),
    ("client lateness p99 (ms)", lambda s: fmt_ms(s.lateness.p99)),
    ("cached prompt share", lambda s: fmt_pct(s.cached_fraction)),
)


def summary_table(runs: Sequence[tuple[str, RunStats]], *, target_pct: float | None = None) -> Table:
    """Side-by-side comparison: one column per run, one row per metric. With ``target_pct``,
    attainment is green when it reaches the target, red otherwise."""
    table = Table(title="pdgate bench: measured window", title_justify="left")
    table.add_column("metric", style="bold")
    for name, _ in runs:
        table.add_column(name, justify="right")
    for label, getter in _ROWS:
        cells = []
        for _, stats in runs:
            text = getter(stats)
            if label == "SLO attainment" and target_pct is not None and stats.attainment is not None:
                colour = "green" if stats.attainment * 100 >= target_pct else "red"
                text = f"[{colour}]{text}[/{colour}]"
            cells.append(text)
        table.add_row(label, *cells)
    windows = {f"{s.window_s:g}s (warm-up {s.warmup_s:g}s, cool-down {s.cooldown_s:g}s)" for _, s in runs}
    if len(windows) == 1:
        table.caption = f"window {windows.pop()}"
    return table


def class_table(runs: Sequence[tuple[str, RunStats]]) -> Table:
    """Per SLO class: one row per (run, class) with its SLO, attainment, goodput, p99 latencies."""
    table = Table(title="per SLO class", title_justify="left")
    for column in (
        "run",
        "class",
        "SLO",
        "requests",
        "failed",
        "attainment",
        "goodput (req/s)",
        "TTFT p99 (ms)",
        "TPOT p99 (ms)",
        "E2E p99 (ms)",
    ):
        table.add_column(column, justify="left" if column in ("run", "class", "SLO") else "right", no_wrap=True)
    for name, stats in runs:
        spec = stats.slo
        for cls, group in stats.classes.items():
            table.add_row(
                name,
                cls,
                spec.for_class(cls).describe(),
                str(group.total),
                str(group.failed),
                fmt_pct(group.attainment),
                fmt_rate(group.goodput_rps),
                fmt_ms(group.ttft.p99),
                fmt_ms(group.tpot.p99),
                fmt_ms(group.e2e.p99),
            )
    return table


def _has_classes(runs: Sequence[tuple[str, RunStats]]) -> bool:
    return any(set(stats.classes) - {"default"} or len(stats.classes) > 1 for _, stats in runs)


def print_summary(console: Console, runs: Sequence[tuple[str, RunStats]], *, target_pct: float | None = None) -> None:
    """Print :func:`summary_table`, and :func:`class_table` when any run has named SLO classes."""
    console.print(summary_table(runs, target_pct=target_pct))
    if _has_classes(runs):
        console.print(class_table(runs))


# --------------------------------------------------------------------------- plots


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
    (:func:`~loadgen.slo.max_rate_meeting`) in the legend."""
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


# --------------------------------------------------------------------------- report


def render_report(
    json_paths: Sequence[str | Path], out_dir: str | Path, console: Console, *, target_pct: float = 90.0
) -> dict[str, Path]:
    """Re-render saved runs: print the comparison table (and the per-class one), and write into
    ``out_dir`` the overlaid TTFT/TPOT CDFs of the measured requests (``cdf.png``), one
    ``timeseries_<run>.png`` per run, and ``attainment.png`` when any run_meta holds a
    ``sweep``. Returns the written files by name (``cdf``, ``timeseries:<run>``, ``attainment``)."""
    if not json_paths:
        raise ValueError("no run files given")
    out = Path(out_dir)
    runs: list[tuple[str, RunStats]] = []
    measured: dict[str, list[RequestResult]] = {}
    all_results: dict[str, list[RequestResult]] = {}
    sweeps: dict[str, list[tuple[float, float | None]]] = {}
    for path in json_paths:
        run_meta, results, stats = load_run(path)
        name = run_name(run_meta, Path(path).stem)
        base, n = name, 2
        while name in measured:
            name, n = f"{base}#{n}", n + 1
        runs.append((name, stats))
        measured[name] = [r for r in results if stats.is_measured(r)]
        all_results[name] = results
        for target, points in (run_meta.get("sweep") or {}).items():
            sweeps.setdefault(str(target), []).extend((float(p[0]), p[1]) for p in points)
    print_summary(console, runs, target_pct=target_pct)
    written = {"cdf": plot_cdfs(measured, out / "cdf.png")}
    for name, results in all_results.items():
        written[f"timeseries:{name}"] = plot_timeseries(results, out / f"timeseries_{_file_stem(name)}.png")
    if sweeps:
        written["attainment"] = plot_attainment_vs_rate(sweeps, target_pct, out / "attainment.png")
    for key, path in written.items():
        console.print(f"[dim]{key}:[/dim] {path}")
    return written
