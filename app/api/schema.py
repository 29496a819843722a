"""The schema: the three roots and the extensions that guard them (errors, document limits)."""

from __future__ import annotations

import strawberry
from strawberry.extensions import DisableIntrospection

from app.settings import Settings

from .errors import ErrorCodes
from .limits import DocumentLimitSettings, document_limits
from .mutations import Mutation
from .queries import Query
from .subscriptions import Subscription


def build_schema(settings: Settings | None = None) -> strawberry.Schema:
    settings = settings or Settings()
    production = settings.env == "production"
    extensions = [
        (lambda: ErrorCodes(hide_suggestions=True)) if production else ErrorCodes,
        *document_limits(DocumentLimitSettings(
            max_depth=settings.max_query_depth, max_aliases=settings.max_aliases, max_tokens=settings.max_query_tokens,
            max_directives=settings.max_directives, max_cost=settings.max_query_cost,
        )),
    ]
    if not settings.introspection_enabled:
        extensions.append(DisableIntrospection)
    return strawberry.Schema(query=Query, mutation=Mutation, subscription=Subscription, extensions=extensions)


schema = build_schema(Settings(_env_file=None, env="development"))
