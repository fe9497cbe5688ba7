"""An in-process OTLP/HTTP trace receiver for tests: ``async with OtlpReceiver() as rx: ...``.

It answers ``POST /v1/traces`` (protobuf ``ExportTraceServiceRequest``, gzip-compressed when the
request says ``Content-Encoding: gzip``) with an empty ``ExportTraceServiceResponse`` and keeps
every span it was sent, decoded into :class:`ReceivedSpan`. It binds 127.0.0.1 on a free port
and runs on the test's own event loop.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from support.waiting import wait_until_async

PROTOBUF = "application/x-protobuf"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class ReceivedSpan:
    """One exported span; ids as lowercase hex, enums as their proto values."""

    name: str
    trace_id: str  # 32 lowercase hex
    span_id: str  # 16 hex
    parent_span_id: str | None  # 16 hex, None for a root span
    kind: int  # SPAN_KIND_INTERNAL=1, SERVER=2, CLIENT=3
    attributes: dict[str, Any]
    start_ns: int
    end_ns: int
    status_code: int  # STATUS_CODE_UNSET=0, OK=1, ERROR=2
    events: list[tuple[str, dict[str, Any]]]
    service_name: str | None  # the resource's service.name


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(items: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


def decode_spans(export: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Flatten an export request's resource/scope/span tree into :class:`ReceivedSpan` objects."""
    spans: list[ReceivedSpan] = []
    for resource_spans in export.resource_spans:
        service = _attributes(resource_spans.resource.attributes).get("service.name")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        kind=int(span.kind),
                        attributes=_attributes(span.attributes),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status_code=int(span.status.code),
                        events=[(event.name, _attributes(event.attributes)) for event in span.events],
                        service_name=service,
                    )
                )
    return spans


class OtlpReceiver:
    """async with OtlpReceiver() as rx: ... ; rx.endpoint is 'http://127.0.0.1:PORT' (base URL, no path)"""

    def __init__(self) -> None:
        self.endpoint = ""
        self.traces_url = ""
        self.spans: list[ReceivedSpan] = []
        self.requests = 0  # export POSTs received
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.traces_url = self.endpoint + "/v1/traces"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if request.headers.get("Content-Encoding", "").lower() == "gzip" and body[:2] == GZIP_MAGIC:
            body = gzip.decompress(body)  # aiohttp's parser usually inflated it already
        export = ExportTraceServiceRequest()
        try:
            export.ParseFromString(body)
        except Exception as exc:
            return web.Response(status=400, text=f"cannot decode ExportTraceServiceRequest: {exc}")
        self.spans.extend(decode_spans(export))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type=PROTOBUF)

    async def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """Poll until ``predicate(spans)`` holds and return the spans; AssertionError on timeout."""
        await wait_until_async(
            lambda: predicate(self.spans), timeout, interval=0.05, message=lambda: f"matching spans; {self.summary()}"
        )
        return self.spans

    def summary(self) -> str:
        """The spans seen so far, one line each (for failure messages)."""
        lines = [f"{self.requests} export request(s), {len(self.spans)} span(s)"]
        lines += [
            f"  {s.name} trace={s.trace_id} span={s.span_id} parent={s.parent_span_id} "
            f"status={s.status_code} service={s.service_name}"
            for s in self.spans
        ]
        return "\n".join(lines)
