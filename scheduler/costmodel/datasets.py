"""Labelled requests for training and evaluating the cost model, from three kinds of file.

Every row of a file is classified on its own (so files may mix kinds):

1. *gateway log* (JSONL): ``{"kind": "pdgate-request", "v": 1, ...}`` rows written by the gateway
   for completed requests. Features come from the row (``prompt_tokens``, ``max_tokens``,
   ``endpoint``, ``model``, ``tag``, ``text_hash``); no text is re-hashed. Rows whose
   ``output_tokens`` is missing, null or < 1 (failed or aborted requests) are skipped.
2. *generic* (JSONL or a JSON array): ``{"prompt": str | [token ids] | "messages": [...],
   "output": str | "output_tokens": int, "model"?, "max_tokens"?, "tag"?, "endpoint"?}``. A
   ``prompt`` is a completion request and ``messages`` a chat request unless ``endpoint`` says
   otherwise; an explicit ``prompt_tokens`` overrides the tokenizer's count.
3. *alpaca* (a JSON array or JSONL): ``{"instruction", "output", "input"?, "generator"?}``, as
   in alpaca_eval's ``model_outputs.json``: one user message (``instruction``, plus a blank line
   and ``input`` when that is non-empty) sent to ``endpoint_default`` (chat by default; as a
   completion the prompt is the plain text); ``generator`` is the model name.

Text is tokenised with the given tokenizer (chat prompts through its chat template, as the
engine counts them) and hashed with :func:`~scheduler.costmodel.features.hash_text`. Rows with
an empty output (0 tokens) are skipped like failed gateway requests. Anything else malformed is
a ``ValueError`` naming the file and line (JSONL) or record (JSON array).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from pdgate.common.jsonl import json_objects
from pdgate.common.tokenizer import Tokenizer
from pdgate.scheduler.costmodel.cues import request_cues
from pdgate.scheduler.costmodel.features import (
    ENDPOINTS,
    RequestFeatures,
    chat_text,
    hash_text,
    parse_cues,
    parse_prompt_digest,
    parse_text_hash,
    prompt_digest,
)

GATEWAY_LOG_KIND = "pdgate-request"
_PROMPT_CACHE_SIZE = 100_000


@dataclass(frozen=True)
class LabeledRequest:
    """One request's features, its observed output tokens and the parsed source row."""

    features: RequestFeatures
    output_tokens: int
    record: dict[str, Any]


class _RowError(ValueError):
    """A malformed row; the caller adds where it is."""


def read_dataset(path: str | Path, tokenizer: Tokenizer, *, endpoint_default: str = "chat") -> list[LabeledRequest]:
    """Every usable row of ``path`` (format detected per row, see the module docstring).

    ``FileNotFoundError`` when the file is missing; ``ValueError`` naming the file and line or
    record for invalid JSON, an unknown row format or a malformed row.
    """
    if endpoint_default not in ENDPOINTS:
        raise ValueError(f"endpoint_default must be one of {', '.join(ENDPOINTS)}")
    path = Path(path)
    reader = _RowReader(tokenizer, endpoint_default)
    out: list[LabeledRequest] = []
    for where, raw in json_objects(path):
        try:
            row = reader.read(raw)
        except _RowError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if row is not None:
            out.append(row)
    return out


def read_datasets(
    paths: Sequence[str | Path], tokenizer: Tokenizer, *, endpoint_default: str = "chat"
) -> list[LabeledRequest]:
    """:func:`read_dataset` of every path, concatenated in order."""
    rows: list[LabeledRequest] = []
    for path in paths:
        rows += read_dataset(path, tokenizer, endpoint_default=endpoint_default)
    return rows


