"""The gateway's OpenAPI description (/openapi.json) is valid, complete and true.

Valid: OpenAPI 3.1 (schemathesis's meta-schema check) with valid JSON Schemas and no dangling
``$ref``. Complete: the documented (path, method) pairs are exactly the gateway's routes
(:attr:`GatewayApp.routes` of a built app, and the admin API's, probed on a real gateway); a route
added without documenting it fails here. True: a real gateway over a simulated engine serves the
document, every other method of a documented path is a 405 naming the documented ones, and real
answers (completions, streams, responses, errors) conform to it: documented status, content type,
headers and body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import requests
import schemathesis
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support.fleet import MODEL, call, engine_flags, instance_entry, start_gateway, write_config
from support.procs import PdgateProcess, start_sim
from support.waiting import wait_until

from pdgate.adapters import UpstreamPool
from pdgate.common.version import package_version
from pdgate.gateway.app import GatewayApp, build_gateway
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.openapi import STORED_RESPONSE_ROUTE, openapi_document
from pdgate.gateway.proxy import Proxy
from pdgate.gateway.requests import ChatBody, CompletionBody
from pdgate.gateway.responses_api import _ResponsesBody

METHODS = ("get", "post", "put", "patch", "delete")
CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
MAX_BODY_BYTES = 4096


def gateway_config(**extra: Any) -> GatewayConfig:
    instance = {"url": "http://127.0.0.1:1", "model": MODEL, "kind": "sim"}
    return GatewayConfig.model_validate(
        {"models": [{"name": MODEL, "max_model_len": 4096}], "instances": [instance], **extra}
    )


def served_app(config: GatewayConfig) -> GatewayApp:
    """A gateway's application as it is built to serve (nothing started: its route table is what we read)."""
    gateway = build_gateway(config)
    cluster = Cluster(config, UpstreamPool())
    proxy = Proxy(config, cluster, gateway.profiles, gateway.profile_handler, gateway.tokenizers, gateway.metrics)
    return GatewayApp(gateway, cluster, proxy)


def documented(doc: dict[str, Any], *, admin: bool) -> set[tuple[str, str]]:
    """The (path, METHOD) pairs a document describes, the admin API's or the others."""
    return {
        (path, method.upper())
        for path, item in doc["paths"].items()
        for method in item
        if path.startswith("/admin/") == admin
    }


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def resolve(doc: dict[str, Any], pointer: str) -> Any:
    node: Any = doc
    for part in pointer.removeprefix("#/").split("/"):
        node = node[part]
    return node


# ------------------------------------------------------------------------------ the document itself
CONFIGS = {
    "defaults": {},
    "keys, tenants, two models": {
        "api_keys": ["k"],
        "admin": {"api_key": "admin-k"},
        "models": [{"name": MODEL, "max_model_len": 4096}, {"name": "other", "max_model_len": 2048}],
        "instances": [
            {"url": "http://127.0.0.1:1", "model": MODEL, "kind": "sim"},
            {"url": "http://127.0.0.1:2", "model": "other", "kind": "sim"},
        ],
        "tenants": {"identify_by": ["header"], "tenants": [{"name": "team-a"}]},
        "slo": {"honor_headers": False},
    },
}


@pytest.mark.parametrize("extra", CONFIGS.values(), ids=CONFIGS.keys())
def test_document_is_valid_openapi_3_1(extra: dict[str, Any]) -> None:
    doc = openapi_document(gateway_config(**extra), adapters=["sql-lora"])
    schemathesis.openapi.from_dict(doc).validate()
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    for pointer in set(references(doc)):
        assert resolve(doc, pointer) is not None, pointer
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"] == package_version()
    json.dumps(doc)  # plain JSON, as served


def test_the_validity_check_has_teeth() -> None:
    doc = openapi_document(gateway_config())
    del doc["paths"]["/health"]["get"]["responses"]["200"]["description"]
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(doc).validate()


def test_documented_routes_are_the_served_routes() -> None:
    config = gateway_config()
    app = served_app(config)
    served = {(path, method) for path, methods in app.routes.items() for method in methods}
    refused = {(STORED_RESPONSE_ROUTE, "GET"), (STORED_RESPONSE_ROUTE, "DELETE")}  # documented 404s
    assert documented(openapi_document(config), admin=False) == served | refused
    # the admin API only where it is served (the probe on a real gateway below checks what it serves)
    assert not documented(openapi_document(config, admin=False), admin=True)
    assert documented(openapi_document(config), admin=True)


