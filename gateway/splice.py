"""One client stream over several engine streams: what the client was sent, and the splice.

A streamed answer that may move (migration, failover) is relayed event by event instead of
read by read: :class:`StreamTrail` forwards only complete SSE events (a stream cut mid-event
never leaves half an event with the client) and records the token ids of every event sent,
which the gateway asks the engine for (``return_token_ids``) and removes again when the client
did not ask for them. The token ids are what a continuation starts from: the prompt plus every
token the client has, sent to another instance as a ``/v1/completions`` prompt of token ids.

:class:`Splice` turns the continuation's events back into the client's stream: the first
engine's ``id``/``created``/``model``, the client's format (completion or chat chunks), and
``usage`` counted over the whole answer (the original prompt; every output token, before and
after the move).

Events are cut by :mod:`pdgate.common.sse`, so an engine may end its lines with LF, CRLF or CR:
the trail forwards what it cuts as it came; the splice writes its events with LF.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pdgate.common import sse
from pdgate.common.sse import complete_length

_TOKEN_IDS = re.compile(rb'"token_ids"\s*:\s*\[([0-9,\s]*)\]')
_NULL_IDS = b'"token_ids":null'  # what replaces each match of _TOKEN_IDS (not "prompt_token_ids": a quote must precede)
_PROMPT_IDS_VALUE = re.compile(rb'"prompt_token_ids"\s*:\s*\[[0-9,\s]*\]')
_TEXT = re.compile(rb'"(?:text|content)"\s*:\s*"[^"]')  # a non-empty piece of output text
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')
_DONE = b"data: [DONE]"
_EVENT_END = sse.EVENT_END
_CR = 0x0D

# Body fields a continuation keeps: sampling and output controls that mean the same on /v1/completions.
CONTINUATION_FIELDS = (
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "priority",
    "logit_bias",
    "bad_words",
    "allowed_token_ids",
    "user",
    "vllm_xargs",
)
# Request features a continuation cannot reproduce: such requests stay where they are.
_PINNED_FIELDS = {
    "n": lambda v: v not in (None, 1),
    "best_of": lambda v: v not in (None, 1),
    "echo": bool,
    "logprobs": lambda v: v not in (None, False),
    "top_logprobs": lambda v: bool(v),
    "prompt_logprobs": lambda v: v is not None,
    "tools": bool,
    "functions": bool,
    "response_format": lambda v: bool(v) and v.get("type") not in (None, "text"),
    "guided_json": lambda v: v is not None,
    "guided_regex": lambda v: v is not None,
    "guided_choice": lambda v: v is not None,
    "guided_grammar": lambda v: v is not None,
    "structured_outputs": lambda v: v is not None,
    "use_beam_search": bool,
    "return_tokens_as_token_ids": bool,
}


def pinned_reason(body: Mapping[str, Any], stream: bool) -> str | None:
    """Why this request cannot continue on another instance (None: it can)."""
    if not stream:
        return "not streamed"
    if _PINNED_FIELDS.keys().isdisjoint(body):  # the usual body: none of those fields at all
        return None
    for name, pinned in _PINNED_FIELDS.items():
        value = body.get(name)
        if value is not None and pinned(value):
            return f"uses {name}"
    return None


def wants_token_ids(body: Mapping[str, Any]) -> bool:
    return bool(body.get("return_token_ids"))


def continuation_body(
    body: Mapping[str, Any], prompt_ids: list[int], generated: list[int], max_tokens: int
) -> dict[str, Any]:
    """The ``/v1/completions`` body that continues ``body`` after the ``generated`` tokens."""
    out = {k: body[k] for k in CONTINUATION_FIELDS if k in body}
    options = body.get("stream_options") or {}
    out.update(
        prompt=[*prompt_ids, *generated],
        max_tokens=max_tokens - len(generated),
        stream=True,
        return_token_ids=True,
        stream_options={k: options[k] for k in ("include_usage", "continuous_usage_stats") if options.get(k)} or None,
    )
    if out["stream_options"] is None:
        del out["stream_options"]
    min_tokens = body.get("min_tokens")
    if min_tokens:
        out["min_tokens"] = max(0, int(min_tokens) - len(generated))
    return out


def complete_events(partial: bytes, data: bytes) -> tuple[bytes, bytes]:
    """Split what came so far (``partial`` + ``data``) into its complete SSE events, as they came,
    and the incomplete rest."""
    if partial:
        data = partial + data
    cut = complete_length(data)
    if not cut:
        return b"", data
    return data[:cut], data[cut:]


class StreamTrail:
    """The client's side of one streamed answer: complete events only, and the token ids sent.

    ``feed`` takes bytes as read from the engine and returns the complete events among them,
    ready for the client; an incomplete last event waits for the next read (or is dropped when
    the stream is cut). ``tracked`` turns false when an event carried no token ids where one
    should have: such an answer cannot be continued exactly.
    """

    __slots__ = ("_finished", "_ids", "_raw", "done", "identity", "partial", "strip", "tracked", "usage_sent")

    def __init__(self, *, strip_ids: bool) -> None:
        self._ids: list[int] = []
        self._raw: list[bytes] = []  # ids as they came ("1,2,3"), parsed when first needed
        self.partial = b""
        self._finished = False
        self.usage_sent = False  # the usage chunk went out after the finish reason
        self.done = False  # [DONE] went out
        self.identity: dict[str, Any] | None = None  # id, created, model, object of the first event
        self.strip = strip_ids
        self.tracked = True

    @property
    def finished(self) -> bool:
        """A finish_reason went out (set back to False when the answer goes on elsewhere after
        all: then its usage chunk, if one went out too, is no longer the client's last word)."""
        return self._finished

    @finished.setter
    def finished(self, value: bool) -> None:
        self._finished = value
        if not value:
            self.usage_sent = False

    @property
    def token_ids(self) -> list[int]:
        """The token ids the client has, in order (a list the caller may extend or truncate)."""
        if self._raw:
            joined = b",".join([ids for ids in self._raw if ids.strip()])
            if joined:
                self._ids.extend(map(int, joined.split(b",")))
            self._raw.clear()
        return self._ids

    # Every relayed event is looked at here, so this makes as few passes over it as it can: one
    # regex pass both finds the token ids and strips them, a flag once set is not looked for again,
    # and literals are found with ``bytes.rfind`` (``in`` takes about twice as long on this Python).

    def feed(self, data: bytes) -> bytes:
        if self.partial:
            data = self.partial + data
        if data.endswith(_EVENT_END) and _CR not in data:  # the usual read: whole LF-framed events
            out, self.partial = data, b""
        else:
            cut = complete_length(data)
            if not cut:
                self.partial = data
                return b""
            out, self.partial = data[:cut], data[cut:]
        if self.identity is None:
            self.identity = _identity(out)
        if self.strip:
            pieces = _TOKEN_IDS.split(out)  # text, ids, text, ids, ..., text
            found = pieces[1::2]
            if found:
                out = _NULL_IDS.join(pieces[::2])
        else:
            found = _TOKEN_IDS.findall(out)
        if found:
            self._raw.extend(found)
        elif self.tracked and _TEXT.search(out) is not None:
            self.tracked = False  # output without token ids: this engine does not report them
        if not self._finished and _FINISHED.search(out) is not None:
            self._finished = True
        if self._finished and not self.usage_sent and out.rfind(b'"usage"') >= 0:  # (only once finished)
            self.usage_sent = _has_usage_chunk(out)
        if not self.done and out.rfind(b"[DONE]") >= 0:  # (usually the last event; text may hold it too)
            self.done = _ends_the_stream(out)
        if self.strip and (out.rfind(b'"prompt_token_ids":[') >= 0 or out.rfind(b'"prompt_token_ids": [') >= 0):
            out = _PROMPT_IDS_VALUE.sub(b'"prompt_token_ids":null', out)
        return out


def _ends_the_stream(events: bytes) -> bool:
    """Whether one of ``events`` (whole SSE events) is the stream's end: its data ``[DONE]``
    (not a token's text that reads ``data: [DONE]``, which JSON carries unescaped)."""
    for event in sse.split_events(events)[0]:
        data = sse.event_data(event)
        if data is not None and data.strip() == b"[DONE]":
            return True
    return False


def _event_objects(events: bytes) -> Iterator[Any]:
    """The JSON value of each of ``events`` (whole SSE events) whose data is an object; None for
    one that is not valid JSON."""
    for event in sse.split_events(events)[0]:
        data = sse.event_data(event)
        if data is None or not data.lstrip().startswith(b"{"):
            continue
        try:
            yield json.loads(data)
        except (ValueError, UnicodeDecodeError):
            yield None


def _has_usage_chunk(events: bytes) -> bool:
    """Whether one of ``events`` (whole SSE events) is the usage chunk: no choices, a usage."""
    return any(isinstance(chunk, dict) and _is_usage_chunk(chunk) for chunk in _event_objects(events))


def _is_usage_chunk(chunk: dict[str, Any]) -> bool:
    return not chunk.get("choices") and isinstance(chunk.get("usage"), dict)


def _identity(events: bytes) -> dict[str, Any] | None:
    """``id``, ``created``, ``model`` and ``object`` of the first JSON object among ``events``."""
    for first in _event_objects(events):
        if not isinstance(first, dict):
            return None
        return {k: first.get(k) for k in ("id", "created", "model", "object")}
    return None


@dataclass
class Splice:
    """Rewrites a continuation's ``/v1/completions`` events as the client's stream.

    ``offset``: output tokens the client had before this continuation; ``prompt_tokens``: the
    original prompt's length (what ``usage`` reports); ``kind``: the client's route.
    """

    trail: StreamTrail
    kind: str
    prompt_tokens: int
    offset: int
    want_ids: bool
    partial: bytes = b""

    def feed(self, data: bytes) -> bytes:
        block, self.partial = complete_events(self.partial, data)
        if not block:
            return b""
        out = []
        for event in sse.split_events(block)[0]:
            event = event.strip()
            if not event:
                continue
            out.append(self._event(event))
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        payload = sse.event_data(event) if event.startswith(b"data:") else None
        if payload is None:
            return event + _EVENT_END  # comments, other SSE fields: as they came
        payload = payload.strip()
        if payload == b"[DONE]":
            self.trail.done = True
            return _DONE + _EVENT_END
        try:
            chunk = json.loads(payload)
        except ValueError:
            return event + _EVENT_END
        if not isinstance(chunk, dict) or "error" in chunk:
            return event + _EVENT_END
        opening = self.trail.identity is None  # nothing of the answer reached the client yet
        out = b"data: " + json.dumps(self.rewrite(chunk), separators=(",", ":")).encode() + _EVENT_END
        if opening and self.kind == "chat":
            return self._role_event() + out
        return out

    def rewrite(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """One continuation chunk as the client's chunk (and the trail updated with its tokens).

        When no event of the first engine reached the client (its stream broke inside the first
        event), this chunk's ``id``/``created``/``model`` become the answer's: later moves keep them.
        """
        if self.trail.identity is None:
            self.trail.identity = {k: chunk.get(k) for k in ("id", "created", "model", "object")}
        identity = self.trail.identity
        choices = []
        for choice in chunk.get("choices") or []:
            ids = choice.get("token_ids") or []
            self.trail.token_ids.extend(ids)
            if choice.get("finish_reason") is not None:
                self.trail.finished = True
            choices.append(self._choice(choice, ids))
        out: dict[str, Any] = {
            "id": identity.get("id", chunk.get("id")),
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": identity.get("created", chunk.get("created")),
            "model": identity.get("model", chunk.get("model")),
            "choices": choices,
        }
        usage = chunk.get("usage")
        if usage is not None:
            out["usage"] = self._usage(usage)
            if not choices:  # the usage chunk
                self.trail.usage_sent = True
        elif self.kind == "completion" and "usage" in chunk:
            out["usage"] = None
        return out

    def _role_event(self) -> bytes:
        """A chat stream's first event (the assistant's role), for a client that has none yet."""
        identity = self.trail.identity or {}
        first = {
            "id": identity.get("id"),
            "object": "chat.completion.chunk",
            "created": identity.get("created"),
            "model": identity.get("model"),
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }
        return b"data: " + json.dumps(first, separators=(",", ":")).encode() + _EVENT_END

    def _choice(self, choice: dict[str, Any], ids: list[int]) -> dict[str, Any]:
        text = choice.get("text") or ""
        reason = choice.get("finish_reason")
        if self.kind == "chat":
            out: dict[str, Any] = {
                "index": choice.get("index", 0),
                "delta": {"content": text} if text or reason is None else {},
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": choice.get("stop_reason"),
            }
            if self.want_ids:
                out["token_ids"] = ids
            return out
        out = dict(choice)
        out["prompt_token_ids"] = None
        out["token_ids"] = ids if self.want_ids else None
        return out

    def _usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        completion = self.offset + int(usage.get("completion_tokens") or 0)
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + completion,
            "completion_tokens": completion,
        }
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            out["prompt_tokens_details"] = {
                **details,
                "cached_tokens": min(int(details["cached_tokens"]), self.prompt_tokens),
            }
        elif "prompt_tokens_details" in usage:
            out["prompt_tokens_details"] = details
        return out

    def closing_events(self, reason: str | None, include_usage: bool) -> bytes:
        """The end of an answer whose every token already went out: a finish chunk (unless
        ``reason`` is None: the client had it), the usage chunk when asked for (unless the
        client had it too), ``[DONE]``."""
        identity = self.trail.identity or {}
        base = {
            "id": identity.get("id"),
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": identity.get("created"),
            "model": identity.get("model"),
        }
        events: list[dict[str, Any]] = []
        if reason is not None:
            choice: dict[str, Any] = (
                {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason, "stop_reason": None}
                if self.kind == "chat"
                else {"index": 0, "text": "", "logprobs": None, "finish_reason": reason, "stop_reason": None}
            )
            events.append({**base, "choices": [choice]})
        if include_usage and not self.trail.usage_sent:  # (it went out before the stream broke)
            events.append({**base, "choices": [], "usage": self._usage({"completion_tokens": 0})})
        self.trail.finished = True
        self.trail.done = True
        return (
            b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + _EVENT_END for e in events)
            + _DONE
            + _EVENT_END
        )
