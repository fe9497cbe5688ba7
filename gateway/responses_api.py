"""OpenAI's Responses API at the gateway: a ``/v1/responses`` request as the chat request it stands for.

pdgate serves ``POST /v1/responses`` by translating the request into a chat completion and
re-encoding the answer (:mod:`~pdgate.gateway.responses_stream`). Everything the gateway does for
chat (PD hand-off in either engine protocol, admission, SLO accounting, migration and failover by
token-id continuation) then applies unchanged, on every engine that serves chat completions. Passing
the route through was the other choice: vLLM 0.32 accepts ``kv_transfer_params`` on its own
``/v1/responses``, but SGLang's carries no bootstrap room, and a Responses stream cannot be continued
on another instance (docs/api.md says more).

What cannot be translated is refused with a 400 that says why: stored responses
(``previous_response_id``, ``conversation``, ``background``; pdgate keeps no response state),
reusable prompts, and input items other than messages.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from pdgate.gateway.requests import GatewayError, parse_body

# Responses fields the translation reads; every other field passes to the engine's chat request as is
# (vLLM's sampling extras such as ignore_eos, min_tokens, seed, priority, cache_salt).
_READ = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "stream",
        "text",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "metadata",
        "previous_response_id",
        "conversation",
        "store",
        "background",
        "prompt",
        "truncation",
        "include",
        "reasoning",
        "user",
        "service_tier",
        "stream_options",
        "top_logprobs",
        "max_tool_calls",
        "safety_identifier",
        "prompt_cache_key",
    }
)
# Fields echoed in the response object, as OpenAI's answer carries them.
_ECHOED = ("instructions", "max_output_tokens", "metadata", "temperature", "top_p", "truncation", "user")

_STORED_STATE = {
    "previous_response_id": "previous_response_id needs stored responses, which pdgate does not keep; "
    "send the earlier turns in `input`",
    "conversation": "conversations need stored state, which pdgate does not keep; send the earlier turns in `input`",
    "prompt": "reusable prompts (`prompt`) are not supported; send the prompt's text in `input`",
}


class _ResponsesBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: StrictBool = False
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    background: StrictBool | None = None


@dataclass(frozen=True)
class ResponsesRequest:
    """What the answer's encoder needs of the request: its ids and the fields a response echoes."""

    model: str
    stream: bool
    echo: dict[str, Any] = field(default_factory=dict)
    response_id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")


def chat_request(raw: bytes) -> tuple[dict[str, Any], ResponsesRequest]:
    """The chat completion body a ``/v1/responses`` body stands for, and what its answer echoes.

    Raises :class:`GatewayError` (400) for a body that is not a valid Responses request or asks for
    what the gateway cannot translate.
    """
    data, parsed = parse_body(raw, _ResponsesBody)
    for name, reason in _STORED_STATE.items():
        if data.get(name) is not None:
            raise GatewayError(400, reason, param=name)
    if parsed.background:
        raise GatewayError(
            400, "background responses need stored state, which pdgate does not keep", param="background"
        )
    if data.get("n", 1) != 1:
        raise GatewayError(400, "a response has one answer: `n` must be 1", param="n")
    if parsed.tools:
        raise GatewayError(
            400, "tools are not supported on /v1/responses through pdgate; use /v1/chat/completions", param="tools"
        )
    messages = ([{"role": "system", "content": parsed.instructions}] if parsed.instructions else []) + _messages(
        parsed.input
    )
    chat: dict[str, Any] = {k: v for k, v in data.items() if k not in _READ}
    chat["model"] = parsed.model
    chat["messages"] = messages
    if parsed.max_output_tokens is not None:
        chat["max_completion_tokens"] = parsed.max_output_tokens
    if parsed.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # the usage the final event reports
    response_format = _response_format(parsed.text)
    if response_format is not None:
        chat["response_format"] = response_format
    echo = {name: data.get(name) for name in _ECHOED}
    echo["text"] = parsed.text or {"format": {"type": "text"}}
    echo["tool_choice"] = data.get("tool_choice", "auto")
    echo["parallel_tool_calls"] = data.get("parallel_tool_calls", True)
    return chat, ResponsesRequest(parsed.model, parsed.stream, echo)


def _messages(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages from a Responses ``input``: a user's text, or a list of message items."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not value:
        raise GatewayError(400, "`input` is an empty list", param="input")
    return [_message(i, item) for i, item in enumerate(value)]


_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _message(i: int, item: dict[str, Any]) -> dict[str, Any]:
    kind = item.get("type", "message")
    if kind != "message":
        raise GatewayError(
            400, f"input item {i} is a {kind!r}; only message items are supported", param=f"input.{i}.type"
        )
    named = item.get("role")
    role = _ROLES.get(named) if isinstance(named, str) else None
    if role is None:
        raise GatewayError(
            400, f"input item {i} has role {item.get('role')!r}; expected one of {sorted(_ROLES)}", param=f"input.{i}"
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise GatewayError(400, f"input item {i} has no text or list `content`", param=f"input.{i}.content")
    parts = [_part(i, j, part) for j, part in enumerate(content)]
    if all(p["type"] == "text" for p in parts):  # text only: one string, as the engine renders text parts
        return {"role": role, "content": "\n".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _part(i: int, j: int, part: Any) -> dict[str, Any]:
    where = f"input.{i}.content.{j}"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        return {"type": "image_url", "image_url": {"url": part["image_url"], "detail": part.get("detail", "auto")}}
    raise GatewayError(400, f"{where} is not supported (input_text, output_text or input_image by URL)", param=where)


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """The chat ``response_format`` for a Responses ``text.format`` (None for plain text)."""
    fmt = (text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise GatewayError(400, "text.format must be an object", param="text.format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise GatewayError(400, f"text.format type {fmt.get('type')!r} is not supported", param="text.format")
