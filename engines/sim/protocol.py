"""OpenAI-compatible request validation and response shapes, as vLLM and SGLang produce them.

Requests are validated with pydantic; fields the simulated model cannot honour (``n > 1``,
``logprobs``, ``echo``, tools, ...) are rejected with a clear :class:`ApiError` instead of being
silently ignored. Responses are plain dicts in the engines' own key order.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ApiError(Exception):
    """An error to return to the client as OpenAI error JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, err_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type or _ERROR_TYPES.get(status, "BadRequestError")


_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestEntityTooLarge",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    501: "NotImplementedError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
}
_SGLANG_PHRASES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    500: "Internal Server Error",
    502: "Bad Gateway",
}


def error_body(error: ApiError, flavour: str) -> dict[str, Any]:
    """vLLM: ``{"error": {message, type, param, code}}``; SGLang: the flat ``object: error`` form."""
    if flavour == "sglang":
        return {
            "object": "error",
            "message": error.message,
            "type": _SGLANG_PHRASES.get(error.status, error.err_type),
            "param": error.param,
            "code": error.status,
        }
    return {"error": {"message": error.message, "type": error.err_type, "param": error.param, "code": error.status}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    priority: int = 0
    return_token_ids: bool = False
    kv_transfer_params: dict[str, Any] | None = None
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    n: int = 1
    best_of: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    user: str | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise ApiError(400, "the simulated engine supports only n=1", param="n")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported by the simulated engine", param="best_of")
        for name in (
            "logprobs",
            "top_logprobs",
            "logit_bias",
            "suffix",
            "tools",
            "tool_choice",
            "response_format",
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "prompt_logprobs",
        ):
            value = (self.model_extra or {}).get(name, getattr(self, name, None))
            if value not in (None, False, [], {}) and not (name == "tool_choice" and value == "none"):
                raise ApiError(400, f"'{name}' is not supported by the simulated engine", param=name)
        if (self.model_extra or {}).get("echo"):
            raise ApiError(400, "'echo' is not supported by the simulated engine", param="echo")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options may only be set when stream is true", param="stream_options")

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    add_special_tokens: bool = True  # vLLM's default for completions (e.g. a BOS token)

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError(
                    "batched prompts are not supported by the simulated engine; send one prompt per request"
                )
            value = value[0]
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # vLLM's default for chat: the template has its own
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate ``body`` into ``model``; errors name the offending field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"invalid field '{where}': {first['msg']}", param=where) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage_dict(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int | None, report_cached: bool
) -> dict[str, Any]:
    """vLLM key order; ``prompt_tokens_details`` only when cached tokens are reported and non-zero."""
    details = {"cached_tokens": cached_tokens} if report_cached and cached_tokens else None
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": details,
    }


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a 400 that says why it is not."""
    try:
        return await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _not_json(exc) from None


def _not_json(exc: Exception) -> ApiError:
    return ApiError(400, f"request body is not valid JSON: {exc}")


@dataclass(frozen=True)
class InvalidJson:
    """A request body that is not JSON, kept as the 400 it earns.

    Routes check the caller's API key before they look at the body; :func:`json_of` raises the 400
    only then, so that a bad key is answered 401 whatever the body.
    """

    error: ApiError


async def read_body(request: web.Request) -> Any:
    """The request body as JSON, or an :class:`InvalidJson` (for :func:`json_of`)."""
    try:
        return await read_json(request)
    except ApiError as err:
        return InvalidJson(err)


def parse_body(data: bytes) -> Any:
    """Raw body bytes (UTF-8) as JSON, or an :class:`InvalidJson` (for :func:`json_of`)."""
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return InvalidJson(_not_json(exc))


def json_of(body: Any) -> Any:
    """The parsed body; raises its 400 if it was not JSON."""
    if isinstance(body, InvalidJson):
        raise body.error
    return body
