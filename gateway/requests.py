"""Client request validation at the gateway, and OpenAI-shaped errors.

The gateway validates only what it interprets (model, prompt/messages, lengths, streaming);
every other field (``ignore_eos``, ``min_tokens``, ``return_token_ids``, ``priority``, sampling
parameters, ...) passes through to the engine unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from pdgate.common.json_codec import JsonError, json_decode


class GatewayError(Exception):
    """An error answered to the client as OpenAI error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        err_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or _TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=0)  # strict: true, "3" and 2.0 are not counts
    n: StrictInt = Field(1, ge=1)
    priority: StrictInt = 0  # read for scheduling, forwarded unchanged
    response_format: dict[str, Any] | None = None  # read when a stream is continued elsewhere


class CompletionBody(_Body):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    add_special_tokens: StrictBool = True  # as vLLM: a text prompt gets the tokenizer's special tokens (BOS)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError("send one prompt per request (batched prompts are not routed)")
            value = value[0]
        if isinstance(value, list) and (not value or any(t < 0 for t in value)):
            raise ValueError("a token-id prompt must be a non-empty list of non-negative integers")
        return value


class ChatBody(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=0)
    # read to render the prompt exactly as the engine will (vLLM's chat parameters and defaults)
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _roles(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, message in enumerate(value):
            if not isinstance(message.get("role"), str):
                raise ValueError(f"message {i} has no 'role'")
        return value


def parse_body(raw: bytes, model: type[BaseModel]) -> tuple[dict[str, Any], Any]:
    """The JSON object (forwarded as is) and its validated view; 400 on any problem."""
    data = json_object(raw)
    return data, validate_body(data, model)


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; 400 otherwise."""
    try:
        data = json_decode(raw)
    except JsonError as exc:
        raise GatewayError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return data


def validate_body(data: dict[str, Any], model: type[BaseModel]) -> Any:
    """The validated view of a request's JSON object; 400 on any problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise GatewayError(400, f"invalid field '{where}': {first['msg']}", param=where) from None
