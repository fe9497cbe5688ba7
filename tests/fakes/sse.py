"""OpenAI-style SSE events as engines write them, and the client's side parsed back."""

from __future__ import annotations

import json
from typing import Any

from pdgate.common.sse import EventBuffer, event_data

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def completion_chunk(
    text: str,
    token_ids: list[int] | None,
    *,
    cid: str = "cmpl-src",
    created: int = 100,
    model: str = "m",
    finish: str | None = None,
) -> dict[str, Any]:
    """One ``/v1/completions`` stream chunk as vLLM writes it (``token_ids`` with ``return_token_ids``)."""
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "prompt_token_ids": None,
                "token_ids": token_ids,
            }
        ],
    }


def usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    out["prompt_tokens_details"] = {"cached_tokens": cached} if cached else None
    return out


def parse_sse(data: bytes) -> list[Any]:
    """Every event of an SSE body: its JSON ``data`` decoded, ``"[DONE]"`` as the string.

    A trailing incomplete event fails the parse: a client must never be left with half an event.
    """
    buffer = EventBuffer()
    events = buffer.feed(data)
    assert not buffer.rest.strip(), f"the stream ends inside an event: {buffer.rest[:200]!r}"
    out: list[Any] = []
    for raw in events:
        payload = event_data(raw)
        if payload is None:
            continue
        out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def chunks_of(events: list[Any]) -> list[dict[str, Any]]:
    """The JSON events (no ``[DONE]``)."""
    return [e for e in events if isinstance(e, dict)]


def text_of(events: list[Any]) -> str:
    """The answer's text as a client joins it (completion ``text`` or chat ``delta.content``)."""
    parts = []
    for chunk in chunks_of(events):
        for choice in chunk.get("choices") or []:
            if "text" in choice:
                parts.append(choice.get("text") or "")
            else:
                parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def usage_of(events: list[Any]) -> dict[str, Any] | None:
    """The last ``usage`` the stream carried (None: none did)."""
    found = [c["usage"] for c in chunks_of(events) if c.get("usage")]
    return found[-1] if found else None


def split_bytes(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into reads of ``size`` bytes (event boundaries ignored, as TCP does)."""
    return [data[i : i + size] for i in range(0, len(data), size)]
