"""The schema: the three roots and the extensions that guard and observe them (metrics,
errors, document limits, optional tracing)."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.extensions import DisableIntrospection

from app.settings import Settings

from .errors import ErrorCodes
from .execution import InferQLExecutor, LeanExtensionsRunner
from .limits import DocumentLimitSettings, document_limits
from .mutations import Mutation
from .observe import ObserveOperations, log_errors
from .queries import Query
from .subscriptions import Subscription
from .tracing import provider_from_env, tracing_extension


class InferQLSchema(strawberry.Schema):
    def process_errors(self, errors, execution_context=None) -> None:
        """Client errors at INFO without a traceback, server errors at ERROR with one."""
        log_errors(errors)

    def create_extensions_runner(self, execution_context, extensions) -> LeanExtensionsRunner:
        return LeanExtensionsRunner(execution_context=execution_context, extensions=extensions)


def build_schema(settings: Settings | None = None, *, tracer_provider: Any | None = None,
                 trace_from_env: bool = True) -> strawberry.Schema:
    """tracer_provider: an OpenTelemetry TracerProvider to trace operations with; without
    one (and with trace_from_env), one exporting to OTEL_EXPORTER_OTLP_ENDPOINT when that
    is set (app/api/tracing.py)."""
    settings = settings or Settings()
    production = settings.env == "production"
    extensions = [
        ObserveOperations,  # first: it sees the errors once ErrorCodes has coded them
        (lambda: ErrorCodes(hide_suggestions=True)) if production else ErrorCodes,
        *document_limits(DocumentLimitSettings(
            max_depth=settings.max_query_depth, max_aliases=settings.max_aliases, max_tokens=settings.max_query_tokens,
            max_directives=settings.max_directives, max_cost=settings.max_query_cost,
        )),
    ]
    if not settings.introspection_enabled:
        extensions.append(DisableIntrospection)
    if tracer_provider is None and trace_from_env:
        tracer_provider = provider_from_env()
    if (tracing := tracing_extension(tracer_provider)) is not None:
        extensions.append(tracing)
    return InferQLSchema(query=Query, mutation=Mutation, subscription=Subscription, extensions=extensions,
                         execution_context_class=InferQLExecutor)


schema = build_schema(Settings(_env_file=None, env="development"), trace_from_env=False)