def test_request_schemas_document_every_field_the_gateway_validates() -> None:
    schemas = openapi_document(gateway_config())["components"]["schemas"]
    for body, name in ((CompletionBody, "CompletionRequest"), (ChatBody, "ChatCompletionRequest")):
        assert set(body.model_fields) <= set(schemas[name]["properties"]), name
    assert set(_ResponsesBody.model_fields) <= set(schemas["ResponseRequest"]["properties"])


def test_document_follows_the_config() -> None:
    plain = openapi_document(gateway_config(), adapters=["sql-lora"])
    assert "securitySchemes" not in plain["components"]
    assert plain["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == [MODEL, "sql-lora"]
    assert plain["components"]["schemas"]["PoolingRequest"]["properties"]["model"]["enum"] == [MODEL]
    assert "model" not in plain["components"]["schemas"]["TokenizeRequest"]["required"]  # one model: optional
    assert "401" not in plain["paths"]["/v1/completions"]["post"]["responses"]
    headers = {p["name"] for p in plain["paths"]["/v1/chat/completions"]["post"]["parameters"]}
    assert {"X-Request-Id", "x-slo-ttft-ms", "x-priority"} <= headers

    strict = openapi_document(gateway_config(**CONFIGS["keys, tenants, two models"]))
    schemes = strict["components"]["securitySchemes"]
    assert schemes["clientKey"]["scheme"] == schemes["adminKey"]["scheme"] == "bearer"
    for path in ("/v1/completions", "/v1/models", "/tokenize"):
        operation = next(iter(strict["paths"][path].values()))
        assert operation["security"] == [{"clientKey": []}] and "401" in operation["responses"], path
    assert "security" not in strict["paths"]["/health"]["get"]
    assert strict["paths"]["/admin/plan"]["get"]["security"] == [{"adminKey": []}]
    completions = strict["paths"]["/v1/completions"]["post"]
    headers = {p["name"] for p in completions["parameters"]}
    assert "x-pdgate-tenant" in headers and "x-slo-ttft-ms" not in headers  # slo.honor_headers is off
    assert "403" in completions["responses"]
    assert "model" in strict["components"]["schemas"]["TokenizeRequest"]["required"]  # two models: required


# ------------------------------------------------------------------------------ a real gateway
@dataclass
class Live:
    gateway: PdgateProcess
    instance_id: str
    schema: Any  # schemathesis's view of the served document


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    engine = start_sim(*engine_flags("both"))
    try:
        entry = instance_entry(engine, "both", "sim")
        config = write_config(tmp_path_factory.mktemp("openapi") / "fleet.yaml", [entry], max_body_bytes=MAX_BODY_BYTES)
        gateway = start_gateway(config)
        try:
            wait_until(lambda: call(f"{gateway.url}/ready")[0] == 200, message="the gateway to be ready")
            schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
            schema.config.update(base_url=gateway.url)
            yield Live(gateway, entry["id"], schema)
        finally:
            gateway.stop()
    finally:
        engine.stop()


def test_gateway_serves_its_document(live: Live) -> None:
    served = requests.get(f"{live.gateway.url}/openapi.json", timeout=10)
    assert served.status_code == 200 and served.headers["content-type"] == "application/json"
    config = GatewayConfig.load(Path(live.gateway.args[-1]))
    assert served.json() == openapi_document(config)
    live.schema.validate()


def test_admin_routes_are_the_documented_ones(live: Live) -> None:
    """Each documented admin operation is served (a missing instance or request is its own 404, not
    "no route"); every other method on its path is a 405 naming the documented ones."""
    params = {"instance_id": "no-such-instance", "request_id": "no-such-request"}
    doc = live.schema.raw_schema
    for path, item in doc["paths"].items():
        if not path.startswith("/admin/"):
            continue
        url = live.gateway.url + path.format(**params)
        for method in item:
            answer = requests.request(method, url, data=b"{}", timeout=10)
            assert answer.status_code != 405, (method, path)
            if answer.status_code == 404:  # the instance's or the request's own 404, not the path's
                assert answer.json()["error"]["code"] in ("instance_not_found", "request_not_found"), (method, path)
        assert_other_methods_refused(url, path, item)
    assert requests.get(f"{live.gateway.url}/admin/instances/x/undocumented", timeout=10).status_code == 404


def test_other_methods_are_405_with_the_documented_allow(live: Live) -> None:
    for path, item in live.schema.raw_schema["paths"].items():
        if not path.startswith("/admin/") and path != STORED_RESPONSE_ROUTE:
            assert_other_methods_refused(live.gateway.url + path, path, item)


def assert_other_methods_refused(url: str, path: str, item: dict[str, Any]) -> None:
    for method in set(METHODS) - set(item):
        answer = requests.request(method, url, timeout=10)
        assert answer.status_code == 405, (method, path, answer.status_code)
        assert {m.strip().lower() for m in answer.headers["Allow"].split(",")} == set(item), (method, path)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, **extra}


