"""The GraphQL view over HTTP and websockets: the caller is identified before anything
else, and every HTTP answer carries the caller's rate-limit state.

Subscriptions run over both websocket protocols, GraphQL over SSE and multipart HTTP; a
subscription sent as a plain JSON request is refused with BAD_USER_INPUT. JSON answers
follow the GraphQL-over-HTTP spec: `application/graphql-response+json` when the client
accepts it, with 400 for request errors (and 401 without a valid key)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import orjson

from cross_web import HTTPException
from graphql import GraphQLError, get_operation_ast, parse
from graphql.language import OperationType as OperationTypeNode
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError, MissingQueryError
from strawberry.http import GraphQLRequestData
from strawberry.subscriptions import GRAPHQL_SSE_PROTOCOL
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.types import ExecutionResult
from strawberry.types.execution import PreExecutionError
from strawberry.types.graphql import OperationType
from strawberry.types.unset import UNSET

from .auth import HOW_TO, identify, key_from
from .context import Context
from .metrics import REQUESTS
from .http_streams import HttpStreams, LineFeedSSE, wants_graphql_response
from .websockets import Connections, LegacyWSHandler, TransportWSHandler, WebSocketAdapter, refuse_crowded


log = logging.getLogger("inferql.api")

_UNKNOWN = object()
GRAPHQL_RESPONSE_JSON = "application/graphql-response+json; charset=utf-8"
GRAPHIQL_PAGE = Path(__file__).parent / "static" / "graphiql.html"
SUBSCRIPTION_TRANSPORTS = ("a websocket (graphql-transport-ws or graphql-ws), GraphQL over SSE "
                           "(Accept: text/event-stream) or a multipart subscription "
                           "(Accept: multipart/mixed;subscriptionSpec=1.0)")


class InferQLGraphQL(GraphQL):
    """The GraphQL view: identifies the caller once per HTTP request or websocket connection.

    Over HTTP the key is checked before anything else (only a hash lookup): a request
    without a valid one is answered UNAUTHENTICATED without its body being read, let alone
    its document parsed or validated. A websocket is checked at connection_init, before
    any of its operations (both protocols refuse operations before the ack).
    """

    websocket_adapter_class = WebSocketAdapter
    stream_transport_classes_by_protocol = {**GraphQL.stream_transport_classes_by_protocol,
                                            GRAPHQL_SSE_PROTOCOL: LineFeedSSE}
    graphql_transport_ws_handler_class = TransportWSHandler
    graphql_ws_handler_class = LegacyWSHandler

    def __init__(self, *args, auth_on: bool, max_subscriptions: int, connections: Connections,
                 http_streams: HttpStreams | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.auth_on = auth_on
        self.max_subscriptions = max_subscriptions
        self.connections = connections
        self.http_streams = http_streams or HttpStreams(max_per_key=connections.max_per_key)

    async def run(self, request, context=UNSET, root_value=UNSET):
        if self.is_websocket_request(request):
            return await self._run_websocket(request, context, root_value)
        adapter = self.request_adapter_class(request)
        # Requests strawberry answers without GraphQL (405, the GraphiQL page or its 404) pass.
        if not self.is_request_allowed(adapter) or self.should_render_graphql_ide(adapter):
            return await super().run(request, context, root_value)
        graphql_response = wants_graphql_response(request.headers.get("accept"))
        streaming = self._get_stream_transport_from_headers(request.headers) is not None
        request.state.streaming = streaming
        caller = None
        if self.auth_on:
            caller = await identify(request.app.state.services.access, True, key_from(request.headers))
            request.state.caller = caller
            if caller is None:
                log.info("client error UNAUTHENTICATED: no valid API key on an HTTP request")
                REQUESTS.labels("unknown", "UNAUTHENTICATED").inc()
                body = {"errors": [{"message": f"a valid API key is required: {HOW_TO}",
                                    "extensions": {"code": "UNAUTHENTICATED"}}]}
                if graphql_response or streaming:
                    # A request error: no `data`, a 4xx status (a stream client then reports it).
                    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"},
                                        media_type=GRAPHQL_RESPONSE_JSON if graphql_response else None)
                return JSONResponse({"data": None, **body})
        if streaming:
            # Subscriptions over SSE or multipart HTTP: each open stream counts against the key.
            response = await self.http_streams.run(caller, lambda: super(InferQLGraphQL, self).run(
                request, context, root_value))
        else:
            response = await super().run(request, context, root_value)
        if graphql_response and type(response) is Response and response.media_type == "application/json":
            response.headers["content-type"] = GRAPHQL_RESPONSE_JSON
            if getattr(request.state, "request_error", False):
                response.status_code = 400
        return response

    async def parse_http_body(self, request):
        """A client that accepts both a stream and JSON (urql lists text/event-stream and
        multipart/mixed after the JSON types) gets JSON for a query or mutation; only a
        subscription is streamed."""
        data = await super().parse_http_body(request)
        if isinstance(data, GraphQLRequestData) and data.protocol != "http" and _accepts_json(request.headers):
            if _operation_type(data.query, data.operation_name) not in (None, OperationTypeNode.SUBSCRIPTION):
                data.protocol = "http"
                starlette_request = getattr(request, "_request", None)  # the adapter's request
                if starlette_request is not None:  # one JSON answer: it carries the rateLimit state again
                    starlette_request.state.streaming = False
        return data

    async def render_graphql_ide(self, request):
        """Our own GraphiQL page: every asset it loads is served by this app (app/api/static)."""
        return HTMLResponse(GRAPHIQL_PAGE.read_text(encoding="utf-8"))

    async def execute_single(self, request, request_adapter, sub_response, context, root_value, request_data):
        """A subscription sent where it cannot stream (a plain POST or GET answered with one JSON
        body) is the client's mistake: BAD_USER_INPUT naming the transports that can carry it."""
        method = request_adapter.method
        allowed = OperationType.from_http(method) - {OperationType.SUBSCRIPTION}
        if not self.allow_queries_via_get and method == "GET":
            allowed -= {OperationType.QUERY}
        try:
            return await self.schema.execute(
                request_data.query, root_value=root_value, variable_values=request_data.variables,
                context_value=context, operation_name=request_data.operation_name,
                allowed_operation_types=allowed, operation_extensions=request_data.extensions)
        except InvalidOperationTypeError as exc:
            if exc.operation_type == OperationType.SUBSCRIPTION:
                message = f"a subscription needs a streaming transport: {SUBSCRIPTION_TRANSPORTS}"
                return PreExecutionError(data=None, errors=[
                    GraphQLError(message, extensions={"code": "BAD_USER_INPUT"})])
            raise HTTPException(405 if method == "GET" else 400, exc.as_http_error_reason(method)) from exc
        except CannotGetOperationTypeError as exc:
            raise HTTPException(400, exc.as_http_error_reason()) from exc
        except MissingQueryError as exc:
            raise HTTPException(400, "No GraphQL query found in the request") from exc

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

    def encode_json(self, data: object) -> str:
        """Every JSON answer and websocket message, compact. orjson encodes a token message
        ~14x faster than json.dumps (0.3 vs 4.5 us, warm); it runs once per token on the
        event loop beside the model. What orjson refuses (an int past 64 bits, a lone
        surrogate, a key that is not a string) takes json.dumps, as before."""
        try:
            return orjson.dumps(data).decode()
        except TypeError:  # orjson.JSONEncodeError included
            return json.dumps(data, separators=(",", ":"))

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
        """Every HTTP response tells the caller where it stands against its limits.

        A request error (the document or its variables refused before execution) is marked
        for run(), which answers it with 400 under application/graphql-response+json; that
        media type also drops its `data` entry, as the GraphQL-over-HTTP spec asks.
        """
        body = await super().process_result(request, result)
        if _is_request_error(result):
            request.state.request_error = True
            if wants_graphql_response(request.headers.get("accept")):
                body.pop("data", None)
        caller = getattr(request.state, "caller", None)
        # A stream's events go without it: one lookup per token would cost more than it tells.
        if caller is not None and not getattr(request.state, "streaming", False):
            state = await request.app.state.services.access.rate_state(caller)
            if state is not None:
                body.setdefault("extensions", {})["rateLimit"] = state
        return body


def _is_request_error(result: ExecutionResult) -> bool:
    if isinstance(result, PreExecutionError):
        return True
    # graphql-core reports bad variables as an ExecutionResult without data whose errors have no path.
    return result.data is None and bool(result.errors) and all(e.path is None for e in result.errors)


def _accepts_json(headers) -> bool:
    accept = (headers.get("accept") or "").lower()
    return "application/json" in accept or "application/graphql-response+json" in accept


def _operation_type(query: str | None, operation_name: str | None) -> OperationTypeNode | None:
    """The type of the operation a request runs; None when the document does not parse
    (then it is streamed as sent, and the stream reports the syntax error)."""
    if not query:
        return None
    try:  # bounded: a longer document is refused by the schema's own token limit anyway
        operation = get_operation_ast(parse(query, no_location=True, max_tokens=20_000), operation_name)
    except GraphQLError:
        return None
    return operation.operation if operation is not None else None
