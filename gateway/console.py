"""The ops console: a live page of the fleet, served by the gateway itself (no build step, no CDN).

* ``GET /console`` (:class:`ConsolePage`): one HTML page with its script and style at
  ``/console/console.js`` and ``/console/console.css``, package data under ``console_page/``,
  read once when the gateway starts. Plain HTML, JavaScript and CSS; it works offline.
* ``GET /admin/console/state`` (:class:`ConsoleState`, served by
  :class:`~pdgate.gateway.admin.AdminApi`, so behind the admin API's authentication): the JSON the
  page polls about once a second. When the admin API needs a key, the page asks for it once and
  keeps it in the tab's ``sessionStorage``, sending it as ``Authorization: Bearer``.

The state's contract (:data:`CONSOLE_STATE_SCHEMA`, also in ``/openapi.json`` as ``ConsoleState``):

* ``time`` (wall clock, s), ``uptime_s``, ``version``, ``replica`` (with replicas, the one that
  answered; each keeps its own history and events);
* ``instances``: ``GET /admin/instances``' view of each instance, without the list of streams
  (``streams`` is ``{"total", "moving"}``), plus ``prefix_tokens`` (``queried``: prompt tokens
  placed there as the first leg, ``hit``: of those, expected in its KV cache) and
  ``prefix_hit_rate`` (hit / queried since the gateway started; null before any);
* ``queue``: the admission queue per model (``length``, ``oldest_wait_s``, ``by_priority``,
  ``by_tenant``), ``total`` and ``max_per_model`` (``admission.max_queue``);
* ``requests``: :meth:`~pdgate.gateway.recent.RequestHistory.view` — finished, SLO-judged, met,
  rejected, attainment and goodput per 10-s bucket over the last 5 minutes, and their total;
* ``events``: the latest migrations and role changes, newest first
  (:meth:`~pdgate.gateway.recent.EventLog.recent`);
* ``plan``: what ``GET /admin/plan`` answers (the role balancer's plan and the scaling plan);
* ``discovery``: what ``GET /admin/discovery`` answers (Kubernetes discovery: pods, problems).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any

from pdgate.common.http_server import HttpRequest, Responder
from pdgate.common.version import package_version
from pdgate.gateway.admission_queue import tenant_of
from pdgate.gateway.openapi_schemas import ADMIN_SCHEMAS, ref
from pdgate.gateway.requests import GatewayError

if TYPE_CHECKING:
    from pdgate.gateway.admission import AdmissionController
    from pdgate.gateway.metrics import GatewayMetrics, LightCounter

PAGE_FOLDER = "console_page"
# path -> (file, content type)
PAGE_FILES = {
    "/console": ("index.html", "text/html; charset=utf-8"),
    "/console/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console/console.css": ("console.css", "text/css; charset=utf-8"),
}
CONSOLE_ROUTES = tuple(PAGE_FILES)
# everything from the gateway itself: no inline script, no other origin, not framed
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class ConsolePage:
    """Serves the console's static files (read once, at construction)."""

    def __init__(self) -> None:
        folder = resources.files("pdgate.gateway").joinpath(PAGE_FOLDER)
        self._files = {
            path: (folder.joinpath(name).read_bytes(), content_type)
            for path, (name, content_type) in PAGE_FILES.items()
        }

    async def serve(self, request: HttpRequest, responder: Responder) -> None:
        found = self._files.get(request.path)
        if found is None:  # (only the paths above are routed here)
            raise GatewayError(404, f"no route {request.method} {request.path}")
        body, content_type = found
        responder.send(200, body, content_type=content_type, headers=PAGE_HEADERS)


