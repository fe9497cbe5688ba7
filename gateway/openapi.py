"""The gateway's OpenAPI 3.1 description, served at ``GET /openapi.json``.

:func:`openapi_document` describes every route :class:`~pdgate.gateway.app.GatewayApp` serves and,
when it is served, the operator's API under ``/admin/`` (:mod:`pdgate.gateway.admin`): request
bodies as the gateway validates them (:mod:`~pdgate.gateway.requests`,
:mod:`~pdgate.gateway.responses_api`, :mod:`~pdgate.gateway.passthrough`; every other field passes
to the engine, so bodies allow additional properties), the headers it reads, and every status a
route can answer, each error in OpenAI's shape. The document follows the gateway's config: the
models it serves (``model`` is one of them, or of the LoRA adapters known when it is asked for),
the API keys (a bearer security scheme and 401), tenants (403, their header) and SLO headers.

``tests/test_openapi.py`` keeps it true: the documented routes are the served ones, and real
answers validate against it; ``tests/test_fuzz_gateway.py`` fuzzes a gateway from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pdgate.common.version import package_version
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.console import CONSOLE_STATE_SCHEMA, PAGE_FILES
from pdgate.gateway.instance_config import InstanceConfig
from pdgate.gateway.openapi_schemas import (
    ADMIN_SCHEMAS,
    ANSWER_SCHEMAS,
    ERROR,
    READ_AND_PASSED_ON,
    RESPONSE_REQUEST,
    SCHEMAS,
    TEXT_PARTS,
    TOKEN_ID,
    ref,
)
from pdgate.gateway.passthrough import POOLING_ROUTES, TOKENIZER_ROUTES
from pdgate.gateway.slo import APP_HEADER, MAX_PRIORITY, TPOT_HEADERS, TTFT_HEADERS

OPENAPI_VERSION = "3.1.0"
MAX_SLO_MS = 86_400_000  # a day: the longest SLO limit a header may ask for
STORED_RESPONSE_ROUTE = "/v1/responses/{response_id}"  # answered 404: pdgate stores no responses
TAG_OPENAI, TAG_PASSTHROUGH, TAG_OPERATIONS, TAG_ADMIN = "openai", "pass-through", "operations", "admin"

# What the HTTP server answers on any route, before the gateway sees the request (pdgate/common/http_server.py)
TRANSPORT_ERRORS = {
    "400": "A malformed HTTP request (the connection is closed).",
    "408": "The request's head and body did not arrive within the server's request timeout.",
    "413": "The body is over `max_body_bytes` (the connection is closed).",
    "417": "An `Expect` header other than `100-continue`.",
    "431": "The request line and headers are over the server's limit (the connection is closed).",
    "503": "The gateway has as many connections open as it allows: retry shortly (`Retry-After`).",
}


def openapi_document(
    config: GatewayConfig, *, adapters: Iterable[str] = (), admin: bool = True, version: str | None = None
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a gateway with ``config``.

    ``adapters``: the LoRA adapter names the gateway knows now (a request may name one as its
    ``model``); ``admin``: whether ``/admin/`` is served; ``version``: ``info.version`` (default:
    the installed pdgate's).
    """
    doc = _Document(config, tuple(adapters))
    paths = {**doc.openai_paths(), **doc.passthrough_paths(), **doc.operations_paths()}
    tags = [
        {"name": TAG_OPENAI, "description": "OpenAI's API, through prefill-decode disaggregation (docs/api.md)"},
        {"name": TAG_PASSTHROUGH, "description": "passed to one engine as they are: pooling and tokenizers"},
        {
            "name": TAG_OPERATIONS,
            "description": "health, readiness, metrics, the cost model, this document, the ops console",
        },
    ]
    if admin:
        paths.update(doc.admin_paths())
        tags.append({"name": TAG_ADMIN, "description": _ADMIN_NOTE})
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "pdgate gateway",
            "version": version or package_version() or "0+unknown",
            "description": _INFO,
        },
        "tags": tags,
        "paths": paths,
        "components": doc.components(),
    }


