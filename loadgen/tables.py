"""The comparison tables of benchmark runs (rich): one column per run, and one row per SLO class."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

from pdgate.loadgen.stats import GroupStats, RunStats


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
