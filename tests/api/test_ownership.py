"""Every read and write is scoped to the caller's key: another key's job or batch looks
exactly like a missing one; admin keys see everything; usage is per key."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from app.client import GraphQLErrors
from tests.conftest import ServerProcess
from tests.gql import JOB, JOB_EVENTS, SUBMIT, collect

BATCH = """
mutation($inputs: [GenerationInput!]!) {
  submitBatch(inputs: $inputs) { id size jobs(first: 100) { nodes { id } } }
}
"""
BATCH_Q = """
query($id: ID!) {
  batch(id: $id) { id status counts { total succeeded }
                   jobs(first: 100) { nodes { id status result { usage { promptTokens completionTokens } } } } }
}
"""
CANCEL_JOB = 'mutation($id: ID!) { cancelJob(id: $id) { id status } }'
CANCEL_BATCH = 'mutation($id: ID!) { cancelBatch(id: $id) { id status } }'
REVIEW = 'mutation($id: ID!) { submitReview(jobId: $id, verdict: APPROVED) { id } }'
REVIEW_QUEUE = "{ reviewQueue(first: 100) { nodes { id } } }"
JOB_IDS = "{ jobs(first: 100) { nodes { id } } }"
USAGE = """
query($from: DateTime!, $to: DateTime!) {
  usage(from: $from, to: $to) { keyId keyName modelVersion requests promptTokens completionTokens totalTokens }
}
"""
USAGE_OF_JOB = "query($id: ID!) { job(id: $id) { status result { usage { promptTokens completionTokens } } } }"
INPUT = {"prompt": "Say something.", "maxTokens": 4}


class World:
    server: ServerProcess
    a: str
    b: str
    a_job: str
    a_batch: str
    a_batch_jobs: list[str]
    b_job: str
    since: datetime


async def gql(server: ServerProcess, key: str, query: str, variables: dict | None = None) -> dict:
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
        resp = await http.post(server.url + "/graphql", json={"query": query, "variables": variables or {}})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def ok(server: ServerProcess, key: str, query: str, variables: dict | None = None) -> dict:
    body = await gql(server, key, query, variables)
    assert not body.get("errors"), body
    return body["data"]


async def wait_terminal(server: ServerProcess, job_ids: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    pending = set(job_ids)
    while pending:
        for job_id in list(pending):
            job = (await ok(server, server.key, JOB, {"id": job_id}))["job"]
            if job["status"] in ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"):
                pending.discard(job_id)
        assert time.monotonic() < deadline, f"jobs not finished in {timeout}s: {pending}"
        if pending:
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def world(tmp_path_factory, tiny_model_dir):
    server = ServerProcess(tmp_path_factory.mktemp("ownership"),
                           {"INFERQL_MODEL_PATH": str(tiny_model_dir)}).start()
    try:
        w = World()
        w.server = server
        w.since = datetime.now(UTC) - timedelta(seconds=5)
        w.a = server.create_key("owner-a")
        w.b = server.create_key("owner-b")
        w.a_job = (await ok(server, w.a, SUBMIT, {"input": INPUT}))["submitGeneration"]["id"]
        batch = (await ok(server, w.a, BATCH, {"inputs": [INPUT, INPUT]}))["submitBatch"]
        w.a_batch = batch["id"]
        w.a_batch_jobs = [j["id"] for j in batch["jobs"]["nodes"]]
        assert len(w.a_batch_jobs) == 2
        w.b_job = (await ok(server, w.b, SUBMIT, {"input": INPUT}))["submitGeneration"]["id"]
        await wait_terminal(server, [w.a_job, *w.a_batch_jobs, w.b_job])
        yield w
    finally:
        server.stop()


def shape(body: dict, *ids: str) -> str:
    """The response without its rateLimit extension, with ids blanked out."""
    text = json.dumps({k: v for k, v in body.items() if k != "extensions"}, sort_keys=True)
    for item in ids:
        text = text.replace(item, "<ID>")
    return text


async def assert_same_as_missing(w: World, query: str, real_id: str, var: str = "id") -> dict:
    """B asking for A's thing gets exactly what B gets for an id that does not exist."""
    missing = str(uuid.uuid4())
    theirs = await gql(w.server, w.b, query, {var: real_id})
    nothing = await gql(w.server, w.b, query, {var: missing})
    assert shape(theirs, real_id) == shape(nothing, missing), (theirs, nothing)
    return theirs


async def test_other_key_cannot_read_job_or_batch(world):
    w = world
    body = await assert_same_as_missing(w, JOB, w.a_job)
    assert body["data"] == {"job": None} and not body.get("errors")
    for batch_job in w.a_batch_jobs:
        body = await assert_same_as_missing(w, JOB, batch_job)
        assert body["data"] == {"job": None}
    body = await assert_same_as_missing(w, BATCH_Q, w.a_batch)
    assert body["data"] == {"batch": None} and not body.get("errors")


async def test_other_key_cannot_cancel(world):
    w = world
    body = await assert_same_as_missing(w, CANCEL_JOB, w.a_job)
    assert [e["extensions"]["code"] for e in body["errors"]] == ["NOT_FOUND"]
    body = await assert_same_as_missing(w, CANCEL_BATCH, w.a_batch)
    assert [e["extensions"]["code"] for e in body["errors"]] == ["NOT_FOUND"]


