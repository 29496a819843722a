"""Per-key limits against a real server (tiny random model): requests per minute, tokens
per minute (reserved at admission, settled to real use), concurrent generations, and
subscriptions per websocket.

Recovery after the one-minute window is not tested here (it would cost a minute of wall
time); retryAfterMs is checked against the window's own resetMs instead.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from tests.conftest import ServerProcess
from tests.gql import GENERATE, JOB, JOB_EVENTS, SUBMIT

MODELS = "{ models { id } }"
CANCEL = "mutation($id: ID!) { cancelJob(id: $id) { id status result { finishReason usage { promptTokens completionTokens totalTokens } } } }"
BATCH = "mutation($inputs: [GenerationInput!]!) { submitBatch(inputs: $inputs) { id } }"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """One engine slot, so long jobs stay queued or running while the test looks at them."""
    srv = ServerProcess(tmp_path_factory.mktemp("limits"), {
        "INFERQL_MODEL_PATH": str(tiny_model_dir), "INFERQL_MAX_BATCH_SIZE": "1",
    }).start()
    yield srv
    srv.stop()


async def gql(server: ServerProcess, key: str, query: str, variables: dict | None = None) -> dict:
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
        resp = await http.post(server.url + "/graphql", json={"query": query, "variables": variables or {}})
    assert resp.status_code == 200, resp.text
    return resp.json()


def code_of(body: dict) -> str | None:
    return body["errors"][0]["extensions"]["code"] if body.get("errors") else None


def tokens_left(body: dict) -> int:
    return body["extensions"]["rateLimit"]["tokens"]["remaining"]


async def wait_running(server: ServerProcess, key: str, job_id: str, timeout: float = 30) -> None:
    """Until the job has produced its first token."""
    deadline = time.monotonic() + timeout
    async with server.client(key) as client:
        async for data in client.subscribe(JOB_EVENTS, {"id": job_id, "after": 0}):
            if data["jobEvents"]["__typename"] == "TokenGenerated":
                return
            assert time.monotonic() < deadline, "job did not start"
    raise AssertionError("job ended before its first token")


# ---- requests per minute ----------------------------------------------------------------------

async def test_requests_per_minute(server):
    key = server.create_key("rpm5", "--rpm", "5")
    remaining = []
    for _ in range(5):
        body = await gql(server, key, MODELS)
        assert not body.get("errors"), body
        remaining.append(body["extensions"]["rateLimit"]["requests"]["remaining"])
    assert remaining == [4, 3, 2, 1, 0]

    refused = await gql(server, key, MODELS)
    assert refused["data"] is None
    error = refused["errors"][0]
    assert error["extensions"]["code"] == "RATE_LIMITED", refused
    assert error["extensions"]["limit"] == "requests"
    assert "5 requests per minute" in error["message"]
    retry = error["extensions"]["retryAfterMs"]
    assert 0 < retry <= 60_000
    window = refused["extensions"]["rateLimit"]["requests"]
    assert window["remaining"] == 0 and window["limit"] == 5
    assert abs(retry - window["resetMs"]) <= 1000, (retry, window)  # both: when the oldest hit leaves

    # Refused requests are not counted again, and every field of the key is refused alike.
    again = await gql(server, key, SUBMIT, {"input": {"prompt": "hi", "maxTokens": 2}})
    assert code_of(again) == "RATE_LIMITED"
    assert again["errors"][0]["extensions"]["retryAfterMs"] <= retry
    async with server.client(key) as client:  # and over a websocket
        with pytest.raises(Exception) as over_ws:
            async for _ in client.subscribe(GENERATE, {"input": {"prompt": "hi", "maxTokens": 2}}):
                pass
        assert "RATE_LIMITED" in str(over_ws.value)

    # Another key is unaffected.
    other = server.create_key("rpm5-other", "--rpm", "5")
    body = await gql(server, other, MODELS)
    assert not body.get("errors") and body["extensions"]["rateLimit"]["requests"]["remaining"] == 4
    body = await gql(server, server.key, MODELS)
    assert not body.get("errors")


# ---- tokens per minute ------------------------------------------------------------------------

async def test_limits_recover_after_the_window(tmp_path, tiny_model_dir):
    """The same limits on a 2-second window, so recovery is seen without waiting a minute."""
    srv = ServerProcess(tmp_path, {"INFERQL_MODEL_PATH": str(tiny_model_dir), "INFERQL_RATE_WINDOW_SECONDS": "2"})
    srv.start()
    try:
        key = srv.create_key("rpm3", "--rpm", "3")
        for _ in range(3):
            assert code_of(await gql(srv, key, MODELS)) is None
        refused = await gql(srv, key, MODELS)
        assert code_of(refused) == "RATE_LIMITED"
        retry_ms = refused["errors"][0]["extensions"]["retryAfterMs"]
        assert 0 < retry_ms <= 2000
        await asyncio.sleep(retry_ms / 1000 + 0.2)
        recovered = await gql(srv, key, MODELS)
        assert code_of(recovered) is None
        assert recovered["extensions"]["rateLimit"]["requests"]["limit"] == 3
    finally:
        srv.stop()


async def test_request_bigger_than_the_whole_token_budget(server):
    # The tiny model's context is 512 tokens, so one job cannot ask for more than a tpm of 600:
    # a smaller key shows the single-job case, a batch shows it for the 600 key.
    small = server.create_key("tpm150", "--tpm", "150")
    body = await gql(server, small, SUBMIT, {"input": {"prompt": "hi", "maxTokens": 200}})
    assert code_of(body) == "RATE_LIMITED", body
    error = body["errors"][0]
    assert error["extensions"]["limit"] == "tokens"
    assert "tokens" in error["message"] and "150" in error["message"] and "maxTokens" in error["message"]
    assert tokens_left(body) == 150  # nothing was reserved

    key = server.create_key("tpm600-batch", "--tpm", "600")
    body = await gql(server, key, BATCH, {"inputs": [{"prompt": "hi", "maxTokens": 300}] * 2})
    assert code_of(body) == "RATE_LIMITED", body
    assert body["errors"][0]["extensions"]["limit"] == "tokens"
    assert "600" in body["errors"][0]["message"]
    assert tokens_left(body) == 600


async def test_tokens_are_reserved_then_settled_to_real_use(server):
    tpm = 600
    key = server.create_key("tpm600", "--tpm", str(tpm))
    submitted = await gql(server, key, SUBMIT, {"input": {"prompt": "Tell me a long story.", "maxTokens": 200}})
    assert not submitted.get("errors"), submitted
    job_id = submitted["data"]["submitGeneration"]["id"]
    reserved = tpm - tokens_left(submitted)
    assert 200 < reserved < 300  # prompt + maxTokens

    await wait_running(server, key, job_id)
    during = await gql(server, key, MODELS)
    assert tokens_left(during) == tpm - reserved  # still reserved while it runs

    # What is left does not fit another such job.
    refused = await gql(server, key, SUBMIT, {"input": {"prompt": "Tell me a long story.", "maxTokens": 400}})
    assert code_of(refused) == "RATE_LIMITED" and refused["errors"][0]["extensions"]["limit"] == "tokens"
    assert 0 < refused["errors"][0]["extensions"]["retryAfterMs"] <= 60_000

    cancelled = await gql(server, key, CANCEL, {"id": job_id})
    assert not cancelled.get("errors"), cancelled
    result = cancelled["data"]["cancelJob"]["result"]
    assert cancelled["data"]["cancelJob"]["status"] == "CANCELLED", cancelled
    used = result["usage"]["promptTokens"] + result["usage"]["completionTokens"]
    assert result["usage"]["promptTokens"] == reserved - 200
    assert 1 <= result["usage"]["completionTokens"] < 200
    assert tokens_left(cancelled) == tpm - used
    after = await gql(server, key, MODELS)
    assert tokens_left(after) == tpm - used > tpm - reserved


# ---- concurrency ------------------------------------------------------------------------------

async def test_concurrent_generations(server):
    key = server.create_key("conc2", "--concurrency", "2")
    long = {"input": {"prompt": "Go on and on.", "maxTokens": 400}}
    ids = []
    try:
        for _ in range(2):
            body = await gql(server, key, SUBMIT, long)
            assert not body.get("errors"), body
            ids.append(body["data"]["submitGeneration"]["id"])
        assert body["extensions"]["rateLimit"]["concurrency"] == {"limit": 2, "active": 2}

        refused = await gql(server, key, SUBMIT, long)
        assert code_of(refused) == "RATE_LIMITED", refused
        assert refused["errors"][0]["extensions"]["limit"] == "concurrency"
        assert refused["errors"][0]["extensions"]["retryAfterMs"] > 0
        batch = await gql(server, key, BATCH, {"inputs": [long["input"]]})
        assert code_of(batch) == "RATE_LIMITED"

        cancelled = await gql(server, key, CANCEL, {"id": ids.pop(0)})
        assert cancelled["data"]["cancelJob"]["status"] == "CANCELLED"
        body = await gql(server, key, SUBMIT, long)
        assert not body.get("errors"), body
        ids.append(body["data"]["submitGeneration"]["id"])
        # another key is not held to this key's limit
        other = await gql(server, server.key, SUBMIT, {"input": {"prompt": "hi", "maxTokens": 2}})
        assert not other.get("errors"), other
        ids.append(other["data"]["submitGeneration"]["id"])
    finally:
        for job_id in ids:
            await gql(server, server.key, CANCEL, {"id": job_id})
    for job_id in ids:
        job = (await gql(server, server.key, JOB, {"id": job_id}))["data"]["job"]
        assert job["status"] in ("CANCELLED", "SUCCEEDED")


# ---- subscriptions per connection -------------------------------------------------------------

async def test_subscriptions_per_connection(tmp_path, tiny_model_dir):
    srv = ServerProcess(tmp_path, {
        "INFERQL_MODEL_PATH": str(tiny_model_dir), "INFERQL_MAX_SUBSCRIPTIONS_PER_CONNECTION": "2",
    }).start()
    try:
        ws_url = srv.url.replace("http", "ws", 1) + "/graphql"
        long = {"input": {"prompt": "Go on and on.", "maxTokens": 400}}
        async with websockets.connect(ws_url, subprotocols=["graphql-transport-ws"], open_timeout=10) as ws:
            await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {srv.key}"}}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "connection_ack"
            seen: dict[str, list[dict]] = {"1": [], "2": [], "3": []}

            async def until(cond, timeout: float = 20) -> None:
                deadline = time.monotonic() + timeout
                while not cond():
                    msg = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
                    if msg.get("type") == "ping":
                        await ws.send(json.dumps({"type": "pong"}))
                    if "id" in msg:
                        seen[msg["id"]].append(msg)

            def tokens(op: str) -> int:
                return sum(1 for m in seen[op] if m["type"] == "next"
                           and (m["payload"].get("data") or {}).get("generate", {}).get("__typename") == "TokenGenerated")

            # One at a time, so which one is third is certain.
            for op in ("1", "2"):
                await ws.send(json.dumps({"id": op, "type": "subscribe", "payload": {"query": GENERATE, "variables": long}}))
                await until(lambda op=op: tokens(op) >= 1)
            await ws.send(json.dumps({"id": "3", "type": "subscribe", "payload": {"query": GENERATE, "variables": long}}))
            await until(lambda: any(m["type"] in ("error", "complete") for m in seen["3"]))

            errors = []
            for m in seen["3"]:
                if m["type"] == "error":
                    errors += m["payload"]
                elif m["type"] == "next":
                    errors += m["payload"].get("errors") or []
            assert errors, seen["3"]
            assert errors[0]["extensions"]["code"] == "RATE_LIMITED"
            assert errors[0]["extensions"]["limit"] == "subscriptionsPerConnection"
            assert not [m for m in seen["3"] if m["type"] == "next" and (m["payload"].get("data") or {}).get("generate")]

            # The first two keep streaming.
            before = tokens("1"), tokens("2")
            await until(lambda: tokens("1") >= before[0] + 3 and tokens("2") >= before[1] + 3)
            assert not any(m["type"] in ("error", "complete") for m in seen["1"] + seen["2"])
            for op in ("1", "2"):
                await ws.send(json.dumps({"id": op, "type": "complete"}))
        # The abandoned generations are cancelled, and the server serves.
        async with srv.client() as client:
            body = await client.execute("{ jobs(first: 10) { nodes { id status } } }")
            job_ids = [n["id"] for n in body["jobs"]["nodes"]]
            assert len(job_ids) == 2  # the refused third never became a job
            deadline = time.monotonic() + 20
            while True:
                states = [(await client.execute(JOB, {"id": j}))["job"]["status"] for j in job_ids]
                if all(s in ("CANCELLED", "SUCCEEDED") for s in states):
                    break
                assert time.monotonic() < deadline, states
                await asyncio.sleep(0.2)
            assert "CANCELLED" in states
    finally:
        srv.stop()
