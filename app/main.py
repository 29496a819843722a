"""create_app(settings) -> the Starlette app. The lifespan builds every service once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sys

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL
from strawberry.types.unset import UNSET

from app.api.auth import HOW_TO, identify, key_from
from app.api.limits import BodySizeLimit, WebSocketMessageLimit
from app.api.metrics import DocumentCollector, EngineCollector, metrics_endpoint
from app.api.websockets import (
    Connections,
    LegacyWSHandler,
    TransportWSHandler,
    WebSocketAdapter,
    refuse_crowded,
)
from app.api.schema import build_schema
from app.jobs.keys import KeyStore
from app.settings import Settings
from app.wiring import start_services

log = logging.getLogger("inferql")


_UNKNOWN = object()


class InferQLGraphQL(GraphQL):
    """The GraphQL view: identifies the caller once per HTTP request or websocket connection.

    Over HTTP the key is checked before anything else (only a hash lookup): a request
    without a valid one is answered UNAUTHENTICATED without its body being read, let alone
    its document parsed or validated. A websocket is checked at connection_init, before
    any of its operations (both protocols refuse operations before the ack).
    """

    websocket_adapter_class = WebSocketAdapter
    graphql_transport_ws_handler_class = TransportWSHandler
    graphql_ws_handler_class = LegacyWSHandler

    def __init__(self, *args, auth_on: bool, max_subscriptions: int, connections: Connections, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.auth_on = auth_on
        self.max_subscriptions = max_subscriptions
        self.connections = connections

    async def run(self, request, context=UNSET, root_value=UNSET):
        if self.is_websocket_request(request):
            return await self._run_websocket(request, context, root_value)
        if self.auth_on:
            adapter = self.request_adapter_class(request)
            # Requests strawberry answers without GraphQL (405, the GraphiQL page or its 404) pass.
            if self.is_request_allowed(adapter) and not self.should_render_graphql_ide(adapter):
                caller = await identify(request.app.state.services.access, True, key_from(request.headers))
                request.state.caller = caller
                if caller is None:
                    return JSONResponse({"data": None, "errors": [{
                        "message": f"a valid API key is required: {HOW_TO}",
                        "extensions": {"code": "UNAUTHENTICATED"},
                    }]})
        return await super().run(request, context, root_value)

    async def _run_websocket(self, websocket, context, root_value):
        conn = self.connections.open(websocket)
        if conn is None:
            await refuse_crowded(websocket, self.connections.max_unauthenticated_per_address)
            return websocket
        websocket.state.connection = conn
        try:
            return await super().run(websocket, context, root_value)
        finally:
            self.connections.forget(conn)

    async def get_context(self, request, response=None):
        services = request.app.state.services
        caller = None
        connection = None
        if isinstance(request, Request):  # a websocket's caller is set by on_ws_connect
            caller = getattr(request.state, "caller", _UNKNOWN)  # run() may have identified it
            if caller is _UNKNOWN:
                caller = await identify(services.access, self.auth_on, key_from(request.headers))
                request.state.caller = caller
        else:
            connection = getattr(request.state, "connection", None)
        return {"access": services.access, "jobs": services.jobs, "reviews": services.reviews,
                "classifier": services.classifier, "model": services.model, "request": request, "response": response, "caller": caller,
                "max_subscriptions": self.max_subscriptions, "connection": connection}

    def decode_json(self, data):
        """Request bodies and websocket messages: a JSON object or list of valid Unicode.

        Anything else (bad UTF-8, a lone surrogate, nesting past the recursion limit, a bare
        scalar) is reported as unparseable JSON: 400 over HTTP, close 4400 on a websocket.
        """
        try:
            value = json.loads(data)
            json.dumps(value, ensure_ascii=False).encode()  # raises on lone surrogates
        except json.JSONDecodeError:
            raise
        except (ValueError, RecursionError) as exc:
            raise json.JSONDecodeError(f"not valid JSON text ({type(exc).__name__})", "", 0) from None
        if not isinstance(value, (dict, list)):
            raise json.JSONDecodeError("expected a JSON object", "", 0)
        return value

    async def on_ws_connect(self, context):
        """Authenticates the connection_init payload; a bad or missing key closes with 4403."""
        access = context["access"]
        key = key_from(context.get("connection_params")) or key_from(context["request"].headers)
        caller = await identify(access, self.auth_on, key)
        if caller is None:
            raise ConnectionRejectionError({"message": f"a valid API key is required: {HOW_TO}"})
        if context.get("connection") is not None:
            self.connections.authenticated(context["connection"], caller, key)  # ConnectionLimit: closes 4429
        context["caller"] = caller
        return {"rateLimit": await access.rate_state(caller)}

    async def process_result(self, request, result):
        """Every HTTP response tells the caller where it stands against its limits."""
        body = await super().process_result(request, result)
        caller = getattr(request.state, "caller", None)
        if caller is not None:
            state = await request.app.state.services.access.rate_state(caller)
            if state is not None:
                body.setdefault("extensions", {})["rateLimit"] = state
        return body


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
        registry.register(EngineCollector(engine))
        registry.register(DocumentCollector())
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
            await engine.stop()
            await db.dispose()

    graphql = InferQLGraphQL(
        build_schema(settings),
        graphql_ide="graphiql" if settings.graphiql_enabled else None,
        subscription_protocols=[GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL],
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
            "model": getattr(state, "engine", None) is not None,
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
        ],
        lifespan=lifespan,
        middleware=[Middleware(BodySizeLimit, max_bytes=settings.max_body_bytes),
                    Middleware(WebSocketMessageLimit, max_bytes=settings.max_body_bytes)],
    )


def _timedelta(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)
