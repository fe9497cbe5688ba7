"""One OpenTelemetry span per generation request, as vLLM emits with ``--otlp-traces-endpoint``.

Mirrors vLLM v1 (``vllm/tracing/``, ``OutputProcessor.do_tracing``): a span named
``llm_request``, kind SERVER, whose parent is the W3C ``traceparent``/``tracestate`` the request
came with (a root span without one), started when the request reached the engine and carrying
vLLM's ``gen_ai.*`` attribute names. Unlike vLLM, which traces only requests that finish
normally, the sim also ends the span of an aborted (client gone) or failed request, with status
ERROR and the reason as the status description.

Timestamps are wall-clock (they line up with the spans of the gateway and the client); latency
attributes are in simulated seconds, like every other time the sim reports (``/metrics``).

This module imports the OpenTelemetry SDK at import time: the engine imports it only when
tracing is configured, so an engine without the flag pays nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pdgate.common.runtime import otlp_traces_url
from pdgate.engines.sim.request import RequestStatus, SimRequest

logger = logging.getLogger(__name__)

SPAN_NAME = "llm_request"
DEFAULT_SERVICE_NAME = "pdgate-sim"


class SpanAttributes:
    """vLLM's span attribute names (``vllm.tracing.utils.SpanAttributes``), the ones the sim sets."""

    GEN_AI_REQUEST_ID = "gen_ai.request.id"
    GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
    GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
    GEN_AI_REQUEST_N = "gen_ai.request.n"
    GEN_AI_USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
    GEN_AI_USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
    GEN_AI_LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
    GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
    GEN_AI_LATENCY_E2E = "gen_ai.latency.e2e"
    GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL = "gen_ai.latency.time_in_model_prefill"
    GEN_AI_LATENCY_TIME_IN_MODEL_DECODE = "gen_ai.latency.time_in_model_decode"
    GEN_AI_LATENCY_TIME_IN_MODEL_INFERENCE = "gen_ai.latency.time_in_model_inference"


@dataclass
class _OpenSpan:
    """What is known about a request when it arrives; the span is emitted when it finishes."""

    context: Context
    start_ns: int
    attributes: dict[str, Any]


class RequestTracer:
    """Emits an ``llm_request`` span per request through its own provider (never the global one).

    :meth:`begin` when a request was submitted, :meth:`finish` from the core's ``on_finish``
    callback, :meth:`shutdown` (blocking: flushes queued spans) when the engine stops.
    ``sim_now`` is the engine's simulated clock, for the latency of requests ended early.
    """

    def __init__(self, endpoint: str, sim_now: Callable[[], float]) -> None:
        self.url = otlp_traces_url(endpoint)
        service = os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
        self._provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.url)))
        self._tracer = self._provider.get_tracer("engines.sim")
        self._propagator = TraceContextTextMapPropagator()
        self._sim_now = sim_now
        self._open: dict[str, _OpenSpan] = {}

    def begin(
        self,
        req: SimRequest,
        *,
        request_id: str,
        traceparent: str | None,
        tracestate: str | None,
        start_ns: int,
        top_p: float | None,
    ) -> None:
        """Remember a submitted request: its parent context, arrival time and request parameters."""
        carrier = {}
        if traceparent is not None:
            carrier["traceparent"] = traceparent
            if tracestate is not None:
                carrier["tracestate"] = tracestate
        attributes: dict[str, Any] = {
            SpanAttributes.GEN_AI_REQUEST_ID: request_id,
            SpanAttributes.GEN_AI_REQUEST_MAX_TOKENS: req.sampling.max_tokens,
            SpanAttributes.GEN_AI_REQUEST_TOP_P: 1.0 if top_p is None else top_p,
            SpanAttributes.GEN_AI_REQUEST_N: 1,
        }
        if req.sampling.temperature:  # vLLM leaves a zero temperature out
            attributes[SpanAttributes.GEN_AI_REQUEST_TEMPERATURE] = req.sampling.temperature
        self._open[req.request_id] = _OpenSpan(self._propagator.extract(carrier), start_ns, attributes)

    def finish(self, req: SimRequest) -> None:
        """Emit the span of a finished request (any status); never raises into the step loop."""
        open_span = self._open.pop(req.request_id, None)
        if open_span is None:
            return
        try:
            self._emit(req, open_span, time.time_ns())
        except Exception:  # a tracing fault must not take the engine down
            logger.exception("cannot emit the span of request %s", req.request_id)

    def _emit(self, req: SimRequest, open_span: _OpenSpan, end_ns: int) -> None:
        attributes = open_span.attributes
        attributes.update(_latencies(req, self._sim_now()))
        attributes[SpanAttributes.GEN_AI_USAGE_PROMPT_TOKENS] = req.num_prompt_tokens
        attributes[SpanAttributes.GEN_AI_USAGE_COMPLETION_TOKENS] = req.num_output_tokens
        span = self._tracer.start_span(
            SPAN_NAME,
            context=open_span.context,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=open_span.start_ns,
        )
        if req.status is RequestStatus.FINISHED_ABORTED:
            span.set_status(Status(StatusCode.ERROR, "aborted"))
        elif req.status is RequestStatus.FINISHED_ERROR:
            span.set_status(Status(StatusCode.ERROR, req.error or "error"))
        span.end(end_time=max(end_ns, open_span.start_ns))

    def shutdown(self) -> None:
        """Export every queued span and stop the exporter thread (blocking)."""
        self._open.clear()
        self._provider.shutdown()


def _latencies(req: SimRequest, sim_now: float) -> dict[str, float]:
    """vLLM's latency breakdown in simulated seconds, for the phases the request reached."""
    normal = req.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
    end = req.last_token_time if normal and req.last_token_time is not None else sim_now
    out = {SpanAttributes.GEN_AI_LATENCY_E2E: end - req.arrival_time}
    scheduled, first, last = req.first_scheduled_time, req.first_token_time, req.last_token_time
    if scheduled is not None:
        out[SpanAttributes.GEN_AI_LATENCY_TIME_IN_QUEUE] = scheduled - req.arrival_time
    if first is not None:
        out[SpanAttributes.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN] = first - req.arrival_time
        if scheduled is not None:
            out[SpanAttributes.GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL] = first - scheduled
    if first is not None and last is not None:
        out[SpanAttributes.GEN_AI_LATENCY_TIME_IN_MODEL_DECODE] = last - first
        if scheduled is not None:
            out[SpanAttributes.GEN_AI_LATENCY_TIME_IN_MODEL_INFERENCE] = last - scheduled
    return out
