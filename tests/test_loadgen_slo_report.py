"""SLO, goodput and report arithmetic on hand-made request timings (no server, no network).

Times are chosen to be exact in binary floating point so that inclusive limits can be checked
with ``==`` semantics.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from rich.console import Console

from pdgate.common.yamlfile import YamlFileError
from pdgate.loadgen.plots import plot_attainment_vs_rate, plot_cdfs, plot_timeseries
from pdgate.loadgen.report import render_report
from pdgate.loadgen.runfile import CSV_COLUMNS, load_run, write_run
from pdgate.loadgen.slo import Slo, SloSpec, meets, parse_seconds
from pdgate.loadgen.stats import Dist, RunStats, max_rate_meeting, summarize
from pdgate.loadgen.tables import print_summary, summary_table
from pdgate.loadgen.types import RequestResult

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def mk(
    index: int,
    scheduled: float,
    sent: float,
    first: float | None,
    end: float,
    out: int,
    *,
    chunks: list[float] | None = None,
    status: int = 200,
    error: str | None = None,
    cls: str = "default",
    prompt: int | None = None,
    cached: int | None = None,
) -> RequestResult:
    return RequestResult(
        index=index,
        target="t",
        slo_class=cls,
        scheduled_s=scheduled,
        sent_s=sent,
        end_s=end,
        first_token_s=first,
        chunk_times=list(chunks or []),
        output_tokens=out,
        prompt_tokens=prompt,
        cached_tokens=cached,
        status=status,
        error=error,
    )


SPEC = SloSpec.parse(["ttft=0.5,tpot=0.125", "class=chat:ttft=1"])


def scenario() -> list[RequestResult]:
    """A 10 s run, warm-up 2 s, cool-down 2 s: measured window [2, 8], 6 s long."""
    return [
        mk(0, 1.0, 1.0, 1.25, 2.0, 4),  # warm-up: excluded
        # ttft 0.25, tpot 0.375/3 = 0.125 (== limit): met
        mk(1, 2.0, 2.0, 2.25, 2.625, 4, chunks=[2.25, 2.375, 2.5, 2.625], prompt=100, cached=50),
        # 0.125 s late; ttft 0.5 (== limit), tpot 0.5/4 = 0.125: met
        mk(2, 4.0, 4.125, 4.625, 5.125, 5, chunks=[4.625, 4.75, 4.875, 5.0, 5.125], prompt=200),
        # ttft 1.0 > 0.5: missed; tpot 0.25
        mk(3, 6.0, 6.0, 7.0, 7.5, 3, chunks=[7.0, 7.25, 7.5], prompt=100, cached=0),
        # failed, scheduled on the window's end (included): missed
        mk(4, 8.0, 8.0, None, 8.0625, 0, status=500, error="HTTP 500"),
        # chat class: ttft 1.0 <= 1 (default's 0.5 would miss); one token -> tpot None: met
        mk(5, 7.0, 7.0, 8.0, 8.0, 1, chunks=[8.0], cls="chat", prompt=50, cached=25),
        mk(6, 9.0, 9.0, 9.25, 9.5, 2),  # cool-down: excluded
    ]


def run_stats() -> RunStats:
    return summarize(scenario(), SPEC, duration_s=10.0, warmup_s=2.0, cooldown_s=2.0)


# --------------------------------------------------------------------------- SLO definitions


def test_parse_cli_strings_and_class_inheritance() -> None:
    spec = SloSpec.parse(["ttft=500ms,tpot=50ms", "class=chat:ttft=1,tpot=0.1", "class=batch,e2e=30,tpot=none"])
    assert spec.default == Slo(ttft_s=0.5, tpot_s=0.05)
    assert spec.for_class("chat") == Slo(ttft_s=1.0, tpot_s=0.1)
    assert spec.for_class("batch") == Slo(ttft_s=0.5, tpot_s=None, e2e_s=30.0)  # ttft inherited
    assert spec.for_class("unknown") is spec.default
    assert SloSpec.parse("class=default:ttft=2").default == Slo(ttft_s=2.0)
    assert SPEC.for_class("chat") == Slo(ttft_s=1.0, tpot_s=0.125)
    assert parse_seconds("2s") == 2.0 and parse_seconds(0.25) == 0.25 and parse_seconds("inf") is None


@pytest.mark.parametrize("bad", ["ttft", "foo=1", "ttft=-1", "ttft=0", "ttft=abc", "class=:ttft=1"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        SloSpec.parse(bad)


def test_from_dict_forms_and_file(tmp_path: Path) -> None:
    nested = {"default": {"ttft": 0.5, "tpot": "50ms"}, "classes": {"chat": {"ttft_s": 1, "tpot": None}}}
    flat = {"default": {"ttft": 0.5, "tpot": 0.05}, "chat": {"ttft": 1, "tpot": None}}
    a, b = SloSpec.from_dict(nested), SloSpec.from_dict(flat)
    assert a == b
    assert a.for_class("chat") == Slo(ttft_s=1.0)  # explicit null removes the inherited tpot limit
    assert SloSpec.from_dict({"ttft": 0.5}).default == Slo(ttft_s=0.5)
    assert SloSpec.from_dict(a.to_dict()) == a
    assert SloSpec.from_dict(None) == SloSpec()
    path = tmp_path / "slo.yaml"
    path.write_text("default: {ttft: 0.5, tpot: 0.05}\nchat:\n  ttft: 1\n")
    assert SloSpec.load(path).for_class("chat") == Slo(ttft_s=1.0, tpot_s=0.05)
    (tmp_path / "slo.json").write_text(json.dumps(nested))
    assert SloSpec.load(tmp_path / "slo.json") == a
    with pytest.raises(ValueError):
        SloSpec.from_dict({"default": {"latency": 1}})


def test_a_bad_slo_file_is_one_clear_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# no limits yet\n")
    assert SloSpec.load(tmp_path / "empty.yaml") == SloSpec()
    cases = {
        "missing.yaml": (None, r"missing\.yaml: no such file"),
        "broken.yaml": ("default: {ttft: 0.5\n", r"broken\.yaml:2: not valid YAML"),
        "list.yaml": ("- ttft: 0.5\n", r"list\.yaml: expected a mapping of SLO limits at the top level, found a list"),
    }
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(YamlFileError, match=message):
            SloSpec.load(tmp_path / name)
    assert issubclass(YamlFileError, ValueError)  # what `pdgate bench` reports as a usage error


def test_meets_definition() -> None:
    slo = Slo(ttft_s=0.5, tpot_s=0.125, e2e_s=1.0)
    assert meets(mk(0, 0, 0, 0.5, 0.875, 4), slo)  # ttft == limit, tpot 0.375/3 == limit, e2e 0.875
    assert not meets(mk(0, 0, 0, 0.625, 0.875, 4), slo)  # ttft over
    assert not meets(mk(0, 0, 0, 0.25, 0.875, 3), slo)  # tpot 0.3125 over
    assert not meets(mk(0, 0, 0, 0.25, 1.25, 2), Slo(ttft_s=0.5, tpot_s=1.0, e2e_s=1.0))  # e2e over
    # one output token: tpot None satisfies any tpot limit
    one = mk(0, 0, 0, 0.25, 0.25, 1)
    assert one.tpot_s is None and meets(one, Slo(ttft_s=0.5, tpot_s=1e-9))
    # failures never meet, even with no limits
    assert not meets(mk(0, 0, 0, 0.25, 0.5, 4, status=500), Slo())
    assert not meets(mk(0, 0, 0, 0.25, 0.5, 4, error="reset"), Slo())
    assert not meets(mk(0, 0, 0, None, 0.5, 4, status=0, error="timeout"), Slo())
    # a success without any output token has no TTFT: it misses a TTFT limit, not a TPOT-only one
    empty = mk(0, 0, 0, None, 0.5, 0)
    assert not meets(empty, Slo(ttft_s=10)) and meets(empty, Slo(tpot_s=0.1))
    assert meets(mk(0, 0, 0, 5.0, 50.0, 10), Slo())  # no limits: success is enough


# --------------------------------------------------------------------------- summarize


def test_summarize_counts_attainment_goodput() -> None:
    s = run_stats()
    assert (s.window_s, s.excluded_warmup, s.excluded_cooldown) == (6.0, 1, 1)
    assert (s.total, s.ok, s.failed, s.met) == (5, 4, 1, 3)
    assert s.attainment == pytest.approx(3 / 5)  # the failed request counts as missed
    assert s.goodput_rps == pytest.approx(3 / 6)
    assert s.offered_rps == pytest.approx(5 / 6)
    assert s.request_rps == pytest.approx(4 / 6)
    assert s.output_tps == pytest.approx((4 + 5 + 3 + 1) / 6)
    assert s.input_tps == pytest.approx((100 + 200 + 100 + 50) / 6)
    assert s.cached_fraction == pytest.approx((50 + 0 + 25) / (100 + 100 + 50))  # only where reported


def test_summarize_percentiles() -> None:
    s = run_stats()
    # TTFT of the successful requests: 0.25, 0.5, 1.0, 1.0
    assert s.ttft.count == 4
    assert s.ttft.p50 == pytest.approx(0.75) and s.ttft.mean == pytest.approx(0.6875)
    assert (s.ttft.min, s.ttft.max, s.ttft.p90) == (0.25, 1.0, 1.0)
    # TPOT: 0.125, 0.125, 0.25 (the one-token request has none); linear interpolation
    assert s.tpot.count == 3
    assert s.tpot.p50 == pytest.approx(0.125)
    assert s.tpot.p90 == pytest.approx(0.125 + 0.8 * 0.125)
    assert s.tpot.p99 == pytest.approx(0.125 + 0.98 * 0.125)
    assert s.tpot.p999 == pytest.approx(0.125 + 0.998 * 0.125)
    # E2E: 0.625, 1.0, 1.5, 1.0
    assert s.e2e.p50 == pytest.approx(1.0) and s.e2e.mean == pytest.approx(4.125 / 4)
    # ITL: seven gaps of 0.125 and two of 0.25
    assert s.itl.count == 9 and s.itl.p50 == pytest.approx(0.125) and s.itl.p99 == pytest.approx(0.25)
    # lateness over every measured request, failed included
    assert s.lateness.count == 5 and s.lateness.max == 0.125 and s.lateness.mean == pytest.approx(0.025)


def test_summarize_per_class() -> None:
    s = run_stats()
    assert set(s.classes) == {"default", "chat"}
    d, c = s.classes["default"], s.classes["chat"]
    assert (d.total, d.met, d.failed, d.attainment) == (4, 2, 1, 0.5)
    assert (c.total, c.met, c.attainment) == (1, 1, 1.0)
    assert d.goodput_rps == pytest.approx(2 / 6) and c.goodput_rps == pytest.approx(1 / 6)
    assert c.tpot.count == 0 and c.tpot.p50 is None
    assert s.slo_spec["classes"]["chat"]["ttft_s"] == 1.0


def test_warmup_cooldown_boundaries() -> None:
    results = [mk(i, t, t, t + 0.25, t + 0.5, 2) for i, t in enumerate([0.0, 1.0, 1.5, 4.0, 4.5, 5.0])]
    s = summarize(results, SloSpec(), duration_s=5.0, warmup_s=1.0, cooldown_s=1.0)
    # [0, 1) warm-up; [1, 4] measured; (4, 5] cool-down
    assert (s.excluded_warmup, s.total, s.excluded_cooldown) == (1, 3, 2)
    assert s.goodput_rps == pytest.approx(3 / 3)
    no_margins = summarize(results, SloSpec(), duration_s=5.0)
    assert (no_margins.total, no_margins.window_s) == (6, 5.0)


def test_summarize_empty_and_invalid() -> None:
    s = summarize([], SloSpec(), duration_s=5.0)
    assert (s.total, s.met, s.attainment, s.goodput_rps, s.cached_fraction) == (0, 0, None, 0.0, None)
    assert s.ttft == Dist() and s.classes == {}
    json.dumps(s.to_dict())
    only_failed = summarize([mk(0, 0.0, 0.0, None, 1.0, 0, status=503)], SPEC, duration_s=5.0)
    assert (only_failed.attainment, only_failed.ttft.p99, only_failed.lateness.count) == (0.0, None, 1)
    with pytest.raises(ValueError):
        summarize([], SloSpec(), duration_s=2.0, warmup_s=1.0, cooldown_s=1.0)


def test_run_stats_round_trip() -> None:
    s = run_stats()
    again = RunStats.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s
    assert isinstance(again.classes["chat"].ttft, Dist)
    assert again.slo == SPEC


def test_max_rate_meeting() -> None:
    points = [(4.0, 0.92), (1.0, 0.99), (2.0, 0.95), (3.0, 0.85)]
    assert max_rate_meeting(points, 0.9) == 2.0  # 4 req/s meets again but 3 already missed
    assert max_rate_meeting([(1.0, 0.5)], 0.9) is None
    assert max_rate_meeting([], 0.9) is None


# --------------------------------------------------------------------------- report


def test_write_and_load_run(tmp_path: Path) -> None:
    results, stats = scenario(), run_stats()
    meta = {"name": "sim a/b", "target": "http://127.0.0.1:1", "rate": 2.0, "workload": Path("w.jsonl")}
    paths = write_run(tmp_path / "out", meta, results, stats)
    assert paths["json"].name == "sim_a_b.json" and paths["csv"].name == "sim_a_b.csv"
    doc = json.loads(paths["json"].read_text())
    assert {"python", "platform", "hostname", "pdgate_version", "time_utc"} <= set(doc["environment"])
    run_meta, loaded, loaded_stats = load_run(paths["json"])
    assert run_meta == {**meta, "workload": "w.jsonl"}
    assert loaded == results
    assert loaded_stats == stats


def test_csv_columns(tmp_path: Path) -> None:
    paths = write_run(tmp_path, {"name": "r"}, scenario(), run_stats())
    with paths["csv"].open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    body = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    assert [r["index"] for r in body] == [str(i) for i in range(7)]
    assert [r["met_slo"] for r in body] == ["0", "1", "1", "0", "0", "1", "0"]  # 0 and 6: tpot 0.25
    failed = body[4]
    assert (failed["status"], failed["error"], failed["ttft_s"], failed["tpot_s"]) == ("500", "HTTP 500", "", "")
    assert float(body[1]["ttft_s"]) == 0.25 and float(body[1]["tpot_s"]) == 0.125
    assert (body[5]["slo_class"], body[5]["tpot_s"], body[5]["cached_tokens"]) == ("chat", "", "25")


def test_summary_table_renders_numbers() -> None:
    base = run_stats()
    other = summarize([mk(0, 3.0, 3.0, 3.125, 3.5, 4)], SPEC, duration_s=10.0, warmup_s=2.0, cooldown_s=2.0)
    table = summary_table([("sim", base), ("vllm", other)])
    assert len(table.columns) == 3
    console = Console(record=True, width=200)
    print_summary(console, [("sim", base), ("vllm", other)], target_pct=90)
    text = console.export_text()
    for expected in (
        "sim",
        "vllm",
        "60.0%",
        "100.0%",
        "0.50",
        "750.0",
        "125.0",
        "1000.0",
        "250.0",
        "30.0%",
        "per SLO class",
        "chat",
        "ttft<=1s tpot<=125ms",
    ):
        assert expected in text, expected


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plots(tmp_path: Path) -> None:
    results = scenario()
    _assert_png(
        plot_attainment_vs_rate({"sim": [(1, 1.0), (2, 0.95), (4, 0.6)], "vllm": [(1, 0.8)]}, 90, tmp_path / "att.png")
    )
    _assert_png(plot_cdfs({"a": results, "b": results[:3]}, tmp_path / "cdf.png"))
    _assert_png(plot_timeseries(results, tmp_path / "ts.png", bin_s=0.5))
    # empty inputs draw "no data" instead of failing
    _assert_png(plot_attainment_vs_rate({}, 90, tmp_path / "att0.png"))
    _assert_png(plot_cdfs({"a": []}, tmp_path / "cdf0.png"))
    _assert_png(plot_timeseries([], tmp_path / "sub" / "ts0.png"))


def test_render_report(tmp_path: Path) -> None:
    stats = run_stats()
    a = write_run(tmp_path, {"name": "sim", "sweep": {"sim": [[1, 1.0], [2, 0.6]]}}, scenario(), stats)["json"]
    b = write_run(tmp_path, {"target": "vllm"}, scenario()[:4], stats)["json"]
    console = Console(record=True, width=200)
    written = render_report([a, b], tmp_path / "report", console)
    assert set(written) == {"cdf", "timeseries:sim", "timeseries:vllm", "attainment"}
    for path in written.values():
        _assert_png(path)
    text = console.export_text()
    assert "sim" in text and "vllm" in text and "60.0%" in text
