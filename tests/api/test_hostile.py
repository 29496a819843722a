"""Hostile documents, bodies and sockets against a real server (tiny random model): each is
refused with its code, and the server serves the next normal request."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from tests.conftest import ServerProcess
from tests.gql import SUBMIT

MODELS = "{ models { id } }"
WS_TIMEOUT = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = ServerProcess(tmp_path_factory.mktemp("hostile"), {
        "INFERQL_MODEL_PATH": str(tiny_model_dir), "INFERQL_CONNECTION_INIT_WAIT_TIMEOUT": "1",
    }).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def prod_server(tmp_path_factory, tiny_model_dir):
    srv = ServerProcess(tmp_path_factory.mktemp("hostile-prod"), {
        "INFERQL_MODEL_PATH": str(tiny_model_dir), "INFERQL_ENV": "production",
        "INFERQL_ALLOWED_ORIGINS": '["http://good.example"]',
    }).start()
    yield srv
    srv.stop()


def ws_url(server: ServerProcess) -> str:
    return server.url.replace("http", "ws", 1) + "/graphql"


async def post(server: ServerProcess, query: str, variables: dict | None = None) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {server.key}"}) as http:
        return await http.post(server.url + "/graphql", json={"query": query, "variables": variables or {}})


async def refused(server: ServerProcess, query: str, variables: dict | None = None,
                  code: str = "BAD_USER_INPUT") -> list[dict]:
    resp = await post(server, query, variables)
    assert resp.status_code < 500, resp.text
    body = resp.json()
    assert body.get("data") is None, body
    assert body["errors"] and {(e.get("extensions") or {}).get("code") for e in body["errors"]} == {code}, body
    await assert_serves(server)
    return body["errors"]


async def assert_serves(server: ServerProcess) -> None:
    resp = await post(server, MODELS)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert not body.get("errors") and body["data"]["models"][0]["id"], body


# ---- documents --------------------------------------------------------------------------------

async def test_introspection_fan_out_is_refused(server):
    errors = await refused(server, "{ __schema { types { fields { type { fields { type { fields { name } } } } } } } }")
    assert "introspection" in errors[0]["message"]


async def test_linear_introspection_chain_is_fine(server):
    resp = await post(server, '{ __type(name: "Job") { name fields { name type { kind name ofType { kind name '
                              'ofType { kind name ofType { kind name ofType { kind name } } } } } } } }')
    body = resp.json()
    assert not body.get("errors"), body
    assert body["data"]["__type"]["name"] == "Job"
    # ... and the standard introspection query GraphiQL sends (3 nested lists) works
    from graphql import get_introspection_query
    body = (await post(server, get_introspection_query())).json()
    assert not body.get("errors"), body["errors"]


async def test_alias_bomb(server):
    query = "{ " + " ".join(f"a{i}: models {{ id }}" for i in range(100)) + " }"
    errors = await refused(server, query)
    assert "alias" in errors[0]["message"].lower() and ("20" in errors[0]["message"] or "100" in errors[0]["message"])


async def test_duplicated_fields(server):
    # 1000 copies are ~1000 tokens, under the 2000-token limit: graphql-core's overlapping-fields
    # budget refuses them ("Validation aborted.").
    await refused(server, "{ models { " + "id " * 1000 + "} }")


async def test_token_limit_is_coded(server):
    errors = await refused(server, "{ models { " + "id " * 2500 + "} }")
    assert "2000 tokens" in errors[0]["message"]


async def test_syntax_error_is_coded(server):
    await refused(server, "{ models { id ")


async def test_token_limit_refuses_and_serves(server):
    """What holds today, coded or not: refused with a message naming the limit, server fine."""
    resp = await post(server, "{ models { " + "id " * 2500 + "} }")
    assert resp.status_code == 200
    body = resp.json()
    assert body["data"] is None and "2000 tokens" in body["errors"][0]["message"]
    await assert_serves(server)


async def test_directive_flood(server):
    errors = await refused(server, "{ models { " + "id @include(if: true) " * 50 + "} }")
    assert "20 directives" in errors[0]["message"]


async def test_huge_prompt(server):
    errors = await refused(server, SUBMIT, {"input": {"prompt": "x" * 200_000}})
    assert "32000" in errors[0]["message"] and errors[0]["extensions"]["field"] == "prompt"


# ---- bodies -----------------------------------------------------------------------------------

async def test_big_body_is_413(server):
    body = json.dumps({"query": MODELS, "variables": {"pad": "x" * 2_000_000}}).encode()
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {server.key}"}) as http:
        resp = await http.post(server.url + "/graphql", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    await assert_serves(server)


async def test_big_chunked_body_is_413(server):
    def chunks():
        yield b'{"query": "{ models { id } }", "variables": {"pad": "'
        for _ in range(200):
            yield b"x" * 10_000
        yield b'"}}'

    async def achunks():
        for chunk in chunks():
            yield chunk

    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {server.key}"}) as http:
        resp = await http.post(server.url + "/graphql", content=achunks(), headers={"content-type": "application/json"})
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in resp.request.headers
    assert resp.status_code == 413
    assert resp.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    await assert_serves(server)


async def test_batched_request_is_400(server):
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {server.key}"}) as http:
        resp = await http.post(server.url + "/graphql", json=[{"query": MODELS}, {"query": MODELS}])
    assert resp.status_code == 400, resp.text
    await assert_serves(server)


# ---- websockets -------------------------------------------------------------------------------

async def test_oversized_websocket_frame_closes_1009(server):
    async with websockets.connect(ws_url(server), subprotocols=["graphql-transport-ws"],
                                  open_timeout=WS_TIMEOUT) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {server.key}"}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), WS_TIMEOUT))["type"] == "connection_ack"
        # The server may close while the frame is still going out: then the send itself raises
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.send(json.dumps({"id": "1", "type": "subscribe",
                                      "payload": {"query": MODELS, "variables": {"pad": "x" * 1_500_000}}}))
            await asyncio.wait_for(ws.recv(), WS_TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    await assert_serves(server)


async def test_websocket_without_connection_init_is_closed_4408(server):
    started = time.monotonic()
    async with websockets.connect(ws_url(server), subprotocols=["graphql-transport-ws"],
                                  open_timeout=WS_TIMEOUT) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WS_TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4408
    assert time.monotonic() - started < 5
    await assert_serves(server)


async def test_cross_origin_websocket_is_refused_by_default(server):
    with pytest.raises(websockets.InvalidStatus) as refused_:
        async with websockets.connect(ws_url(server), subprotocols=["graphql-transport-ws"],
                                      origin="http://evil.example", open_timeout=WS_TIMEOUT):
            pass
    assert refused_.value.response.status_code == 403
    await assert_serves(server)


# ---- production -------------------------------------------------------------------------------

async def test_production_disables_introspection_and_graphiql(prod_server):
    errors = await refused(prod_server, "{ __schema { queryType { name } } }")
    assert "introspection" in errors[0]["message"].lower()
    await refused(prod_server, '{ __type(name: "Job") { name } }')
    async with httpx.AsyncClient(timeout=30) as http:
        page = await http.get(prod_server.url + "/graphql", headers={"Accept": "text/html"})
    assert not (page.status_code == 200 and "graphiql" in page.text.lower()), page.text[:300]
    assert page.status_code < 500
    resp = await post(prod_server, MODELS)
    assert resp.json()["data"]["models"][0]["id"]
    # __typename is not introspection of the schema: still fine
    resp = await post(prod_server, "{ __typename models { id } }")
    assert not resp.json().get("errors"), resp.text


async def test_development_serves_graphiql(server):
    async with httpx.AsyncClient(timeout=30) as http:
        page = await http.get(server.url + "/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "graphiql" in page.text.lower()


@pytest.mark.parametrize("origin", ["http://evil.example", "https://good.example", "http://good.example.evil.com",
                                    "null"])
async def test_disallowed_origin_is_refused_at_handshake(prod_server, origin):
    with pytest.raises(websockets.InvalidStatus) as refused_:
        async with websockets.connect(ws_url(prod_server), subprotocols=["graphql-transport-ws"],
                                      origin=origin, open_timeout=WS_TIMEOUT):
            pass
    assert refused_.value.response.status_code == 403
    await assert_serves(prod_server)


async def test_allowed_origin_works(prod_server):
    async with websockets.connect(ws_url(prod_server), subprotocols=["graphql-transport-ws"],
                                  origin="http://good.example", open_timeout=WS_TIMEOUT) as ws:
        await ws.send(json.dumps({"type": "connection_init",
                                  "payload": {"Authorization": f"Bearer {prod_server.key}"}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), WS_TIMEOUT))["type"] == "connection_ack"
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": MODELS}}))
        msg = json.loads(await asyncio.wait_for(ws.recv(), WS_TIMEOUT))
        assert msg["type"] == "next" and msg["payload"]["data"]["models"][0]["id"], msg


# ---- validation work, cost, and auth before parsing -------------------------------------------

def fan_out(levels: int) -> str:
    """N fragment levels, each level's two fragments spreading both fragments of the next:
    2^N paths in ~80 bytes a level (2 KB at 24 levels, 3.3 KB at 40)."""
    parts = ["query Q { ...A0 ...B0 }"]
    for i in range(levels):
        parts += [f"fragment {f}{i} on Query {{ ...A{i + 1} ...B{i + 1} }}" for f in "AB"]
    parts += [f"fragment {f}{levels} on Query {{ models {{ id }} }}" for f in "AB"]
    return " ".join(parts)


async def selections_visited(server: ServerProcess) -> int:
    async with httpx.AsyncClient(timeout=30) as http:
        text = (await http.get(server.url + "/metrics")).text
    return int(float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("inferql_document_selections_visited_total"))))


@pytest.mark.parametrize("levels", [16, 24, 40])
async def test_fragment_fan_out_costs_linear_work(server, levels):
    """Each level doubles the paths through the fragments. The checks measure a fragment
    once, so the work grows with the document, not with the paths (2^40 would never end)."""
    document = fan_out(levels)
    definitions = 2 * levels + 3
    before = await selections_visited(server)
    normal = asyncio.create_task(post(server, MODELS))  # served meanwhile
    errors = await refused(server, document)
    assert errors[0]["extensions"]["limit"] == "queryCost", errors
    assert errors[0]["extensions"]["cost"] > 5000
    resp = await normal
    assert resp.json()["data"]["models"][0]["id"], resp.text
    # This document's selections (2 per definition), plus the few of the MODELS requests.
    assert await selections_visited(server) - before <= 2 * definitions + 20


async def test_unauthenticated_documents_are_not_parsed(server):
    before = await selections_visited(server)
    async with httpx.AsyncClient(timeout=30) as http:
        for body in ({"query": fan_out(40)}, {"query": "{ models { id "}):
            resp = await http.post(server.url + "/graphql", json=body)
            assert resp.status_code == 200, resp.text
            assert [e["extensions"]["code"] for e in resp.json()["errors"]] == ["UNAUTHENTICATED"], resp.text
        # not even the body is read: bad JSON gets the same answer, not a 400
        resp = await http.post(server.url + "/graphql", content=b"{not json",
                               headers={"content-type": "application/json"})
        assert resp.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED", resp.text
    assert await selections_visited(server) == before


async def test_aliased_pages_are_refused_by_cost(server):
    query = "{ " + " ".join(f"a{i}: jobs(first: 100) {{ nodes {{ id status }} }}" for i in range(20)) + " }"
    errors = await refused(server, query)
    assert errors[0]["extensions"] == {"code": "BAD_USER_INPUT", "limit": "queryCost", "cost": 6020,
                                       "maxCost": 5000}, errors
    # the page size comes from the variables too
    paged = "query P($n: Int!) { jobs(first: $n) { nodes { id status createdAt result { text } } } }"
    errors = await refused(server, paged, {"n": 100_000})
    assert errors[0]["extensions"]["cost"] == 1 + 100_000 * (1 + 3 + 2)
    body = (await post(server, paged, {"n": 100})).json()
    assert not body.get("errors") and body["data"]["jobs"]["nodes"] is not None, body
