"""A hostile client against a real server (tiny random model): every bad input gets a
clear coded error, nothing is persisted half-way, and the server keeps serving."""

from __future__ import annotations

import json
import re
import sqlite3

import httpx
import pytest

from app.client import GraphQLErrors
from tests.conftest import ServerProcess
from tests.gql import CANCEL, CLASSIFY, GENERATE, JOB, JOB_EVENTS, SUBMIT, collect

OK_INPUT = {"prompt": "Hello there", "maxTokens": 4}

BAD_GENERATIONS = {
    "both prompt and messages": {"prompt": "hi", "messages": [{"role": "USER", "content": "hi"}]},
    "neither prompt nor messages": {"maxTokens": 4},
    "empty prompt": {"prompt": "   "},
    "empty messages": {"messages": []},
    "maxTokens zero": {"prompt": "hi", "maxTokens": 0},
    "maxTokens negative": {"prompt": "hi", "maxTokens": -5},
    "maxTokens over context": {"prompt": "hi", "maxTokens": 100000},
    "temperature negative": {"prompt": "hi", "temperature": -0.1},
    "temperature too high": {"prompt": "hi", "temperature": 2.5},
    "topP zero": {"prompt": "hi", "topP": 0},
    "topP over one": {"prompt": "hi", "topP": 1.5},
    "alternatives 11": {"prompt": "hi", "alternatives": 11},
    "alternatives negative": {"prompt": "hi", "alternatives": -1},
    "seed negative": {"prompt": "hi", "seed": -1},
    "empty stop string": {"prompt": "hi", "stop": [""]},
    "too many stop strings": {"prompt": "hi", "stop": [str(i) for i in range(20)]},
    "huge prompt": {"prompt": "x" * 200_000},
    "prompt plus maxTokens over context": {"prompt": "word " * 400, "maxTokens": 300},
}

BAD_TYPES = {
    "prompt is a number": {"prompt": 5},
    "maxTokens is a string": {"prompt": "hi", "maxTokens": "many"},
    "maxTokens beyond Int": {"prompt": "hi", "maxTokens": 2**40},
    "temperature is a string": {"prompt": "hi", "temperature": "hot"},
    "unknown role": {"messages": [{"role": "ROBOT", "content": "hi"}]},
    "unknown field": {"prompt": "hi", "bogus": 1},
}

LEAK = re.compile(r"Traceback|File \"|/app/|\.py\b|site-packages", re.I)


@pytest.fixture
async def client(tiny_server):
    async with tiny_server.client() as c:
        yield c


