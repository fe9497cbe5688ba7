"""Tracing settings: what the config file and the standard ``OTEL_*`` variables ask for, and the exporter.

Resolved once at start-up (a setup that cannot work fails there, :class:`TracingSetupError`);
:class:`~pdgate.gateway.tracing.Tracing` builds the provider from the result.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdgate.common.runtime import otlp_traces_url
from pdgate.gateway.config import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

TRACE_HEADERS = ("traceparent", "tracestate")
DEFAULT_SERVICE_NAME = "pdgate"
DEFAULT_OTLP_ENDPOINT = "http://localhost:4318"


class TracingSetupError(ValueError):
    """Tracing was asked for in a way that cannot work (unknown exporter, bad sampler...)."""


@dataclass(frozen=True)
class TracingSettings:
    """Tracing as resolved from the config file and the ``OTEL_*`` environment."""

    exporter: str  # "otlp" | "console"
    endpoint: str | None  # OTLP traces URL; None: the exporter reads OTEL_EXPORTER_OTLP_* itself
    headers: dict[str, str]
    service_name: str
    sample_ratio: float | None  # None: the SDK's OTEL_TRACES_SAMPLER (default: parent-based, always on)
    propagate: bool
    record_prompt_text: bool
    plugin_spans: bool = True


def resolve_settings(config: TracingConfig, env: Mapping[str, str] = os.environ) -> TracingSettings | None:
    """What the config asks for, unset fields taken from the standard ``OTEL_*`` variables.

    Returns ``None`` when tracing is off: ``OTEL_SDK_DISABLED=true``, ``enabled: false``, or
    ``enabled`` unset and neither ``OTEL_TRACES_EXPORTER`` (other than ``none``) nor an
    ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` set. Values in the config file win over the
    environment; the OTLP exporter's other variables (headers, timeout, compression,
    certificates) and the batch processor's ``OTEL_BSP_*`` are read by the SDK itself.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    env_exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or None
    env_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    enabled = config.enabled
    if enabled is None:
        enabled = (
            (env_exporter is not None and env_exporter != "none") or bool(env_endpoint) or config.exporter is not None
        )
    if not enabled:
        return None
    exporter = config.exporter or env_exporter or "otlp"
    if exporter == "none":
        return None
    if exporter not in ("otlp", "console"):
        raise TracingSetupError(f"tracing: unknown exporter {exporter!r} (OTEL_TRACES_EXPORTER); known: otlp, console")
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    ).strip()
    if exporter == "otlp" and protocol != "http/protobuf":
        raise TracingSetupError(f"tracing: OTLP protocol {protocol!r} is not supported; pdgate exports http/protobuf")
    endpoint = otlp_traces_url(config.endpoint) if config.endpoint else None
    if endpoint is None and not env_endpoint:
        endpoint = otlp_traces_url(DEFAULT_OTLP_ENDPOINT)
    service = config.service_name or env.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    return TracingSettings(
        exporter,
        endpoint,
        dict(config.headers),
        service,
        config.sample_ratio,
        config.propagate_to_engines,
        config.record_prompt_text,
        config.plugin_spans,
    )


def make_exporter(settings: TracingSettings) -> SpanExporter:
    if settings.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=settings.service_name)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.endpoint, headers=settings.headers or None)