class _RowReader:
    """Turns one parsed row into a :class:`LabeledRequest` (or ``None`` for a skipped row).

    Caches prompt token counts and hashes per text: alpaca_eval repeats each prompt for every
    model that answered it.
    """

    def __init__(self, tokenizer: Tokenizer, endpoint_default: str) -> None:
        self.tokenizer = tokenizer
        self.endpoint_default = endpoint_default
        self._prompts: dict[tuple[str, str], tuple[int, dict[int, float], tuple[float, ...], int]] = {}

    def read(self, raw: dict[str, Any]) -> LabeledRequest | None:
        if raw.get("kind") == GATEWAY_LOG_KIND:
            return self._gateway(raw)
        if "prompt" in raw or "messages" in raw:
            return self._generic(raw)
        if "instruction" in raw:
            return self._alpaca(raw)
        keys = ", ".join(sorted(raw)) or "none"
        raise _RowError(
            f"unknown row format (keys: {keys}); expected a pdgate-request log row, "
            "prompt/messages with output/output_tokens, or alpaca instruction/output"
        )

    def _gateway(self, raw: dict[str, Any]) -> LabeledRequest | None:
        if raw.get("v") != 1:
            raise _RowError(f"unsupported pdgate-request log version {raw.get('v')!r} (expected 1)")
        output = raw.get("output_tokens")
        if output is None or (_is_int(output) and output < 1):
            return None
        if not _is_int(output):
            raise _RowError("output_tokens must be an integer or null")
        try:
            features = RequestFeatures(
                _int_field(raw, "prompt_tokens"),
                _max_tokens(raw),
                _endpoint(raw.get("endpoint")),
                _str_field(raw, "model"),
                _tag(raw),
                parse_text_hash(raw.get("text_hash") or []),
                cues=parse_cues(raw.get("cues")),
                prompt_digest=parse_prompt_digest(raw.get("prompt_digest")),
            )
        except ValueError as exc:
            raise _RowError(str(exc)) from None
        return LabeledRequest(features, output, raw)

    def _generic(self, raw: dict[str, Any]) -> LabeledRequest | None:
        output = self._output_tokens(raw)
        if output < 1:
            return None
        model = raw.get("model", "")
        if not isinstance(model, str):
            raise _RowError("model must be a string")
        if "prompt" in raw:
            prompt = raw["prompt"]
            endpoint = _endpoint(raw.get("endpoint", "completion"))
            if isinstance(prompt, str):
                tokens, text_hash, cues, digest = self._prompt(prompt, None)
            elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
                tokens, text_hash, cues, digest = len(prompt), {}, (), None
            else:
                raise _RowError("prompt must be a string or a list of token ids")
        else:
            messages = raw["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise _RowError("messages must be a list of {role, content} objects")
            endpoint = _endpoint(raw.get("endpoint", "chat"))
            tokens, text_hash, cues, digest = self._messages(messages)
        if "prompt_tokens" in raw:
            tokens = _int_field(raw, "prompt_tokens")
        features = RequestFeatures(
            tokens, _max_tokens(raw), endpoint, model, _tag(raw), text_hash, cues=cues, prompt_digest=digest
        )
        return LabeledRequest(features, output, raw)

    def _alpaca(self, raw: dict[str, Any]) -> LabeledRequest | None:
        instruction, extra = raw["instruction"], raw.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise _RowError("instruction and input must be strings")
        output = self._output_tokens(raw)
        if output < 1:
            return None
        text = f"{instruction}\n\n{extra}" if extra else instruction
        model = raw.get("generator", raw.get("model", ""))
        if not isinstance(model, str):
            raise _RowError("generator must be a string")
        if self.endpoint_default == "chat":
            tokens, text_hash, cues, digest = self._messages([{"role": "user", "content": text}])
        else:
            tokens, text_hash, cues, digest = self._prompt(text, None)
        features = RequestFeatures(
            tokens,
            _max_tokens(raw),
            self.endpoint_default,
            model,
            _tag(raw),
            text_hash,
            cues=cues,
            prompt_digest=digest,
        )
        return LabeledRequest(features, output, raw)

    def _output_tokens(self, raw: dict[str, Any]) -> int:
        if "output_tokens" in raw:
            value = raw["output_tokens"]
            if not _is_int(value) or value < 0:
                raise _RowError("output_tokens must be a non-negative integer")
            return value
        if "output" in raw:
            if not isinstance(raw["output"], str):
                raise _RowError("output must be a string")
            return len(self.tokenizer.encode(raw["output"], add_special_tokens=False))
        raise _RowError("no output or output_tokens")

    def _prompt(
        self, text: str, rendered: str | None, messages: list[dict[str, Any]] | None = None
    ) -> tuple[int, dict[int, float], tuple[float, ...], int]:
        """Token count of ``rendered`` (or ``text``), the hash, cues (with ``messages``) and digest
        of ``text``, cached."""
        key = (text, rendered or "")
        cached = self._prompts.get(key)
        if cached is None:
            tokens = len(self.tokenizer.encode(rendered if rendered is not None else text, add_special_tokens=False))
            cached = (tokens, hash_text(text), request_cues(text, messages), prompt_digest(text))
            if len(self._prompts) >= _PROMPT_CACHE_SIZE:  # bounded: logs of unique prompts gain nothing from it
                self._prompts.clear()
            self._prompts[key] = cached
        return cached

    def _messages(self, messages: list[dict[str, Any]]) -> tuple[int, dict[int, float], tuple[float, ...], int]:
        try:
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            text = chat_text(messages)
        except (KeyError, TypeError, ValueError) as exc:
            raise _RowError(f"bad messages: {exc}") from None
        return self._prompt(text, rendered, messages)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key)
    if not _is_int(value) or value < 0:
        raise _RowError(f"{key} must be a non-negative integer")
    return value