# (path, method, request, expected status); {instance_id} is filled in
EXCHANGES = [
    ("/v1/completions", "POST", {"body": {"model": MODEL, "prompt": "hello", "max_tokens": 3}}, 200),
    ("/v1/completions", "POST", {"body": {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 3, "stream": True}}, 200),
    ("/v1/chat/completions", "POST", {"body": chat()}, 200),
    ("/v1/chat/completions", "POST", {"body": chat(stream=True, stream_options={"include_usage": True})}, 200),
    ("/v1/responses", "POST", {"body": {"model": MODEL, "input": "hello", "max_output_tokens": 3}}, 200),
    (
        "/v1/responses",
        "POST",
        {"body": {"model": MODEL, "input": "hello", "max_output_tokens": 3, "stream": True}},
        200,
    ),
    ("/v1/completions", "POST", {"body": {"model": MODEL}}, 400),
    ("/v1/chat/completions", "POST", {"body": chat(), "headers": {"x-priority": "high"}}, 400),
    ("/v1/completions", "POST", {"body": {"model": MODEL, "prompt": "x" * MAX_BODY_BYTES}}, 413),
    ("/v1/chat/completions", "POST", {"body": chat(model="no-such-model")}, 404),
    ("/v1/responses", "POST", {"body": {"model": MODEL, "input": "hi", "previous_response_id": "resp_1"}}, 400),
    (STORED_RESPONSE_ROUTE, "GET", {"path_parameters": {"response_id": "resp_1"}}, 404),
    ("/v1/embeddings", "POST", {"body": {"model": MODEL, "input": "hi"}}, 404),  # a generative engine's 404
    ("/tokenize", "POST", {"body": {"prompt": "hello"}}, 200),
    ("/detokenize", "POST", {"body": {"model": MODEL, "tokens": [1, 2]}}, 200),
    ("/v1/models", "GET", {}, 200),
    ("/health", "GET", {}, 200),
    ("/ready", "GET", {}, 200),
    ("/metrics", "GET", {}, 200),
    ("/cost-model", "GET", {}, 200),
    ("/openapi.json", "GET", {}, 200),
    ("/admin/instances", "GET", {}, 200),
    ("/admin/instances/{instance_id}", "GET", {}, 200),
    ("/admin/instances/{instance_id}/undrain", "POST", {}, 200),
    ("/admin/instances/{instance_id}", "DELETE", {"path_parameters": {"instance_id": "no-such-instance"}}, 404),
    ("/admin/plan", "GET", {}, 200),
    ("/admin/discovery", "GET", {}, 200),
    ("/admin/console/state", "GET", {}, 200),
    ("/console", "GET", {}, 200),
    ("/admin/requests/{request_id}/migrate", "POST", {"path_parameters": {"request_id": "r1"}, "body": {}}, 404),
]


@pytest.mark.parametrize(
    ("path", "method", "request_", "status"), EXCHANGES, ids=lambda v: v if isinstance(v, str) else None
)
def test_real_answers_conform_to_the_document(
    live: Live, path: str, method: str, request_: dict[str, Any], status: int
) -> None:
    operation = live.schema[path][method]
    given = dict(request_)
    if "{instance_id}" in path:
        given.setdefault("path_parameters", {"instance_id": live.instance_id})
    case = operation.Case(**given)
    response = case.call(timeout=10)
    assert response.status_code == status, response.text[:500]
    case.validate_response(response, checks=CONFORMANCE)
