"""The Kubernetes API's wire conventions, for the fake API server (tests/support/fake_kube.py).

``v1`` Status errors (:class:`ApiFailure`, :func:`status_response`), JSON answers typed exactly
``application/json``, label selectors in the query-parameter syntax (:func:`parse_selector`), and
the four patch content types (:func:`patched`: merge, strategic merge, JSON patch, apply).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import yaml
from aiohttp import web

PATCH_TYPES = (
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
    "application/apply-patch+yaml",
)
Selector = list[Callable[[dict[str, str]], bool]]


class ApiFailure(Exception):
    """Answered as a v1 Status."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``v1`` Status of a failure."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def status_response(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> web.Response:
    return json_response(status_body(code, reason, message, details), code)


def json_response(obj: Any, status: int = 200) -> web.Response:
    # exactly application/json, as the API server answers (clients compare the header)
    return web.Response(body=json.dumps(obj).encode(), status=status, headers={"Content-Type": "application/json"})


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, replace, remove, test)."""
    doc = copy.deepcopy(target)
    if not isinstance(ops, list):
        raise ApiFailure(400, "BadRequest", "a JSON patch is a list of operations")
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in str(op.get("path", "")).split("/")[1:]]
        if not parts:
            raise ApiFailure(422, "Invalid", "a JSON patch path names a field")
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last, kind = parts[-1], op.get("op")
        if kind in ("add", "replace"):
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                parent.insert(index, op["value"]) if kind == "add" else parent.__setitem__(index, op["value"])
            else:
                parent[last] = op["value"]
        elif kind == "remove":
            parent.pop(int(last) if isinstance(parent, list) else last)
        elif kind == "test":
            value = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if value != op.get("value"):
                raise ApiFailure(422, "Invalid", f"the test of {op['path']} failed")
        else:
            raise ApiFailure(422, "Invalid", f"unknown JSON patch operation {kind!r}")
    return doc


def parse_selector(text: str) -> Selector:
    """A label selector in the query-parameter syntax, as predicates over a pod's labels."""
    terms = [t.strip() for t in re.split(r",(?![^(]*\))", text) if t.strip()]
    tests: Selector = []
    for term in terms:
        if match := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, values = match.group(1), match.group(2), {v.strip() for v in match.group(3).split(",")}
            if op == "in":
                tests.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                tests.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif match := re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*([^=!\s]*)", term):
            key, op, value = match.groups()
            if op == "!=":
                tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                tests.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif match := re.fullmatch(r"!\s*([^=!\s]+)", term):
            tests.append(lambda labels, k=match.group(1): k not in labels)
        elif re.fullmatch(r"[^=!\s()]+", term):
            tests.append(lambda labels, k=term: k in labels)
        else:
            raise ApiFailure(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return tests


def matches(tests: Selector, obj: dict[str, Any]) -> bool:
    """Whether an object's labels satisfy every term of a parsed selector."""
    labels = obj["metadata"].get("labels") or {}
    return all(test(labels) for test in tests)


async def read_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise ApiFailure(400, "BadRequest", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiFailure(400, "BadRequest", "the body is not an object")
    return body


async def apply_patch(request: web.Request, current: dict[str, Any]) -> dict[str, Any]:
    """``current`` with the request's patch applied, by its content type."""
    kind = request.content_type
    raw = await request.read()
    if kind not in PATCH_TYPES:
        raise ApiFailure(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {kind}")
    if kind == "application/apply-patch+yaml":
        if not request.query.get("fieldManager"):
            raise ApiFailure(400, "BadRequest", "PatchOptions.meta.k8s.io is invalid: fieldManager: Required value")
        try:
            patch = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ApiFailure(400, "BadRequest", "the body is not YAML") from None
    else:
        try:
            patch = json.loads(raw)
        except ValueError:
            raise ApiFailure(400, "BadRequest", "the body is not JSON") from None
    if kind == "application/json-patch+json":
        result = json_patch(current, patch)
    elif isinstance(patch, dict):
        result = merge_patch(current, patch)
    else:
        raise ApiFailure(400, "BadRequest", "a merge patch is an object")
    if not isinstance(result, dict):
        raise ApiFailure(422, "Invalid", "the patched object is not an object")
    return result
