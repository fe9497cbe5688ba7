"""OpenTelemetry tracing of the request path: one trace per request, one span per stage.

The spans of one request (a PD request; a colocated one has a ``pdgate.generate`` leg instead
of the prefill and decode legs)::

    pdgate.request              SERVER; child of the client's traceparent when it sends one
    ├── pdgate.admission        the admitter's verdict and the wait in the gateway's queue
    ├── pdgate.schedule         one per attempt (a retry schedules again)
    │   ├── pdgate.schedule.prefill     one per profile run: the instance chosen, candidates
    │   │   └── pdgate.plugin.<name>    one per plugin call, built from the framework's timings
    │   └── pdgate.schedule.decode
    ├── pdgate.prefill          CLIENT: the prefill leg (the engine gets this span's traceparent)
    └── pdgate.decode           CLIENT: the decode leg (traceparent too)
        └── pdgate.kv_transfer  decode leg sent -> first token: the KV hand-off (streamed requests)

Attribute names are listed in docs/observability.md. No prompt or completion text is recorded
unless ``tracing.record_prompt_text`` is set (then the prompt's text, never the completion's).

With tracing off the proxy gets :data:`NO_TRACE`, whose methods do nothing, so an untraced
request pays a few empty method calls and no OpenTelemetry code runs (the SDK is not even
imported). The provider, its batch exporter and its thread are owned by :class:`Tracing`;
:meth:`Tracing.close` flushes and shuts them down. What tracing is asked for (config and
``OTEL_*``) is resolved in :mod:`pdgate.gateway.tracing_setup`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pdgate.gateway.config import TracingConfig
from pdgate.gateway.tracing_setup import (
    DEFAULT_SERVICE_NAME,
    TracingSettings,
    make_exporter,
    resolve_settings,
)

LORA_ADAPTER_ATTRIBUTE = "pdgate.lora.adapter"
"""The LoRA adapter a request is for (its ``model`` names it), on the request span and its legs."""
LORA_LOADED_ATTRIBUTE = "pdgate.lora.loaded"
"""On a leg's span: the gateway loaded the request's adapter on that instance just before the leg."""

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from pdgate.gateway.admission import Outcome
    from pdgate.gateway.instance_state import InstanceState
    from pdgate.scheduler.framework import Decision


class Tracing:
    """The gateway's tracer provider and the factory of per-request traces."""

    def __init__(self, provider: TracerProvider, settings: TracingSettings) -> None:
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        self.provider = provider
        self.settings = settings
        self.tracer = provider.get_tracer("pdgate.gateway")
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_config(
        cls, config: TracingConfig, env: Mapping[str, str] = os.environ, *, exporter: SpanExporter | None = None
    ) -> Tracing | None:
        """The configured tracing, or ``None`` when it is off.

        ``exporter`` replaces the configured one and is fed synchronously (tests read the
        spans as soon as a request ends); otherwise spans are batched to the exporter.
        """
        settings = resolve_settings(config, env)
        if settings is None:
            if exporter is None:
                return None
            settings = TracingSettings(
                "custom",
                None,
                {},
                config.service_name or DEFAULT_SERVICE_NAME,
                config.sample_ratio,
                config.propagate_to_engines,
                config.record_prompt_text,
                config.plugin_spans,
            )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SimpleSpanProcessor,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        from pdgate.common.version import package_version

        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio)) if settings.sample_ratio is not None else None
        resource = Resource.create(
            {"service.name": settings.service_name, "service.version": package_version() or "unknown"}
        )
        provider = TracerProvider(sampler=sampler, resource=resource, shutdown_on_exit=False)
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            provider.add_span_processor(BatchSpanProcessor(make_exporter(settings)))
        return cls(provider, settings)

    def start_request(self, route: str, headers: Mapping[str, str]) -> SpanTrace:
        """The root span of a request, continuing the client's trace when it sent a traceparent."""
        from opentelemetry.trace import SpanKind

        parent = self.propagator.extract(headers) if "traceparent" in headers else None
        span = self.tracer.start_span(
            "pdgate.request",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": route},
        )
        return SpanTrace(self, span)

    def event(self, name: str, attributes: Mapping[str, Any]) -> None:
        """A fleet event that belongs to no request (a role change, a scaling action): a span of its own."""
        self.tracer.start_span(name, attributes=_clean(attributes)).end()

    async def close(self) -> None:
        """Export what is buffered and stop the exporter's thread (off the event loop)."""
        await asyncio.to_thread(self.provider.shutdown)


