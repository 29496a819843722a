"""create_app(settings) -> the Starlette app. The lifespan builds every service once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from strawberry.subscriptions import (GRAPHQL_SSE_PROTOCOL, GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL,
                                      MULTIPART_SUBSCRIPTION_PROTOCOL)

from app.api.body_limit import BodySizeLimit, WebSocketMessageLimit
from app.api.frontend import frontend_routes
from app.api.metrics import DocumentCollector, EngineCollector, metrics_endpoint, register_api_metrics
from app.api.request_ids import RequestIds
from app.api.schema import build_schema
from app.api.view import InferQLGraphQL
from app.api.websockets import Connections
from app.jobs.keys import KeyStore
from app.settings import Settings
from app.wiring import start_services

log = logging.getLogger("inferql")


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # The engine thread runs Python between torch kernels and holds the GIL meanwhile;
        # a short switch interval keeps the event loop's requests from queueing behind it.
        sys.setswitchinterval(settings.gil_switch_interval)
        services = await start_services(settings)
        keys, db, engine = services.keys, services.db, services.engine
        # Open websockets of a revoked key are closed by a sweep that asks the database itself
        # (a cached lookup would add up to key_cache_seconds to the delay).
        uncached_keys = KeyStore(db, keys.defaults, cache_seconds=0)
        interval = max(settings.key_cache_seconds / 2, 0.1) if settings.key_cache_seconds > 0 else 1.0
        sweeper = asyncio.get_running_loop().create_task(
            graphql.connections.sweep_forever(uncached_keys.authenticate, interval))
        registry = CollectorRegistry()
        if engine is not None:  # an API-only replica runs none
            registry.register(EngineCollector(engine))
        registry.register(DocumentCollector())
        register_api_metrics(registry)
        app.state.services, app.state.db, app.state.engine, app.state.registry = services, db, engine, registry
        # Startup left ~500k long-lived objects (torch, transformers, the schema). A full
        # collection walks them all, stalling every request for ~250 ms; frozen, they are
        # skipped and a collection sees only what requests create.
        gc.collect()
        gc.freeze()
        log.info("InferQL ready on http://%s:%s/graphql", settings.host, settings.port)
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await services.stop()

    graphql = InferQLGraphQL(
        build_schema(settings),
        graphql_ide="graphiql" if settings.graphiql_enabled else None,
        subscription_protocols=[GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL,
                                GRAPHQL_SSE_PROTOCOL, MULTIPART_SUBSCRIPTION_PROTOCOL],
        connection_init_wait_timeout=_timedelta(settings.connection_init_wait_timeout),
        allowed_origins=settings.allowed_origins,
        auth_on=settings.auth == "on",
        max_subscriptions=settings.max_subscriptions_per_connection,
        connections=Connections(max_per_key=settings.max_ws_per_key,
                                max_unauthenticated_per_address=settings.max_ws_unauthenticated_per_address),
    )

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        state = request.app.state
        checks = {
            "model": getattr(state, "engine", None) is not None or settings.role == "api",
            "database": getattr(state, "db", None) is not None and await state.db.ping(),
        }
        ok = all(checks.values())
        return JSONResponse({"status": "ready" if ok else "not ready", **checks}, status_code=200 if ok else 503)

    async def metrics(request: Request):
        return await metrics_endpoint(request.app.state.registry)(request)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/graphql", graphql, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql),
            *(frontend_routes() if settings.graphiql_enabled else []),
        ],
        lifespan=lifespan,
        # CORS for browsers on the origins the websockets accept too (INFERQL_ALLOWED_ORIGINS);
        # outermost, so preflights and refusals (413...) carry its headers. Request ids next.
        middleware=[Middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                               allow_methods=["GET", "POST"], allow_headers=["*"], expose_headers=["X-Request-ID"],
                               max_age=600),
                    Middleware(RequestIds),
                    Middleware(BodySizeLimit, max_bytes=settings.max_body_bytes),
                    Middleware(WebSocketMessageLimit, max_bytes=settings.max_body_bytes)],
    )


def _timedelta(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)
