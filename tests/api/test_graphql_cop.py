"""graphql-cop's checks against a production server (tiny random model): none passes,
with a valid key or without one."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import ServerProcess

SUBMIT = 'mutation { submitGeneration(input: {prompt: "hi", maxTokens: 2}) { id } }'
JOB_IDS = "{ jobs(first: 100) { nodes { id } } }"


@pytest.fixture(scope="module")
def prod(tmp_path_factory, tiny_model_dir):
    srv = ServerProcess(tmp_path_factory.mktemp("cop"), {
        "INFERQL_MODEL_PATH": str(tiny_model_dir), "INFERQL_ENV": "production",
    }).start()
    yield srv
    srv.stop()


@pytest.fixture(params=["with key", "without key"])
def headers(request, prod):
    return {"Authorization": f"Bearer {prod.key}"} if request.param == "with key" else {}


async def send(server: ServerProcess, headers: dict, payload, method: str = "POST") -> httpx.Response:
    async with httpx.AsyncClient(timeout=30, headers=headers) as http:
        if method == "GET":
            return await http.get(server.url + "/graphql", params={"query": payload})
        return await http.post(server.url + "/graphql", json=payload)


def data_of(resp: httpx.Response):
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("data") if isinstance(body, dict) else body


def messages(resp: httpx.Response) -> list[str]:
    return [e["message"] for e in resp.json().get("errors", [])]


async def job_count(server: ServerProcess) -> int:
    resp = await send(server, {"Authorization": f"Bearer {server.key}"}, {"query": JOB_IDS})
    return len(resp.json()["data"]["jobs"]["nodes"])


async def test_introspection(prod, headers):
    for query in ["query cop { __schema { types { name fields { name } } } }", '{ __type(name: "Job") { name } }']:
        resp = await send(prod, headers, {"query": query})
        assert resp.status_code < 500 and data_of(resp) is None, resp.text


async def test_field_suggestions(prod, headers):
    for query, variables in [
        ("query cop { __schema { directive } }", None),
        ("{ modls { id } }", None),
        ("{ jobs(frist: 1) { nodes { id } } }", None),
        ("{ jobs(status: QUEUD) { nodes { id } } }", None),
        ("query($s: JobStatus) { jobs(status: $s) { nodes { id } } }", {"s": "QUEUD"}),
        ("mutation($i: GenerationInput!) { submitGeneration(input: $i) { id } }", {"i": {"promt": "x"}}),
        ("{ jobs { nodes { staus } } }", None),
    ]:
        resp = await send(prod, headers, {"query": query, "variables": variables})
        assert resp.status_code < 500
        assert messages(resp), resp.text  # refused ...
        assert "did you mean" not in resp.text.lower(), resp.text  # ... without naming the schema
        if headers:
            assert {e["extensions"]["code"] for e in resp.json()["errors"]} == {"BAD_USER_INPUT"}, resp.text


async def test_get_based_mutation(prod, headers):
    before = await job_count(prod)
    for query in ["mutation { __typename }", SUBMIT]:
        resp = await send(prod, headers, query, method="GET")
        assert resp.status_code < 500
        assert not data_of(resp), resp.text
    assert await job_count(prod) == before


async def test_array_batching(prod, headers):
    resp = await send(prod, headers, [{"query": "query cop { __typename }"}] * 10)
    assert resp.status_code < 500
    assert not isinstance(data_of(resp), list), resp.text
    assert resp.status_code == 400 or not data_of(resp), resp.text


async def test_alias_overload(prod, headers):
    aliases = "".join(f"alias{i}:__typename \n" for i in range(101))
    resp = await send(prod, headers, {"query": "query cop { " + aliases + " }"})
    assert resp.status_code < 500 and data_of(resp) is None, resp.text[:300]


async def test_directive_overload(prod, headers):
    resp = await send(prod, headers, {"query": "query cop { __typename @aa@aa@aa@aa@aa@aa@aa@aa@aa@aa }"})
    assert resp.status_code < 500 and data_of(resp) is None
    assert len(resp.json()["errors"]) == 1, resp.text  # one error, not one per directive


async def test_trace_and_debug_leaks(prod, headers):
    for payload in [
        {"query": "query cop { __typename }"},
        {"query": "query cop { __typename }", "extensions": {"tracing": True, "debug": True}},
        {"query": "{ nope }"},
        {"query": 'mutation { cancelJob(id: "unknown") { id } }'},
        {"query": "{ models { id "},
    ]:
        resp = await send(prod, headers, payload)
        assert resp.status_code < 500
        body = resp.json()
        text = json.dumps(body).lower()
        assert "tracing" not in text and "stacktrace" not in text and "traceback" not in text, text
        for error in body.get("errors", []):
            assert set(error.get("extensions", {})) <= {"code", "limit", "field"}, error
            assert "exception" not in error.get("extensions", {}), error
            assert ".py" not in error["message"] and "app." not in error["message"], error
        assert set(body.get("extensions") or {}) <= {"rateLimit"}, body


async def test_graphiql_is_not_served(prod):
    async with httpx.AsyncClient(timeout=30) as http:
        page = await http.get(prod.url + "/graphql", headers={"Accept": "text/html"})
    assert not (page.status_code == 200 and "graphiql" in page.text.lower())
