"""Saving and loading benchmark runs: one JSON (everything) and one CSV (a row per request).

A run's JSON (written by :func:`write_run`, read by :func:`load_run`)::

    {"schema": 1, "run_meta": {...as given...}, "environment": {...},
     "stats": RunStats.to_dict(), "results": [RequestResult.to_dict(), ...]}

``run_meta`` is the caller's full configuration; two keys have a meaning here: ``name`` (the run's
name in tables and file names) and ``sweep`` (``{target: [[rate, attainment], ...]}``,
attainment as a fraction, drawn by :func:`loadgen.report.render_report`).
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
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pdgate.common.jsonl import read_json
from pdgate.common.version import package_version
from pdgate.loadgen.stats import RunStats
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


def file_stem(name: str) -> str:
    """``name`` made safe as a file name."""
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
    stem = file_stem(stem or run_name(run_meta))
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
    doc = read_json(json_path)
    if not isinstance(doc, dict):
        raise ValueError(f"{json_path}: not a run file (expected a JSON object)")
    if doc.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{json_path}: unknown run schema {doc.get('schema')!r} (expected {SCHEMA_VERSION})")
    results = [RequestResult.from_dict(r) for r in doc["results"]]
    return doc["run_meta"], results, RunStats.from_dict(doc["stats"])