class ConsoleState:
    """Builds ``GET /admin/console/state`` from what the gateway already keeps (see the module doc)."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        admission: AdmissionController | None,
        *,
        max_queue: int,
        started_at: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.admission = admission
        self.max_queue = max_queue
        self.started_at = started_at
        self.clock = clock
        self.version = package_version() or "unknown"

    def state(
        self,
        instances: Iterable[dict[str, Any]],
        plan: dict[str, Any],
        discovery: dict[str, Any],
        replica: str | None,
    ) -> dict[str, Any]:
        """The page's whole state: ``instances``, ``plan`` and ``discovery`` as the admin API answers them."""
        now = self.clock()
        recent = self.metrics.recent
        return {
            "object": "console.state",
            "time": now,
            "uptime_s": round(max(0.0, now - self.started_at), 1) if self.started_at else None,
            "version": self.version,
            "replica": replica,
            "instances": self._instances(instances),
            "queue": self._queue(),
            "requests": recent.requests.view(),
            "events": recent.events.recent(),
            "plan": plan,
            "discovery": discovery,
        }

    def _instances(self, described: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        queried = _by_instance(self.metrics.prefix_queries)
        hits = _by_instance(self.metrics.prefix_hits)
        rows = []
        for view in described:
            row = dict(view)
            streams = row.pop("streams", [])
            row["streams"] = {"total": len(streams), "moving": sum(1 for s in streams if s.get("moving"))}
            asked, hit = queried.get(row["id"], 0.0), hits.get(row["id"], 0.0)
            row["prefix_tokens"] = {"queried": int(asked), "hit": int(hit)}
            row["prefix_hit_rate"] = round(hit / asked, 4) if asked else None
            rows.append(row)
        return rows

    def _queue(self) -> dict[str, Any]:
        admission = self.admission
        models = []
        if admission is not None:
            now = admission.clock()
            for model, queue in sorted(admission.queues.items()):
                waiters = list(queue)
                priorities = Counter(w.info.slo.priority for w in waiters)
                tenants = Counter(tenant_of(w.info) for w in waiters)
                models.append(
                    {
                        "model": model,
                        "length": len(waiters),
                        "oldest_wait_s": round(max(now - w.enqueued_at for w in waiters), 3) if waiters else 0.0,
                        "by_priority": [
                            {"priority": p, "length": n} for p, n in sorted(priorities.items(), reverse=True)
                        ],
                        "by_tenant": [{"tenant": t, "length": n} for t, n in sorted(tenants.items())],
                    }
                )
        return {"total": sum(m["length"] for m in models), "max_per_model": self.max_queue, "models": models}


def _by_instance(counter: LightCounter) -> dict[str, float]:
    """A counter labelled by instance, as {instance: value}."""
    return {sample.labels["instance"]: sample.value for family in counter.collect() for sample in family.samples}


_NUMBER = {"type": "number"}
_COUNT = {"type": "integer", "minimum": 0}
_BUCKET = {
    "type": "object",
    "required": ["start", "seconds", "finished", "judged", "met", "rejected", "attainment", "goodput_rps"],
    "properties": {
        "start": _NUMBER,
        "seconds": _NUMBER,
        "finished": _COUNT,
        "judged": _COUNT,
        "met": _COUNT,
        "rejected": _COUNT,
        "attainment": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "goodput_rps": _NUMBER,
    },
}
_ADMIN_INSTANCE = ADMIN_SCHEMAS["AdminInstance"]
CONSOLE_STATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The ops console's state (GET /console polls it): see pdgate.gateway.console",
    "required": ["object", "time", "version", "instances", "queue", "requests", "events", "plan", "discovery"],
    "properties": {
        "object": {"const": "console.state"},
        "time": _NUMBER,
        "uptime_s": {"type": ["number", "null"]},
        "version": {"type": "string"},
        "replica": {"type": ["string", "null"]},
        "instances": {
            "type": "array",
            "items": {
                # GET /admin/instances' view of an instance, its streams counted, its prefix hits added
                "type": "object",
                "required": _ADMIN_INSTANCE["required"],
                "properties": {
                    **_ADMIN_INSTANCE["properties"],
                    "streams": {
                        "type": "object",
                        "required": ["total", "moving"],
                        "properties": {"total": _COUNT, "moving": _COUNT},
                    },
                    "prefix_tokens": {"type": "object", "properties": {"queried": _COUNT, "hit": _COUNT}},
                    "prefix_hit_rate": {"type": ["number", "null"], "minimum": 0},
                },
            },
        },
        "queue": {
            "type": "object",
            "required": ["total", "max_per_model", "models"],
            "properties": {
                "total": _COUNT,
                "max_per_model": _COUNT,
                "models": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["model", "length", "oldest_wait_s", "by_priority", "by_tenant"],
                        "properties": {
                            "model": {"type": "string"},
                            "length": _COUNT,
                            "oldest_wait_s": _NUMBER,
                            "by_priority": {"type": "array", "items": {"type": "object"}},
                            "by_tenant": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
        "requests": {
            "type": "object",
            "required": ["bucket_s", "span_s", "buckets", "total"],
            "properties": {
                "bucket_s": _NUMBER,
                "span_s": _NUMBER,
                "buckets": {"type": "array", "items": _BUCKET},
                "total": _BUCKET,
            },
        },
        "events": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["time", "kind", "instances", "reason", "detail", "ok"],
                "properties": {
                    "time": _NUMBER,
                    "kind": {"enum": ["migration", "role"]},
                    "instances": {"type": "array", "items": {"type": "string"}},
                    "reason": {"type": "string"},
                    "detail": {"type": "string"},
                    "ok": {"type": "boolean"},
                },
            },
        },
        "plan": ref("AdminPlan"),
        "discovery": ref("AdminDiscovery"),
    },
}