# ------------------------------------------------------------------------- per request
class LegTrace:
    """The span of one engine call. This base is the untraced one: no headers, no span."""

    headers: dict[str, str] | None = None

    def first_token(self) -> None:
        """The leg's first answer byte arrived (ends its KV-transfer span, if it has one)."""

    def end(
        self,
        *,
        status: int | None = None,
        error: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        **more: Any,
    ) -> None:
        """The leg is over; ``error`` marks it failed (with the reason); ``attributes`` (dotted names)
        and ``more`` go on its span."""


class RequestTrace:
    """The spans of one request. This base is what an untraced request gets: every method is empty.

    ``enabled`` lets a caller skip building attributes nobody will record.
    """

    enabled: bool = False
    trace_id: str | None = None

    def validated(self, attributes: Mapping[str, Any], prompt_text: str | None) -> None:
        """The request parsed: its model, sizes, SLO and the output-length prediction."""

    def admission_started(self) -> None: ...

    def admitted(self, outcome: Outcome) -> None:
        """Admission let the request go (now, after queueing, or degraded to best effort)."""

    def admission_rejected(self, status: int, reason: str) -> None: ...

    def scheduled(
        self, attempt: int, started: float, ended: float, decisions: Iterable[Decision], attributes: Mapping[str, Any]
    ) -> None:
        """One placement: ``started``/``ended`` on ``time.perf_counter``, the profiles' decisions."""

    def leg(
        self,
        phase: str,
        instance: InstanceState,
        attributes: Mapping[str, Any],
        kv_transfer: Mapping[str, Any] | None = None,
    ) -> LegTrace:
        """Open the span of an engine call (``phase``: prefill, decode or generate).

        With ``kv_transfer`` the leg also gets a ``pdgate.kv_transfer`` child that lasts until
        :meth:`LegTrace.first_token`.
        """
        return NO_LEG

    def retry(self, attempt: int, instance_id: str, reason: str) -> None: ...

    def migration(self, attributes: Mapping[str, Any]) -> LegTrace:
        """Open the span of one move of the running request (migration or failover); end it
        with the outcome."""
        return NO_LEG

    def finish(self, status: int, attributes: Mapping[str, Any], error: str | None = None) -> None:
        """The request is over (answered, failed or abandoned by its client)."""


NO_LEG = LegTrace()
NO_TRACE = RequestTrace()


class SpanLeg(LegTrace):
    def __init__(self, trace: SpanTrace, span: Span, kv: Span | None) -> None:
        self.trace = trace
        self.span = span
        self.kv = kv
        self.ended = False
        if trace.tracing.settings.propagate:
            carrier: dict[str, str] = {}
            trace.tracing.propagator.inject(carrier, context=_context_of(span))
            self.headers = carrier

    def first_token(self) -> None:
        if self.kv is not None:
            self.kv.end()
            self.kv = None

    def end(
        self,
        *,
        status: int | None = None,
        error: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        **more: Any,
    ) -> None:
        if self.ended:
            return
        attributes = {**attributes, **more} if attributes else more
        self.ended = True
        span = self.span
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if attributes:
            span.set_attributes(_clean(attributes))
        if error is not None:
            _fail(span, error)
            if self.kv is not None:
                _fail(self.kv, error)
        if self.kv is not None:
            self.kv.end()
            self.kv = None
        span.end()


