"""Telling trace and dataset formats apart, from a file's content."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pdgate.common.jsonl import json_objects
from pdgate.loadgen.traces.base import TraceFormat, TraceFormatError


def detect_records(path: Path, records: list[tuple[str, dict[str, Any]]]) -> TraceFormat:
    """The format of JSON records ``(where, object)`` read from ``path``, from the first one's keys."""
    if not records:
        raise TraceFormatError(f"{path}: no records")
    keys = records[0][1].keys()
    if "hash_ids" in keys:
        return "mooncake"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    if "prompt" in keys or "messages" in keys:
        return "jsonl"
    raise TraceFormatError(
        f"{records[0][0]}: unknown record format (keys: {', '.join(sorted(keys))}); expected "
        "Mooncake hash_ids, ShareGPT conversations, alpaca instruction, or prompt/messages"
    )


def detect_format(path: str | Path) -> TraceFormat:
    """The format of a trace or dataset file, from its content."""
    path = Path(path)
    with path.open() as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(("[", "{")):  # a JSON array or JSONL: the first record is enough
        return detect_records(path, list(itertools.islice(json_objects(path, error=TraceFormatError), 1)))
    header = [h.strip().lower() for h in head.splitlines()[0].split(",")] if head else []
    if {"timestamp", "contexttokens", "generatedtokens"} <= set(header):
        return "azure"
    raise TraceFormatError(f"{path}: unknown format (not JSON/JSONL records nor an Azure CSV)")
