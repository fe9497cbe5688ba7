"""A chat completion's answer re-encoded as OpenAI's Responses API: a response object, or its events.

The gateway serves ``/v1/responses`` as a chat completion (:mod:`~pdgate.gateway.responses_api`).
:class:`ResponsesAnswer` stands where the client's responder stands and re-encodes what the request
path writes: a whole chat completion becomes one ``response`` object; a chat stream (``data:``
chunks, whatever instance or migration produced them) becomes Responses events, in the order the
``openai`` client's stream helpers check: ``response.created``, ``response.in_progress``, the
message item and its text part added, ``response.output_text.delta`` per piece of text, the part,
text and item done, and ``response.completed`` (``response.incomplete`` when the answer hit
``max_output_tokens``) with the usage. Responses streams end without ``[DONE]``. A stream that
breaks and cannot go on ends with an ``error`` event and ``response.failed``.

The gateway's own accounting (tokens, TTFT, usage, SLO) reads the chat form before it is
re-encoded, so it is the same for both routes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pdgate.common.http_server import Responder
from pdgate.common.json_codec import JsonError, json_decode
from pdgate.common.sse import EventBuffer, event_data
from pdgate.gateway.requests import GatewayError
from pdgate.gateway.responses_api import ResponsesRequest

_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class ResponseBuilder:
    """Builds the ``response`` objects of one request (its id, echoed fields and creation time)."""

    def __init__(self, request: ResponsesRequest, created_at: float) -> None:
        self.request = request
        self.created_at = int(created_at)

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        *,
        usage: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The response object in ``status`` (``completed`` turns ``incomplete`` for a cut answer)."""
        incomplete = _INCOMPLETE.get(finish_reason or "")
        if status == "completed" and incomplete is not None:
            status = "incomplete"
        return {
            "id": self.request.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.request.model,
            "output": output,
            "usage": usage,
            "error": error,
            "incomplete_details": {"reason": incomplete} if status == "incomplete" else None,
            "tools": [],
            "store": False,
            "background": False,
            "previous_response_id": None,
            **self.request.echo,
        }

    def message(self, text: str, status: str) -> dict[str, Any]:
        """The answer's one output item: an assistant message with its text."""
        return {
            "type": "message",
            "id": self.request.message_id,
            "status": status,
            "role": "assistant",
            "content": [output_text(text)] if status != "in_progress" else [],
        }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def responses_usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A chat ``usage`` in the Responses form (cached prompt tokens kept; no reasoning tokens)."""
    if not chat_usage:
        return None
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    output = int(chat_usage.get("completion_tokens") or 0)
    details = chat_usage.get("prompt_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(details.get("cached_tokens") or 0)},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def response_from_chat(builder: ResponseBuilder, body: bytes) -> bytes:
    """A whole chat completion (JSON) as the response object; 502 when the engine's answer is not one."""
    try:
        chat = json_decode(body)
    except JsonError:
        chat = None
    if not isinstance(chat, dict):
        raise GatewayError(502, "the engine's answer is not a chat completion", headers={"Retry-After": "1"})
    choice = (chat.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") or ""
    finish = choice.get("finish_reason")
    status = "incomplete" if finish in _INCOMPLETE else "completed"
    response = builder.response(
        "completed", [builder.message(text, status)], usage=responses_usage(chat.get("usage")), finish_reason=finish
    )
    return json.dumps(response).encode()


class ResponsesEvents:
    """Re-encodes one chat stream, chunk by chunk, as Responses events (see the module doc)."""

    def __init__(self, builder: ResponseBuilder) -> None:
        self.builder = builder
        self._events = EventBuffer()
        self._sequence = 0
        self._text: list[str] = []
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self.closed = False

    def opening(self) -> bytes:
        """The events before any text: the response created and in progress, its message and part added."""
        b = self.builder
        item_id = b.request.message_id
        return b"".join(
            [
                self._event("response.created", response=b.response("in_progress", [])),
                self._event("response.in_progress", response=b.response("in_progress", [])),
                self._event("response.output_item.added", output_index=0, item=b.message("", "in_progress")),
                self._event(
                    "response.content_part.added",
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    part=output_text(""),
                ),
            ]
        )

    def feed(self, data: bytes) -> bytes:
        """The Responses events for the chat stream's bytes ``data`` (whole events only; the rest waits)."""
        out = []
        for event in self._events.feed(data):
            payload = event_data(event)
            if payload is None or self.closed:
                continue
            if payload.strip() == b"[DONE]":
                out.append(self.closing())
                continue
            try:
                chunk = json_decode(payload)
            except JsonError:
                continue  # not a chat chunk: nothing to re-encode
            if isinstance(chunk, dict):
                out.append(self._chunk(chunk))
        return b"".join(out)

    def _chunk(self, chunk: dict[str, Any]) -> bytes:
        if "error" in chunk:
            return self.failed(chunk["error"])
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        out = []
        for choice in chunk.get("choices") or []:
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                self._text.append(delta)
                out.append(
                    self._event(
                        "response.output_text.delta",
                        item_id=self.builder.request.message_id,
                        output_index=0,
                        content_index=0,
                        delta=delta,
                        logprobs=[],
                    )
                )
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return b"".join(out)

    def closing(self) -> bytes:
        """The events that end a finished answer: text, part and item done, then the response."""
        if self.closed:
            return b""
        self.closed = True
        b, text = self.builder, "".join(self._text)
        item_id = b.request.message_id
        status = "incomplete" if self._finish in _INCOMPLETE else "completed"
        item = b.message(text, status)
        final = b.response("completed", [item], usage=responses_usage(self._usage), finish_reason=self._finish)
        return b"".join(
            [
                self._event(
                    "response.output_text.done",
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    text=text,
                    logprobs=[],
                ),
                self._event(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    part=output_text(text),
                ),
                self._event("response.output_item.done", output_index=0, item=item),
                self._event(f"response.{final['status']}", response=final),
            ]
        )

    def ended(self) -> bytes:
        """The stream ended without ``[DONE]``: finished if the answer said why it stopped, else failed."""
        if self._finish is not None:
            return self.closing()
        return self.failed({"message": "the engine's stream ended before the answer finished"})

    def failed(self, error: Any) -> bytes:
        """An ``error`` event and ``response.failed``: the answer broke and cannot go on."""
        if self.closed:
            return b""
        self.closed = True
        message = error.get("message") if isinstance(error, dict) else None
        message = message if isinstance(message, str) and message else "the answer failed mid-stream"
        code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
        code = str(code) if code is not None else None  # an engine's error code may be a number
        b = self.builder
        partial = b.message("".join(self._text), "incomplete")
        failed = b.response(
            "failed", [partial], usage=responses_usage(self._usage), error={"code": "server_error", "message": message}
        )
        return self._event("error", code=code, message=message, param=None) + self._event(
            "response.failed", response=failed
        )

    def _event(self, kind: str, **fields: Any) -> bytes:
        """One Responses event, framed as OpenAI frames them (``event:`` and ``data:`` lines)."""
        body = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(body).encode())