_INFO = (
    "An SLO-aware gateway for prefill-decode disaggregated LLM serving, OpenAI-compatible. Every error "
    'is OpenAI\'s JSON: `{"error": {"message", "type", "param", "code"}}`. A client\'s fault is a 4xx; '
    "a 500 is a bug in the gateway. A path that is not served is a 404, a served path with another method "
    "a 405 with `Allow`."
)
_ADMIN_NOTE = (
    "The operator's API (docs/gateway.md). With `admin.api_key` (or PDGATE_ADMIN_KEY) it needs that key "
    "as a bearer token; without one it answers loopback clients only (403 for others). With "
    "`tls.admin_requires_client_cert`, a client certificate too (401 without)."
)


class _Document:
    """Builds the parts of one document from the gateway's config."""

    def __init__(self, config: GatewayConfig, adapters: tuple[str, ...]) -> None:
        self.config = config
        self.models = [m.name for m in config.models]
        self.adapters = [a for a in adapters if a not in self.models]
        self.client_keys = bool(config.client_api_keys())
        self.tenants = config.tenants if config.tenants.enabled else None

    # ------------------------------------------------------------------ paths
    def openai_paths(self) -> dict[str, Any]:
        generation = {
            "/v1/completions": ("createCompletion", "A text completion", "CompletionRequest", "Completion"),
            "/v1/chat/completions": (
                "createChatCompletion",
                "A chat completion",
                "ChatCompletionRequest",
                "ChatCompletion",
            ),
            "/v1/responses": (
                "createResponse",
                "OpenAI's Responses API, served as a chat completion",
                "ResponseRequest",
                "Response",
            ),
        }
        paths: dict[str, Any] = {}
        for path, (operation_id, summary, request, answer) in generation.items():
            paths[path] = {"post": self._generation(operation_id, summary, request, answer)}
        paths[STORED_RESPONSE_ROUTE] = {
            method: self._operation(
                TAG_OPENAI,
                f"{method}StoredResponse",
                "Stored responses: pdgate keeps none, so always 404",
                {"404": _error("pdgate does not store responses: they cannot be read, cancelled or deleted")},
                parameters=[_path_parameter("response_id")],
            )  # (answered before the API key is checked)
            for method in ("get", "delete")
        }
        paths["/v1/models"] = {
            "get": self._operation(
                TAG_OPENAI,
                "listModels",
                "The served models, then each LoRA adapter once",
                {"200": _json_response("The models", ref("ModelList"))},
                client_route=True,
            )
        }
        return paths

    def _generation(self, operation_id: str, summary: str, request: str, answer: str) -> dict[str, Any]:
        ok = {
            "description": "The answer: JSON, or with `stream: true` server-sent events",
            "headers": {"X-Request-Id": _header("The request's id: the client's own, or one the gateway made")},
            "content": {
                "application/json": {"schema": ref(answer)},
                "text/event-stream": {"schema": ref("StreamEvent")},
            },
        }
        errors = {
            "400": "Bad input: not a JSON object, an invalid field (`param` names it), a prompt too long for "
            "the model (`code: context_length_exceeded`), a bad header",
            "404": "The model is not served here (`code: model_not_found`)",
            "429": "Admission: the request cannot meet its latency SLO now, or the queue is full "
            "(`x-pdgate-reject-reason`); or its tenant's budget is spent",
            "4XX": "The engine's own refusal (say, a sampling parameter it rejects), with its status",
            "502": "Every engine that could serve it failed before the first byte",
            "503": "No healthy instance can serve the model now, a LoRA adapter could not be loaded, or the "
            "gateway is shutting down",
        }
        return self._operation(
            TAG_OPENAI,
            operation_id,
            summary,
            {"200": ok, **{status: _error(text) for status, text in errors.items()}},
            parameters=self._request_headers(slo=True),
            body=ref(request),
            client_route=True,
            tenant_route=True,
        )

    def passthrough_paths(self) -> dict[str, Any]:
        paths: dict[str, Any] = {}
        for path in (*POOLING_ROUTES, *TOKENIZER_ROUTES):
            pooling = path in POOLING_ROUTES
            name = path.rsplit("/", 1)[-1]
            errors = {
                "400": "Not a JSON object, or no `model`"
                + ("" if pooling else " while the gateway serves several models"),
                "404": "The model is not served here (`code: model_not_found`), or its engines do not serve the route",
                "4XX": "The engine's own refusal, with its status",
                "502": "Every candidate engine failed",
                "503": "No " + ("colocated (role both)" if pooling else "healthy") + " instance of the model now",
            }
            ok = {
                "description": "The engine's answer, as it sent it",
                "headers": {"X-Request-Id": _header("The request's id")},
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
            paths[path] = {
                "post": self._operation(
                    TAG_PASSTHROUGH,
                    f"passThrough{name.capitalize()}",
                    f"vLLM's {path}, passed to the least loaded "
                    + ("colocated instance" if pooling else "healthy instance")
                    + " of the model",
                    {"200": ok, **{status: _error(text) for status, text in errors.items()}},
                    parameters=self._request_headers(slo=False),
                    body=ref("PoolingRequest" if pooling else f"{name.capitalize()}Request"),
                    client_route=True,
                    tenant_route=True,
                )
            }
        return paths

    def operations_paths(self) -> dict[str, Any]:
        ready = {"description": "Readiness", "content": {"application/json": {"schema": ref("Ready")}}}
        not_ready = {
            "description": "A model has no healthy serving path (`Retry-After`); or the connection limit",
            "headers": {"Retry-After": _header("Seconds to wait")},
            "content": {"application/json": {"schema": {"anyOf": [ref("Ready"), ref("Error")]}}},
        }
        metrics = {
            "description": "Prometheus text exposition (docs/observability.md)",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
        return {
            "/health": {
                "get": self._operation(
                    TAG_OPERATIONS,
                    "health",
                    "200 while the process serves",
                    {"200": _json_response("Alive", ref("Health"))},
                )
            },
            "/ready": {
                "get": self._operation(
                    TAG_OPERATIONS,
                    "ready",
                    "Whether every model has a healthy serving path",
                    {"200": ready, "503": not_ready},
                )
            },
            "/metrics": {"get": self._operation(TAG_OPERATIONS, "metrics", "Prometheus metrics", {"200": metrics})},
            "/cost-model": {
                "get": self._operation(
                    TAG_OPERATIONS,
                    "costModel",
                    "The cost model in force",
                    {
                        "200": _json_response("The cost model", ref("CostModel")),
                        "503": _error("The cost model is not loaded yet (`Retry-After`); or the connection limit"),
                    },
                )
            },
            "/openapi.json": {
                "get": self._operation(
                    TAG_OPERATIONS,
                    "openapi",
                    "This document",
                    {"200": _json_response("The OpenAPI 3.1 description of this gateway", {"type": "object"})},
                )
            },
            **self._console_paths(),
        }

    def _console_paths(self) -> dict[str, Any]:
        """The ops console's page and its files (:mod:`pdgate.gateway.console`; its data is under ``/admin/``)."""
        paths = {}
        for path, (name, content_type) in PAGE_FILES.items():
            media = content_type.split(";")[0]
            answer = {"description": f"The console's {name}", "content": {media: {"schema": {"type": "string"}}}}
            summary = f"The ops console's {name} (the page polls `GET /admin/console/state`)"
            operation_id = "console" + name.split(".")[-1].capitalize()  # consoleHtml, consoleJs, consoleCss
            paths[path] = {"get": self._operation(TAG_OPERATIONS, operation_id, summary, {"200": answer})}
        return paths

    def admin_paths(self) -> dict[str, Any]:
        instance = [_path_parameter("instance_id", "An instance's id")]
        missing = {"404": _error("No such instance (`code: instance_not_found`)")}
        query_timeout = {
            "name": "timeout_s",
            "in": "query",
            "description": "How long to wait (default `admin.drain_wait_s`)",
            "schema": {"type": "number", "minimum": 0, "maximum": 3600},
        }

        def flag(name: str, description: str) -> dict[str, Any]:
            return {"name": name, "in": "query", "description": description, "schema": {"type": "string"}}

        described = _json_response("The instance", ref("AdminInstance"))
        return {
            "/admin/instances": {
                "get": self._admin(
                    "adminListInstances",
                    "Every instance",
                    {"200": _json_response("Instances", ref("AdminInstanceList"))},
                ),
                "post": self._admin(
                    "adminAddInstance",
                    "Serve one more instance (one entry of the config's `instances`)",
                    {
                        "201": _json_response("The new instance", ref("AdminInstance")),
                        "400": _error("Not a JSON object, or not a valid instance entry"),
                        "409": _error("The id is in use"),
                    },
                    body=ref("InstanceConfig"),
                ),
            },
            "/admin/instances/{instance_id}": {
                "get": self._admin("adminGetInstance", "One instance", {"200": described, **missing}, instance),
                "delete": self._admin(
                    "adminRemoveInstance",
                    "Drain it, then stop serving it",
                    {
                        "200": _json_response("Removed", ref("AdminRemoved")),
                        "400": _error("`timeout_s` is not a number within 0-3600"),
                        **missing,
                        "409": _error("The drain did not finish, or it is its model's last serving path (`force`)"),
                    },
                    [*instance, query_timeout, flag("force", "`true`: remove even if the drain did not finish")],
                ),
            },
            "/admin/instances/{instance_id}/drain": {
                "post": self._admin(
                    "adminDrainInstance",
                    "Keep new requests off the instance and move its streams away",
                    {
                        "200": _json_response("Drained (with `wait`)", ref("AdminInstance")),
                        "202": _json_response("Draining", ref("AdminInstance")),
                        "400": _error("`timeout_s` is not a number within 0-3600"),
                        **missing,
                    },
                    [*instance, query_timeout, flag("wait", "`true`: answer once it is empty")],
                )
            },
            "/admin/instances/{instance_id}/undrain": {
                "post": self._admin(
                    "adminUndrainInstance", "Take new requests again", {"200": described, **missing}, instance
                )
            },
            "/admin/instances/{instance_id}/role": {
                "post": self._admin(
                    "adminSetRole",
                    "A flex instance serves in this role from its next placement on",
                    {
                        "200": described,
                        "400": _error('Not `{"role": "prefill" | "decode" | "both"}`'),
                        **missing,
                        "409": _error("Not a flex instance, or the change leaves its model without a serving path"),
                    },
                    instance,
                    body=ref("AdminRole"),
                ),
            },
            "/admin/plan": {
                "get": self._admin(
                    "adminPlan",
                    "The role balancer's and the scaling plan",
                    {"200": _json_response("Plans", ref("AdminPlan"))},
                )
            },
            "/admin/discovery": {
                "get": self._admin(
                    "adminDiscovery",
                    "What Kubernetes discovery sees and manages (`enabled` false when it is off)",
                    {"200": _json_response("Discovery's state", ref("AdminDiscovery"))},
                )
            },
            "/admin/console/state": {
                "get": self._admin(
                    "adminConsoleState",
                    "What the ops console (`GET /console`) shows: instances, queue, SLO history, events, plan",
                    {"200": _json_response("The console's state", ref("ConsoleState"))},
                )
            },
            "/admin/requests/{request_id}/migrate": {
                "post": self._admin(
                    "adminMigrate",
                    "Move one running stream now",
                    {
                        "200": _json_response("Whether it moved", ref("AdminMigration")),
                        "400": _error("Not JSON, a bad `target`, or the stream already runs there"),
                        "404": _error("No running stream of that id, or no such target instance"),
                        "409": _error("The stream cannot move now (`Retry-After`)"),
                        "503": _error("The replica that serves the stream did not answer; or the connection limit"),
                    },
                    [_path_parameter("request_id", "The request's id (its X-Request-Id)")],
                    body=ref("AdminMigrateRequest"),
                    body_required=False,
                )
            },
        }

    def _admin(
        self,
        operation_id: str,
        summary: str,
        responses: dict[str, Any],
        parameters: list[dict[str, Any]] | None = None,
        *,
        body: dict[str, Any] | None = None,
        body_required: bool = True,
    ) -> dict[str, Any]:
        auth = {
            "401": _error("The admin key is missing or wrong, or no client certificate was presented"),
            "403": _error("No admin key is configured and the client is not on loopback (`type: permission_error`)"),
        }
        operation = self._operation(
            TAG_ADMIN,
            operation_id,
            summary,
            {**auth, **responses},
            parameters=parameters,
            body=body,
            body_required=body_required,
        )
        if self.config.admin_api_key():
            operation["security"] = [{"adminKey": []}]
        return operation

    # ------------------------------------------------------------ operations
    def _operation(
        self,
        tag: str,
        operation_id: str,
        summary: str,
        responses: dict[str, Any],
        *,
        parameters: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None,
        body_required: bool = True,
        client_route: bool = False,
        tenant_route: bool = False,
    ) -> dict[str, Any]:
        """One operation: its own responses, then the API key's, the tenants' and the HTTP server's."""
        answers = dict(responses)
        if client_route and self.client_keys:
            answers.setdefault("401", _error("The API key is missing or wrong (`code: invalid_api_key`)"))
        if tenant_route and self.tenants is not None:
            answers.setdefault("403", _error("No configured tenant is named (`code: no_tenant`, `unknown_tenant`)"))
            answers.setdefault("429", _error("The tenant's budget is spent (`code: tenant-budget`)"))
        for status, text in TRANSPORT_ERRORS.items():
            answers.setdefault(status, _error(text))
        operation: dict[str, Any] = {
            "tags": [tag],
            "operationId": operation_id,
            "summary": summary,
            "responses": dict(sorted(answers.items())),
        }
        if parameters:
            operation["parameters"] = parameters
        if body is not None:
            operation["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": body}}}
        if client_route and self.client_keys:
            operation["security"] = [{"clientKey": []}]
        return operation

    def _request_headers(self, *, slo: bool) -> list[dict[str, Any]]:
        """The headers the gateway reads on a request (SLO headers on the generation routes)."""
        headers = [
            _header_parameter(
                "X-Request-Id",
                "The request's id, passed to the engines (else the gateway makes one)",
                {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[!-~]+$"},
            )
        ]
        if self.tenants is not None and "header" in self.tenants.identify_by:
            headers.append(_header_parameter(self.tenants.header, "The tenant's name", {"type": "string"}))
        if not slo:
            return headers
        headers += [
            _header_parameter(
                APP_HEADER, "An app tag: chooses an SLO class, and the cost model reads it", {"type": "string"}
            ),
            _header_parameter(
                "x-pdgate-pd-path",
                "`colocated` or `split`: the path a pd-paths profile handler may honour",
                {"type": "string"},
            ),
        ]
        if not self.config.slo.honor_headers:
            return headers
        limit = {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SLO_MS},
                {"type": "string", "pattern": "^\\s*([Nn][Oo][Nn][Ee]|[Oo][Ff][Ff])\\s*$"},
            ]
        }
        for name in TTFT_HEADERS:
            headers.append(_header_parameter(name, "The TTFT limit in ms, or `none` (docs/slo.md)", limit))
        for name in TPOT_HEADERS:
            headers.append(_header_parameter(name, "The TPOT limit in ms, or `none` (docs/slo.md)", limit))
        headers.append(
            _header_parameter(
                "x-priority",
                "Higher is served first",
                {"type": "integer", "minimum": -MAX_PRIORITY, "maximum": MAX_PRIORITY},
            )
        )
        return headers

    # ------------------------------------------------------------ components
    def components(self) -> dict[str, Any]:
        instance = InstanceConfig.model_json_schema(ref_template=SCHEMAS + "{model}")
        definitions = instance.pop("$defs", {})
        schemas = {
            **definitions,
            "InstanceConfig": instance,
            "Error": ERROR,
            **self._request_schemas(),
            **ANSWER_SCHEMAS,
            **ADMIN_SCHEMAS,
            "ConsoleState": CONSOLE_STATE_SCHEMA,
        }
        components: dict[str, Any] = {"schemas": schemas}
        security = {}
        if self.client_keys:
            security["clientKey"] = {"type": "http", "scheme": "bearer", "description": "One of the gateway's API keys"}
        if self.config.admin_api_key():
            security["adminKey"] = {"type": "http", "scheme": "bearer", "description": "The admin key"}
        if security:
            components["securitySchemes"] = security
        return components

    @staticmethod
    def _responses_request(model: dict[str, Any], chat: dict[str, Any]) -> dict[str, Any]:
        """A Responses body: its own fields, and the chat fields it passes on that the gateway reads."""
        passed_on = {name: chat[name] for name in ("max_tokens", "priority")}
        chat_only = {
            "add_generation_prompt": {"type": "boolean", "default": True},
            "add_special_tokens": {"type": "boolean", "default": False},
            "chat_template_kwargs": {"type": ["object", "null"]},
        }
        properties = {**RESPONSE_REQUEST["properties"], "model": model, **passed_on, **chat_only}
        return {**RESPONSE_REQUEST, "properties": properties}

    def _request_schemas(self) -> dict[str, Any]:
        generation_model = {
            "type": "string",
            "description": "A served model, or a LoRA adapter of one",
            "enum": [*self.models, *self.adapters],
        }
        served_model = {"type": "string", "description": "A served model", "enum": list(self.models)}
        tokenizer_model = {  # as an engine does: its one model when none is named
            "type": ["string", "null"] if len(self.models) == 1 else "string",
            "description": "A served model (may be left out when the gateway serves one)",
            "enum": [*self.models, None] if len(self.models) == 1 else list(self.models),
        }
        common = {
            "model": generation_model,
            "stream": {"type": "boolean", "default": False},
            "stream_options": {
                "type": ["object", "null"],
                "properties": {"include_usage": {"type": "boolean"}},
            },
            "max_tokens": {"type": ["integer", "null"], "minimum": 0},
            "n": {"type": "integer", "minimum": 1, "default": 1},
            "priority": {"type": "integer", "default": 0, "description": "Read for scheduling, passed on"},
            **READ_AND_PASSED_ON,
        }
        token_ids = {"type": "array", "minItems": 1, "items": TOKEN_ID}
        return {
            "CompletionRequest": {
                "type": "object",
                "description": "Fields other than these pass to the engine unchanged (`ignore_eos`, `min_tokens`, ...)",
                "required": ["model", "prompt"],
                "properties": {
                    **common,
                    "prompt": {
                        "description": "One prompt: text, token ids, or a list of one of those",
                        "anyOf": [
                            {"type": "string", "minLength": 1},
                            token_ids,
                            {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": 1,
                                "items": {"type": "string", "minLength": 1},
                            },
                            {"type": "array", "minItems": 1, "maxItems": 1, "items": token_ids},
                        ],
                    },
                    "add_special_tokens": {"type": "boolean", "default": True},
                },
            },
            "ChatCompletionRequest": {
                "type": "object",
                "description": "Fields other than these pass to the engine unchanged",
                "required": ["model", "messages"],
                "properties": {
                    **common,
                    "messages": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["role"],
                            "properties": {
                                "role": {"enum": ["system", "user", "assistant", "developer", "tool"]},
                                "content": {"anyOf": [{"type": "string"}, {"type": "null"}, TEXT_PARTS]},
                            },
                        },
                    },
                    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 0},
                    "add_generation_prompt": {"type": "boolean", "default": True},
                    "add_special_tokens": {"type": "boolean", "default": False},
                    "tools": {"type": ["array", "null"], "items": {"type": "object"}},
                    "chat_template_kwargs": {"type": ["object", "null"]},
                },
            },
            "ResponseRequest": self._responses_request(generation_model, common),
            "PoolingRequest": {
                "type": "object",
                "description": "vLLM's pooling request, passed to the engine as it is",
                "required": ["model"],
                "properties": {"model": served_model},
            },
            "TokenizeRequest": {
                "type": "object",
                "description": "vLLM's request, passed to the engine as it is: a `prompt` or chat `messages`; "
                "`model` may be left out when the gateway serves one model",
                "required": [] if len(self.models) == 1 else ["model"],
                "properties": {
                    "model": tokenizer_model,
                    "prompt": {"type": "string"},
                    "messages": {"type": "array", "items": {"type": "object"}},
                    "add_special_tokens": {"type": "boolean"},
                },
                "anyOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
            },
            "DetokenizeRequest": {
                "type": "object",
                "description": "vLLM's request, passed to the engine as it is; `model` may be left out when the "
                "gateway serves one model",
                "required": ["tokens"] if len(self.models) == 1 else ["model", "tokens"],
                "properties": {"model": tokenizer_model, "tokens": {"type": "array", "items": TOKEN_ID}},
            },
        }


# --------------------------------------------------------------------------- helpers
def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref("Error")}}}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


def _header_parameter(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": schema}


def _path_parameter(name: str, description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}
