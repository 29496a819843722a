"""OpenTelemetry tracing through strawberry's OpenTelemetryExtension (optional: the
`otel` extra). On when OTEL_EXPORTER_OTLP_ENDPOINT is set: spans go to that OTLP/HTTP
endpoint (the exporter reads the standard OTEL_* variables: headers, timeout...), named
by OTEL_SERVICE_NAME (default `inferql`)."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("inferql.api")

_provider: Any = None  # one per process, made on first need


def provider_from_env(environ: dict[str, str] | None = None) -> Any | None:
    """A TracerProvider exporting over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set;
    None when it is not, or when the `otel` extra is not installed (said once in the log)."""
    global _provider
    environ = os.environ if environ is None else environ
    if not environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    if _provider is not None:
        return _provider
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed "
                    "(pip install 'inferql[otel]'): tracing is off")
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "inferql")}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider = provider
    return provider


def tracing_extension(provider: Any | None):
    """The schema extension factory that traces each operation (and its resolvers) with
    `provider`; None without one."""
    if provider is None:
        return None
    from strawberry.extensions.tracing import OpenTelemetryExtension

    return lambda: OpenTelemetryExtension(tracer_provider=provider)