class SpanTrace(RequestTrace):
    """A traced request (its root span may be unsampled: then nothing is recorded, only propagated)."""

    enabled = True

    def __init__(self, tracing: Tracing, root: Span) -> None:
        self.tracing = tracing
        self.root = root
        self.context = _context_of(root)
        self.trace_id = format(root.get_span_context().trace_id, "032x")
        self._admission_ns = 0
        self._ended = False

    def _child(
        self,
        name: str,
        *,
        start_ns: int | None = None,
        attributes: Mapping[str, Any] | None = None,
        kind: Any = None,
        context: Any = None,
    ) -> Span:
        from opentelemetry.trace import SpanKind

        return self.tracing.tracer.start_span(
            name,
            context=context or self.context,
            kind=kind or SpanKind.INTERNAL,
            attributes=_clean(attributes) if attributes else None,
            start_time=start_ns,
        )

    def validated(self, attributes: Mapping[str, Any], prompt_text: str | None) -> None:
        self.root.set_attributes(_clean(attributes))
        if prompt_text is not None and self.tracing.settings.record_prompt_text:
            self.root.set_attribute("gen_ai.prompt", prompt_text)

    def admission_started(self) -> None:
        self._admission_ns = time.time_ns()

    def admitted(self, outcome: Outcome) -> None:
        verdict = outcome.verdict
        attributes: dict[str, Any] = {
            "pdgate.admission.outcome": outcome.action,
            "pdgate.admission.reason": outcome.reason,
            "pdgate.queued_s": outcome.queued_s,
        }
        if verdict is not None:
            attributes["pdgate.ttft_predicted_s"] = verdict.predicted_ttft_s
            attributes["pdgate.tpot_predicted_s"] = verdict.predicted_tpot_s
        self._child("pdgate.admission", start_ns=self._admission_ns or None, attributes=attributes).end()

    def admission_rejected(self, status: int, reason: str) -> None:
        span = self._child(
            "pdgate.admission",
            start_ns=self._admission_ns or None,
            attributes={"pdgate.admission.outcome": "reject", "pdgate.admission.reason": reason},
        )
        _fail(span, reason)
        span.end()
        self.root.set_attribute("pdgate.reject_reason", reason)

    def scheduled(
        self, attempt: int, started: float, ended: float, decisions: Iterable[Decision], attributes: Mapping[str, Any]
    ) -> None:
        offset = time.time_ns() - time.perf_counter_ns()

        def ns(t: float) -> int:
            return int(t * 1e9) + offset

        from pdgate.scheduler.framework import plugin_kind

        schedule = self._child(
            "pdgate.schedule", start_ns=ns(started), attributes={"pdgate.attempt": attempt, **attributes}
        )
        inner = _context_of(schedule)
        for decision in decisions:
            calls = decision.calls
            first = calls[0][1] if calls else started
            last = calls[-1][2] if calls else ended
            profile = self._child(
                f"pdgate.schedule.{decision.profile}",
                start_ns=ns(first),
                context=inner,
                attributes={
                    "pdgate.profile": decision.profile,
                    "pdgate.instance": decision.instance_id,
                    "pdgate.candidates": decision.candidates,
                    "pdgate.rejected_by": decision.rejected_by,
                    "pdgate.score": decision.scores.get(decision.instance_id) if decision.instance_id else None,
                },
            )
            within = _context_of(profile) if self.tracing.settings.plugin_spans else None
            for plugin, t0, t1, left in calls:
                attributes = {
                    "pdgate.plugin.name": plugin.name,
                    "pdgate.plugin.type": plugin.type_name,
                    "pdgate.plugin.kind": plugin_kind(type(plugin)),
                    "pdgate.candidates": left,
                }
                if within is None:  # the cheaper form: an event per call on the profile's span
                    profile.add_event(
                        f"pdgate.plugin.{plugin.name}", {**attributes, "pdgate.duration_s": t1 - t0}, timestamp=ns(t0)
                    )
                else:
                    self._child(
                        f"pdgate.plugin.{plugin.name}", start_ns=ns(t0), context=within, attributes=attributes
                    ).end(end_time=ns(t1))
            profile.end(end_time=ns(last))
        schedule.end(end_time=ns(ended))

    def leg(
        self,
        phase: str,
        instance: InstanceState,
        attributes: Mapping[str, Any],
        kv_transfer: Mapping[str, Any] | None = None,
    ) -> LegTrace:
        from opentelemetry.trace import SpanKind

        spec = instance.spec
        span = self._child(
            f"pdgate.{phase}",
            kind=SpanKind.CLIENT,
            attributes={
                "pdgate.instance": spec.id,
                "pdgate.instance.role": spec.role,
                "pdgate.engine.kind": spec.kind,
                "server.address": spec.host,
                "url.full": spec.url,
                **attributes,
            },
        )
        kv = None
        if kv_transfer is not None:
            kv = self._child("pdgate.kv_transfer", context=_context_of(span), attributes=kv_transfer)
        return SpanLeg(self, span, kv)

    def migration(self, attributes: Mapping[str, Any]) -> LegTrace:
        return SpanLeg(self, self._child("pdgate.migration", attributes=attributes), None)

    def retry(self, attempt: int, instance_id: str, reason: str) -> None:
        self.root.add_event(
            "pdgate.retry", {"pdgate.attempt": attempt, "pdgate.instance": instance_id, "pdgate.reason": reason}
        )

    def finish(self, status: int, attributes: Mapping[str, Any], error: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        root = self.root
        root.set_attribute("http.response.status_code", status)
        if attributes:
            root.set_attributes(_clean(attributes))
        if error is not None:
            root.set_attribute("error.type", error)
            if status >= 500 or status == 0:
                _fail(root, error)
        root.end()


def _context_of(span: Span) -> Any:
    from opentelemetry.trace import set_span_in_context

    return set_span_in_context(span)


def _fail(span: Span, reason: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, reason))


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OpenTelemetry attributes: ``None`` values dropped (the API rejects them)."""
    return {k: v for k, v in attributes.items() if v is not None}
