"""What ``pdgate cost-model``'s commands share: the usage error, the data-file flags and reader,
the output-length and latency metrics of a predictor on rows, and JSON printing."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """A problem with the inputs, reported as one line and exit status 2."""


def tokenizer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer",
        default="builtin",
        help="'builtin' (the sim's) or a local Hugging Face tokenizer directory (counts text tokens)",
    )
    parser.add_argument(
        "--endpoint",
        choices=["chat", "completion"],
        default="chat",
        help="how alpaca-style rows are sent (default chat: one user message)",
    )


def read_rows(args: argparse.Namespace, paths: Sequence[str] | None = None) -> list[Any]:
    from pdgate.common.tokenizer import load_tokenizer
    from pdgate.scheduler.costmodel.datasets import read_dataset

    paths = args.data if paths is None else paths

    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (OSError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--tokenizer {args.tokenizer}: {exc}") from None
    rows = []
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"no such file: {path}")
        try:
            rows += read_dataset(path, tokenizer, endpoint_default=args.endpoint)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc}") from None
    if not rows:
        raise UsageError(f"no usable rows in {', '.join(paths)}")
    return rows


def length_metrics(model: Any, baselines: dict[str, Any], rows: Sequence[Any]) -> dict[str, Any]:
    import numpy as np

    from pdgate.scheduler.costmodel.length_evaluation import Predictions, length_report

    features = [r.features for r in rows]
    actual = np.array([r.output_tokens for r in rows], dtype=float)
    models = [f.model for f in features]
    q_high = float(getattr(model, "q_high", 0.9))

    def score(predictor: Any) -> dict[str, Any]:
        median, high = predictor.predict_many(features)
        return length_report(Predictions(np.arange(len(rows)), median, high, actual, models), q_high)

    return {"model": score(model), "baselines": {name: score(b) for name, b in baselines.items()}}


def latency_metrics(latency: Any, records: list[dict[str, Any]]) -> Any:
    evaluate = getattr(latency, "evaluate", None)
    if not callable(evaluate) or not records:
        return None
    return evaluate(records)


def timing_records(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [r.record for r in rows if isinstance(r.record.get("timing"), dict)]


def progress(message: str) -> None:
    print(f"pdgate cost-model: {message}", file=sys.stderr, flush=True)


def rounded(value: Any) -> Any:
    """Floats to 4 decimals for printing."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def json_default(value: Any) -> Any:
    """numpy scalars and arrays (e.g. in a latency component's metrics) as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout, floats to 4 decimals, numpy values as plain ones."""
    print(json.dumps(rounded(value), indent=2, default=json_default))


def run_reporting(command: str, work: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run ``pdgate cost-model COMMAND``: its report as JSON and exit 0, or a usage error as one
    line on stderr and exit 2."""
    try:
        report = work(args)
    except UsageError as exc:
        print(f"pdgate cost-model {command}: {exc}", file=sys.stderr)
        return 2
    print_json(report)
    return 0
