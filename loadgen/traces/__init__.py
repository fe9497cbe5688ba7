"""Replaying public traces and prompt datasets as lists of :class:`~loadgen.types.BenchRequest`.

Readers (each returns requests indexed ``0..n-1``):

* :func:`read_mooncake`: Mooncake JSONL (``timestamp`` ms, ``input_length``, ``output_length``,
  ``hash_ids``: one id per ``block_tokens``-token block, the last one possibly partial). The prompt
  is the concatenation of :meth:`PromptBuilder.block_text` of its ids, so requests share exactly
  the leading token blocks whose ids they share and differ right after, and the prompt has exactly
  ``input_length`` tokens (times ``scale``, see below).
* :func:`read_azure`: the Azure LLM inference CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``);
  random prompts of ``ContextTokens`` tokens, no sharing.
* :func:`read_dataset`: prompt datasets (alpaca JSON, ShareGPT JSON, generic JSONL), format detected
  from the records; real prompt text, ``max_tokens`` from the tokenized reference output.
* :func:`read_trace`: any of them, the format detected from the file (:func:`detect_format`).
* :func:`block_sharing`, :func:`trace_sharing`: the prefix-sharing structure of a workload.

Common options: ``offset`` skips that many records of the file, the length filters
(``min/max_input_tokens``, ``min/max_output_tokens``, on the lengths actually sent) drop requests,
then ``limit`` keeps the first ``limit`` remaining. Traces with timestamps set ``arrival_s``: seconds
after the earliest kept request, divided by ``speedup`` (requests are put in timestamp order; the
runner's ``trace`` arrivals apply their own speedup on top). ``max_tokens`` is the trace's output
length (at least 1) and ``extra`` is ``{"ignore_eos": True}`` unless ``ignore_eos=False``.
``prompt_tokens`` follows :mod:`loadgen.workloads`: the prompt text's tokens for completions, the
rendered chat template's for chat. Errors in a file name its line (or record, in a JSON array).

One module per format (:mod:`.mooncake`, :mod:`.azure`, :mod:`.datasets`), the shared options and
request building in :mod:`.base`, format detection in :mod:`.formats`, sharing in :mod:`.sharing`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.traces.azure import parse_timestamp, read_azure
from pdgate.loadgen.traces.base import Selection, TraceFormat, TraceFormatError
from pdgate.loadgen.traces.datasets import read_dataset
from pdgate.loadgen.traces.formats import detect_format
from pdgate.loadgen.traces.mooncake import MooncakeRecord, mooncake_lengths, parse_mooncake, read_mooncake
from pdgate.loadgen.traces.sharing import SharingStats, block_sharing, prompt_ids, trace_sharing
from pdgate.loadgen.types import BenchRequest

__all__ = [
    "MooncakeRecord",
    "Selection",
    "SharingStats",
    "TraceFormat",
    "TraceFormatError",
    "block_sharing",
    "detect_format",
    "mooncake_lengths",
    "parse_mooncake",
    "parse_timestamp",
    "prompt_ids",
    "read_azure",
    "read_dataset",
    "read_mooncake",
    "read_trace",
    "trace_sharing",
]


def read_trace(
    path: str | Path, builder: PromptBuilder, fmt: TraceFormat | Literal["auto"] = "auto", **options: Any
) -> list[BenchRequest]:
    """Any supported file: the format detected unless given; ``options`` go to the reader."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    reader: Callable[..., list[BenchRequest]]
    if fmt == "mooncake":
        reader = read_mooncake
    elif fmt == "azure":
        reader = read_azure
    else:
        return read_dataset(path, builder, fmt=fmt, **options)
    return reader(path, builder, **options)
