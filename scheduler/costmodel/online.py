"""Refitting the cost model from the gateway's completed-request log (run in a worker process)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from pdgate.common.json_codec import JsonError, json_decode
from pdgate.scheduler.costmodel.latency import LatencyModel

MIN_LENGTH_ROWS = 20  # fewer labelled requests than this: keep the previous output-length model


def refit(
    records: Sequence[Mapping[str, Any]],
    latency: LatencyModel,
    previous_output: Any,
    q_high: float,
    store_dir: str | None,
) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """Fit new latency and output-length models on ``records``; save them as a new version when
    ``store_dir`` is set. Returns ``(components, version, meta)``. Pure function of its inputs, so
    it can run in another process."""
    from pdgate.scheduler.costmodel.features import RequestFeatures
    from pdgate.scheduler.costmodel.output_length import OutputLengthModel

    started = time.time()
    new_latency = latency.refit(records)
    rows = [
        (RequestFeatures.from_record(r), int(r["output_tokens"]))
        for r in records
        if isinstance(r.get("output_tokens"), int) and r["output_tokens"] >= 1 and not r.get("length_fixed")
    ]
    output = previous_output
    if len(rows) >= MIN_LENGTH_ROWS:
        output = OutputLengthModel(q_high=q_high).fit([f for f, _ in rows], [n for _, n in rows])
    components = {"latency": new_latency, "output_length": output}
    meta = {
        "source": "online",
        "n_records": len(records),
        "n_length_rows": len(rows),
        "fit_seconds": round(time.time() - started, 3),
        "latency": new_latency.describe(),
    }
    version = None
    if store_dir is not None:
        from pdgate.scheduler.costmodel.store import ModelStore

        version = ModelStore(store_dir).save(components, meta)
    return components, version, meta


def refit_lines(
    lines: Sequence[bytes | str],
    latency: LatencyModel,
    previous_output: Any,
    q_high: float,
    store_dir: str | None,
) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """:func:`refit` on records given as JSON lines (the gateway's log and shared-stream form), parsed
    here, in the worker process; lines that are not a JSON object (a torn last line) are skipped."""
    records = []
    for line in lines:
        try:
            row = json_decode(line)
        except JsonError:
            continue
        if isinstance(row, dict):
            records.append(row)
    return refit(records, latency, previous_output, q_high, store_dir)