def _str_field(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str):
        raise _RowError(f"{key} must be a string")
    return value


def _max_tokens(raw: dict[str, Any]) -> int | None:
    value = raw.get("max_tokens")
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise _RowError("max_tokens must be a positive integer or null")
    return value


def _tag(raw: dict[str, Any]) -> str | None:
    value = raw.get("tag")
    if value is None or isinstance(value, str):
        return value
    raise _RowError("tag must be a string or null")


def _endpoint(value: Any) -> str:
    if value not in ENDPOINTS:
        raise _RowError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
    return str(value)


# --- held-out split ---------------------------------------------------------------------------


def prompt_key(row: LabeledRequest) -> str | None:
    """What makes two rows "the same prompt" for :func:`split_holdout`.

    Alpaca rows: the instruction (alpaca_eval asks every model the same 805 instructions);
    generic rows: the prompt text or the chat text of the messages; gateway rows: the logged
    ``prompt_text`` when present, else the text hash; ``None`` for a row without any text
    (:func:`split_holdout` makes each such row its own group).
    """
    record = row.record
    instruction = record.get("instruction")
    if isinstance(instruction, str) and "prompt" not in record and "messages" not in record:
        return "i:" + instruction
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return "t:" + prompt
    if isinstance(record.get("messages"), list):
        try:
            return "t:" + chat_text(record["messages"])
        except (AttributeError, TypeError, ValueError):
            pass
    prompt_text = record.get("prompt_text")
    if isinstance(prompt_text, str):
        return "t:" + prompt_text
    if row.features.text_hash:
        return "h:" + json.dumps(sorted((i, round(v, 9)) for i, v in row.features.text_hash.items()))
    return None


def sample_rows(rows: Sequence[LabeledRequest], limit: int | None, seed: int = 0) -> list[LabeledRequest]:
    """At most ``limit`` of ``rows`` (all of them when ``limit`` is ``None``): a seeded random
    sample, kept in the rows' order."""
    if limit is None or len(rows) <= limit:
        return list(rows)
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
    return [rows[i] for i in keep.tolist()]


def split_holdout(
    rows: Sequence[LabeledRequest], fraction: float = 0.2, seed: int = 0
) -> tuple[list[LabeledRequest], list[LabeledRequest]]:
    """``(train, test)``: about ``fraction`` of the distinct prompts (:func:`prompt_key`), with
    every row of a prompt on the same side.

    Deterministic for the same rows, ``fraction`` and ``seed`` (prompts are ordered by a CRC of
    their key, not by Python's per-process ``hash``). With at least two prompts and
    ``0 < fraction < 1`` both sides get at least one prompt. Row order is kept on each side.
    """
    if not 0 <= fraction < 1:
        raise ValueError("fraction must be in [0, 1)")
    keys = [prompt_key(row) or f"r:{index}" for index, row in enumerate(rows)]
    unique = sorted(set(keys), key=lambda k: (zlib.crc32(k.encode("utf-8", "surrogatepass")), k))
    if fraction == 0 or len(unique) < 2:
        return list(rows), []
    order = np.random.default_rng(seed).permutation(len(unique))
    n_test = min(max(1, round(fraction * len(unique))), len(unique) - 1)
    test_keys = {unique[i] for i in order[:n_test]}
    train = [row for row, k in zip(rows, keys) if k not in test_keys]
    test = [row for row, k in zip(rows, keys) if k in test_keys]
    return train, test