class ResponsesAnswer:
    """The client's responder for a ``/v1/responses`` request: what the chat path writes, re-encoded.

    Error answers (4xx/5xx JSON) pass through unchanged: they are OpenAI's error shape on both routes.
    """

    def __init__(self, responder: Responder, request: ResponsesRequest, wall_clock: Callable[[], float]) -> None:
        self._responder = responder
        self.builder = ResponseBuilder(request, wall_clock())
        self.events = ResponsesEvents(self.builder)

    @property
    def started(self) -> bool:
        return self._responder.started

    @property
    def client_gone(self) -> bool:
        return self._responder.client_gone

    @property
    def peer_host(self) -> str | None:
        return self._responder.peer_host

    def send(
        self, status: int, body: bytes, *, content_type: str = "application/json", headers: dict[str, str] | None = None
    ) -> None:
        if status < 400:
            body = response_from_chat(self.builder, body)
        self._responder.send(status, body, content_type=content_type, headers=headers)

    def send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._responder.send_json(status, data, headers=headers)

    def start(
        self, status: int, *, content_type: str, headers: dict[str, str] | None = None, first: bytes = b""
    ) -> None:
        self._responder.start(
            status, content_type=content_type, headers=headers, first=self.events.opening() + self.events.feed(first)
        )

    def write(self, data: bytes) -> None:
        self._responder.write(self.events.feed(data))

    def end(self, last: bytes = b"") -> None:
        data = self.events.feed(last) if last else b""
        if not self.events.closed:  # the chat stream ended without [DONE]
            data += self.events.ended()
        self._responder.end(data)

    def on_flow(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._responder.on_flow(pause, resume)
