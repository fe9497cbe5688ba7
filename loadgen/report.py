"""``pdgate bench report``: saved runs shown again, side by side (tables) and drawn (plots).

The pieces: :mod:`loadgen.runfile` (the run files), :mod:`loadgen.tables`, :mod:`loadgen.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from pdgate.loadgen.plots import plot_attainment_vs_rate, plot_cdfs, plot_timeseries
from pdgate.loadgen.runfile import file_stem, load_run, run_name
from pdgate.loadgen.stats import RunStats
from pdgate.loadgen.tables import print_summary
from pdgate.loadgen.types import RequestResult


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
        written[f"timeseries:{name}"] = plot_timeseries(results, out / f"timeseries_{file_stem(name)}.png")
    if sweeps:
        written["attainment"] = plot_attainment_vs_rate(sweeps, target_pct, out / "attainment.png")
    for key, path in written.items():
        console.print(f"[dim]{key}:[/dim] {path}")
    return written
