"""The GraphQL view over HTTP and websockets: the caller is identified before anything
else, and every HTTP answer carries the caller's rate-limit state."""

from __future__ import annotations

import json
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.types.unset import UNSET

from .auth import HOW_TO, identify, key_from
from .context import Context
from .metrics import REQUESTS
from .websockets import Connections, LegacyWSHandler, TransportWSHandler, WebSocketAdapter, refuse_crowded


log = logging.getLogger("inferql.api")

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
                    log.info("client error UNAUTHENTICATED: no valid API key on an HTTP request")
                    REQUESTS.labels("unknown", "UNAUTHENTICATED").inc()
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
        return Context(access=services.access, jobs=services.jobs, batches=services.batches,
                       reviews=services.reviews, classifier=services.classifier, model=services.model,
                       request=request, response=response, caller=caller,
                       max_subscriptions=self.max_subscriptions, connection=connection)

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

    async def on_ws_connect(self, context: Context):
        """Authenticates the connection_init payload; a bad or missing key closes with 4403."""
        key = key_from(context.connection_params) or key_from(context.request.headers)
        caller = await identify(context.access, self.auth_on, key)
        if caller is None:
            log.info("client error UNAUTHENTICATED: websocket connection_init without a valid API key")
            REQUESTS.labels("unknown", "UNAUTHENTICATED").inc()
            raise ConnectionRejectionError({"message": f"a valid API key is required: {HOW_TO}"})
        if context.connection is not None:
            self.connections.authenticated(context.connection, caller, key)  # ConnectionLimit: closes 4429
        context.caller = caller
        return {"rateLimit": await context.access.rate_state(caller)}

    async def process_result(self, request, result):
        """Every HTTP response tells the caller where it stands against its limits."""
        body = await super().process_result(request, result)
        caller = getattr(request.state, "caller", None)
        if caller is not None:
            state = await request.app.state.services.access.rate_state(caller)
            if state is not None:
                body.setdefault("extensions", {})["rateLimit"] = state
        return body