def job_count(server: ServerProcess) -> int:
    path = server.env["INFERQL_DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        return conn.execute("select count(*) from jobs").fetchone()[0]


def assert_clean(errors: list[dict], code: str) -> None:
    assert [e["extensions"]["code"] for e in errors] == [code], errors
    assert not LEAK.search(json.dumps(errors)), errors


async def assert_still_serving(client) -> None:
    events = await collect(client, GENERATE, {"input": OK_INPUT})
    assert events[-1]["__typename"] == "GenerationCompleted"


@pytest.mark.parametrize("bad", BAD_GENERATIONS.values(), ids=BAD_GENERATIONS.keys())
async def test_invalid_generation_input_is_refused_and_nothing_persisted(client, tiny_server, bad):
    before = job_count(tiny_server)
    body = await client.execute_raw(SUBMIT, {"input": bad})
    assert body["data"] is None
    assert_clean(body["errors"], "BAD_USER_INPUT")
    with pytest.raises(GraphQLErrors) as over_ws:
        await collect(client, GENERATE, {"input": bad})
    assert over_ws.value.codes == ["BAD_USER_INPUT"]
    assert job_count(tiny_server) == before
    await assert_still_serving(client)


async def test_messages_name_the_limit(client):
    body = await client.execute_raw(SUBMIT, {"input": {"prompt": "hi", "maxTokens": 100000}})
    assert "maxTokens" in body["errors"][0]["message"] and "512" in body["errors"][0]["message"]
    body = await client.execute_raw(SUBMIT, {"input": {"prompt": "x" * 200_000}})
    assert "32000" in body["errors"][0]["message"]


@pytest.mark.parametrize("bad", BAD_TYPES.values(), ids=BAD_TYPES.keys())
async def test_wrong_types_are_bad_user_input(client, bad):
    body = await client.execute_raw(SUBMIT, {"input": bad})
    assert body.get("data") is None
    assert_clean(body["errors"], "BAD_USER_INPUT")


@pytest.mark.parametrize(
    "labels,text",
    [(["only"], "some text"), (["a", "a"], "some text"), (["yes", "no"], "  "), (["yes", ""], "text")],
    ids=["one label", "duplicate labels", "empty text", "empty label"],
)
async def test_invalid_classification(client, labels, text):
    body = await client.execute_raw(CLASSIFY, {"input": {"text": text, "labels": labels}})
    assert_clean(body["errors"], "BAD_USER_INPUT")


async def test_classification_scores_sum_to_one(client):
    result = (await client.execute(CLASSIFY, {"input": {"text": "fine", "labels": ["a", "b", "c"]}}))["classify"]
    assert abs(sum(s["probability"] for s in result["scores"]) - 1) < 1e-6
    assert result["label"] in ("a", "b", "c")


@pytest.mark.parametrize("query", [
    'query { jobs(first: 5, after: "not-a-cursor") { nodes { id } } }',
    'query { reviewQueue(first: 5, after: "bm90IGEgY3Vyc29y") { nodes { id } } }',
])
async def test_a_cursor_the_api_never_gave_is_bad_user_input(client, query):
    body = await client.execute_raw(query)
    assert_clean(body["errors"], "BAD_USER_INPUT")
    assert body["errors"][0]["extensions"]["field"] == "after"


async def test_unknown_ids(client):
    assert (await client.execute(JOB, {"id": "does-not-exist"}))["job"] is None
    body = await client.execute_raw(CANCEL, {"id": "does-not-exist"})
    assert_clean(body["errors"], "NOT_FOUND")
    with pytest.raises(GraphQLErrors) as err:
        await collect(client, JOB_EVENTS, {"id": "does-not-exist", "after": 0})
    assert err.value.codes == ["NOT_FOUND"]


async def test_malformed_requests(tiny_server, client):
    url = tiny_server.url + "/graphql"
    async with httpx.AsyncClient() as http:  # without a key nothing is read: the key comes first
        resp = await http.post(url, content=b"{not json", headers={"content-type": "application/json"})
        assert resp.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED", resp.text
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {tiny_server.key}"}) as http:
        resp = await http.post(url, content=b"{not json", headers={"content-type": "application/json"})
        assert resp.status_code == 400 and not LEAK.search(resp.text)
        body = (await http.post(url, json={"query": "query { models { id "})).json()
        assert_clean(body["errors"], "BAD_USER_INPUT")
        body = (await http.post(url, json={"query": "{ nope }"})).json()
        assert_clean(body["errors"], "BAD_USER_INPUT")
    await assert_still_serving(client)


async def test_submit_poll_and_cancel_lifecycle(client):
    submitted = (await client.execute(SUBMIT, {"input": {"prompt": "Count to ten.", "maxTokens": 8}}))
    job_id = submitted["submitGeneration"]["id"]
    assert submitted["submitGeneration"]["status"] == "QUEUED"
    events = await collect(client, JOB_EVENTS, {"id": job_id, "after": 0})
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    job = (await client.execute(JOB, {"id": job_id}))["job"]
    assert job["status"] == "SUCCEEDED"
    # a finished job: cancel returns it unchanged, replay gives the same sequence
    cancelled = (await client.execute(CANCEL, {"id": job_id}))["cancelJob"]
    assert cancelled["status"] == "SUCCEEDED"
    replay = await collect(client, JOB_EVENTS, {"id": job_id, "after": 2})
    assert [e["seq"] for e in replay] == [e["seq"] for e in events[2:]]
    assert [e.get("text") for e in replay] == [e.get("text") for e in events[2:]]


async def test_overload_is_refused_with_a_code(tmp_path, tiny_model_dir):
    server = ServerProcess(tmp_path, {
        "INFERQL_MODEL_PATH": str(tiny_model_dir), "INFERQL_MAX_BATCH_SIZE": "1", "INFERQL_MAX_QUEUED_JOBS": "2",
    }).start()
    try:
        async with server.client() as client:
            long = {"prompt": "go", "maxTokens": 400}
            codes = []
            for _ in range(6):
                body = await client.execute_raw(SUBMIT, {"input": long})
                codes.append(body["errors"][0]["extensions"]["code"] if body.get("errors") else "OK")
            assert "OVERLOADED" in codes and codes[0] == "OK"
            refused = job_count(server)
            assert refused == codes.count("OK")  # refused submissions left no row
    finally:
        server.stop()