async def test_other_key_cannot_review(world):
    w = world
    body = await assert_same_as_missing(w, REVIEW, w.a_job)
    assert [e["extensions"]["code"] for e in body["errors"]] == ["FORBIDDEN"]
    body = await gql(w.server, w.b, REVIEW_QUEUE)
    assert [e["extensions"]["code"] for e in body["errors"]] == ["FORBIDDEN"]
    assert body["data"] is None


async def test_other_key_cannot_follow_events(world):
    w = world
    missing = str(uuid.uuid4())
    async with w.server.client(w.b) as client:
        with pytest.raises(GraphQLErrors) as theirs:
            await asyncio.wait_for(collect(client, JOB_EVENTS, {"id": w.a_job, "after": 0}), 20)
        with pytest.raises(GraphQLErrors) as nothing:
            await asyncio.wait_for(collect(client, JOB_EVENTS, {"id": missing, "after": 0}), 20)
    assert theirs.value.codes == ["NOT_FOUND"]
    assert shape({"errors": theirs.value.errors}, w.a_job) == shape({"errors": nothing.value.errors}, missing)


async def test_other_key_does_not_list_the_job(world):
    w = world
    b_sees = {n["id"] for n in (await ok(w.server, w.b, JOB_IDS))["jobs"]["nodes"]}
    assert b_sees == {w.b_job}
    a_sees = {n["id"] for n in (await ok(w.server, w.a, JOB_IDS))["jobs"]["nodes"]}
    assert a_sees == {w.a_job, *w.a_batch_jobs}


async def test_owner_still_sees_its_own(world):
    w = world
    job = (await ok(w.server, w.a, JOB, {"id": w.a_job}))["job"]
    assert job["id"] == w.a_job and job["status"] == "SUCCEEDED"
    batch = (await ok(w.server, w.a, BATCH_Q, {"id": w.a_batch}))["batch"]
    assert batch["id"] == w.a_batch and batch["counts"]["total"] == 2
    # a finished job: cancelling it is allowed and returns it unchanged
    assert (await ok(w.server, w.a, CANCEL_JOB, {"id": w.a_job}))["cancelJob"]["status"] == "SUCCEEDED"
    async with w.server.client(w.a) as client:
        events = await asyncio.wait_for(collect(client, JOB_EVENTS, {"id": w.a_job, "after": 0}), 20)
    assert events[-1]["__typename"] == "GenerationCompleted"


async def test_admin_sees_every_key(world):
    w = world
    admin = w.server.key
    every = {n["id"] for n in (await ok(w.server, admin, JOB_IDS))["jobs"]["nodes"]}
    assert {w.a_job, *w.a_batch_jobs, w.b_job} <= every
    assert (await ok(w.server, admin, JOB, {"id": w.a_job}))["job"]["id"] == w.a_job
    assert (await ok(w.server, admin, BATCH_Q, {"id": w.a_batch}))["batch"]["id"] == w.a_batch
    queue = (await ok(w.server, admin, REVIEW_QUEUE))["reviewQueue"]["nodes"]
    assert isinstance(queue, list)


async def test_usage_is_per_key(world):
    w = world
    window = {"from": w.since.isoformat(), "to": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()}

    async def job_usage(ids: list[str]) -> tuple[int, int]:
        prompt = completion = 0
        for job_id in ids:
            job = (await ok(w.server, w.server.key, USAGE_OF_JOB, {"id": job_id}))["job"]
            assert job["status"] == "SUCCEEDED"
            prompt += job["result"]["usage"]["promptTokens"]
            completion += job["result"]["usage"]["completionTokens"]
        return prompt, completion

    a_rows = (await ok(w.server, w.a, USAGE, window))["usage"]
    assert a_rows and {r["keyName"] for r in a_rows} == {"owner-a"}
    a_ids = [w.a_job, *w.a_batch_jobs]
    prompt, completion = await job_usage(a_ids)
    assert sum(r["requests"] for r in a_rows) == len(a_ids)
    assert sum(r["promptTokens"] for r in a_rows) == prompt
    assert sum(r["completionTokens"] for r in a_rows) == completion
    assert all(r["totalTokens"] == r["promptTokens"] + r["completionTokens"] for r in a_rows)

    b_rows = (await ok(w.server, w.b, USAGE, window))["usage"]
    assert {r["keyName"] for r in b_rows} == {"owner-b"}
    assert (sum(r["promptTokens"] for r in b_rows), sum(r["completionTokens"] for r in b_rows)) == \
        await job_usage([w.b_job])

    every = (await ok(w.server, w.server.key, USAGE, window))["usage"]
    by_key = {}
    for r in every:
        by_key.setdefault(r["keyName"], []).append(r)
    assert {"owner-a", "owner-b"} <= set(by_key)
    assert sorted(map(json.dumps, by_key["owner-a"])) == sorted(map(json.dumps, a_rows))
    assert sorted(map(json.dumps, by_key["owner-b"])) == sorted(map(json.dumps, b_rows))
