"""OpenTelemetry tracing through strawberry's extension (the optional `otel` extra): an
operation makes spans, caught here by an in-memory exporter; OTEL_EXPORTER_OTLP_ENDPOINT
turns the OTLP exporter on, and without it there is no tracing."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk", reason="OpenTelemetry is the optional `otel` extra (pip install -e '.[otel]')")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from app.api import tracing  # noqa: E402
from app.api.schema import build_schema  # noqa: E402
from app.settings import Settings  # noqa: E402


async def test_an_operation_is_traced_with_the_given_provider():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    schema = build_schema(Settings(_env_file=None), tracer_provider=provider)
    result = await schema.execute("query Hello { __typename }")
    assert result.errors is None and result.data == {"__typename": "Query"}
    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert "GraphQL Query: Hello" in names, names
    operation = next(s for s in spans if s.name == "GraphQL Query: Hello")
    assert operation.attributes["component"] == "graphql"
    assert "query Hello" in operation.attributes["query"]
    assert {"GraphQL Parsing", "GraphQL Validation"} <= set(names)


def test_the_endpoint_variable_turns_the_otlp_exporter_on(monkeypatch):
    monkeypatch.setattr(tracing, "_provider", None)
    assert tracing.provider_from_env({}) is None
    assert build_schema(Settings(_env_file=None), trace_from_env=False)  # nothing read from the environment
    provider = tracing.provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SERVICE_NAME": "x"})
    try:
        assert provider.resource.attributes["service.name"] == "x"
        assert isinstance(provider, TracerProvider)
        assert tracing.provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}) is provider
    finally:
        provider.shutdown()
