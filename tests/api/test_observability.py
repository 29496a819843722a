"""Observability against a real server (tiny random model, JSON logs): /metrics after a
known sequence of requests, JSON log lines with request and job ids, client errors at
INFO without a traceback; server errors at ERROR with one (in process)."""

from __future__ import annotations

import json
import logging
import re

import httpx
import pytest
from graphql.error import GraphQLError

from app.api.observe import log_errors
from tests.conftest import ServerProcess, free_port, wait_until
from tests.gql import GENERATE, JOB, JOB_EVENTS, SUBMIT, collect


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    server = ServerProcess(tmp_path_factory.mktemp("observed"), {
        "INFERQL_MODEL_PATH": str(tiny_model_dir),
        "INFERQL_LOG_FORMAT": "json",
        "INFERQL_LOG_LEVEL": "info",
        "INFERQL_WEBHOOK_ALLOW_PRIVATE": "true",
        "INFERQL_WEBHOOK_RETRY_DELAYS": "3600",  # one attempt within the test
    }).start()
    yield server
    server.stop()


def scrape(server: ServerProcess) -> dict[str, float]:
    """Every sample of /metrics as {'name{labels}': value}."""
    text = httpx.get(server.url + "/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def delta(before: dict, after: dict) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


def json_lines(server: ServerProcess) -> list[dict]:
    return [json.loads(line) for line in server.log(10**7).splitlines() if line.startswith("{")]


async def finished(client, job_id: str) -> dict:
    async def ended():
        job = (await client.execute(JOB, {"id": job_id}))["job"]
        return job if job["status"] not in ("QUEUED", "RUNNING") else None
    return await wait_until(ended, f"job {job_id} to end", timeout=60)


async def test_metrics_change_as_expected_after_a_known_sequence(server):
    dead_port = free_port()  # nothing listens there: the webhook attempt is CONNECTION_REFUSED
    before = scrape(server)
    async with server.client() as client:
        await client.execute("{ models { id } }")                                       # query OK
        body = await client.execute_raw("mutation { cancelJob(id: \"nope\") { id } }")  # mutation NOT_FOUND
        assert body["errors"][0]["extensions"]["code"] == "NOT_FOUND"
        body = await client.execute_raw("{ models { id ")                               # syntax error
        assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
        job = (await client.execute(SUBMIT, {                                           # mutation OK
            "input": {"prompt": "hi", "maxTokens": 3},
            "options": {"webhookUrl": f"http://127.0.0.1:{dead_port}/hook"},
        }))["submitGeneration"]
        await finished(client, job["id"])                                               # query OK (x >= 1)
        events = await collect(client, GENERATE, {"input": {"prompt": "hi", "maxTokens": 3}})  # subscription OK
        assert events[-1]["__typename"] == "GenerationCompleted"
        with pytest.raises(Exception, match="NOT_FOUND|not found"):                      # subscription NOT_FOUND
            await collect(client, JOB_EVENTS, {"id": "nope", "after": 0})
    async with server.client(key="iq_wrong") as stranger:
        body = await stranger.execute_raw("{ models { id } }")                          # no valid key
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"

    def webhook_attempted():
        return scrape(server).get('inferql_webhook_deliveries_total{outcome="CONNECTION_REFUSED"}', 0) > \
            before.get('inferql_webhook_deliveries_total{outcome="CONNECTION_REFUSED"}', 0) or None
    await wait_until(webhook_attempted, "the webhook attempt", timeout=30)
    after = scrape(server)
    d = delta(before, after)
    polls = d.pop('inferql_graphql_requests_total{code="OK",operation="query"}')
    assert polls >= 2  # models + the polls until the job ended
    assert d['inferql_graphql_requests_total{code="NOT_FOUND",operation="mutation"}'] == 1
    assert d['inferql_graphql_requests_total{code="BAD_USER_INPUT",operation="unknown"}'] == 1
    assert d['inferql_graphql_requests_total{code="OK",operation="mutation"}'] == 1
    assert d['inferql_graphql_requests_total{code="OK",operation="subscription"}'] == 1
    assert d['inferql_graphql_requests_total{code="NOT_FOUND",operation="subscription"}'] == 1
    assert d['inferql_graphql_requests_total{code="UNAUTHENTICATED",operation="unknown"}'] == 1
    assert d["inferql_jobs_submitted_total"] == 2
    assert d['inferql_jobs_finished_total{status="SUCCEEDED"}'] == 2
    assert d['inferql_webhook_deliveries_total{outcome="CONNECTION_REFUSED"}'] == 1
    assert d["inferql_time_to_first_token_seconds_count"] == 2
    assert d['inferql_graphql_operation_seconds_count{operation="mutation"}'] == 2
    assert after['inferql_subscriptions_open{field="generate"}'] == 0  # the subscription closed
    assert after["inferql_queue_depth"] == 0
    assert not any(k.startswith("inferql_graphql_requests_total") and "INTERNAL" in k for k in after)


async def test_a_json_log_line_parses_and_carries_the_request_and_job_ids(server):
    async with server.client(headers={"X-Request-ID": "obs-test-42"}) as client:
        job = (await client.execute(SUBMIT, {"input": {"prompt": "hi", "maxTokens": 2}}))["submitGeneration"]
        await finished(client, job["id"])
    lines = json_lines(server)
    assert lines and all({"time", "level", "logger", "message", "request_id", "job_id"} <= set(x) for x in lines)
    mine = [x for x in lines if x["request_id"] == "obs-test-42"]
    # The access log line of the submitGeneration request carries both ids.
    assert any(x["job_id"] == job["id"] and "POST /graphql" in x["message"] for x in mine), mine
    # A fresh id is made when the client sends none (or one that is not a plain token).
    resp = httpx.post(server.url + "/graphql", json={"query": "{ models { id } }"},
                      headers={"Authorization": f"Bearer {server.key}", "X-Request-ID": "not a plain token"})
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["x-request-id"])


async def test_client_errors_are_logged_at_info_without_a_traceback(server):
    async with server.client(headers={"X-Request-ID": "obs-client-errors"}) as client:
        await client.execute_raw("mutation { cancelJob(id: \"missing\") { id } }")
        await client.execute_raw("query { nope }")
        await client.execute_raw("{ models { id ")
    async with server.client(key="iq_bad", headers={"X-Request-ID": "obs-client-errors"}) as stranger:
        await stranger.execute_raw("{ models { id } }")
    mine = [x for x in json_lines(server) if x["request_id"] == "obs-client-errors" and x["logger"] != "uvicorn.access"]
    codes = sorted(re.search(r"client error (\w+)", x["message"]).group(1) for x in mine)
    assert codes == ["BAD_USER_INPUT", "BAD_USER_INPUT", "NOT_FOUND", "UNAUTHENTICATED"], mine
    assert all(x["level"] == "INFO" and "exc_info" not in x for x in mine), mine
    assert "Traceback" not in server.log(10**7)


def test_server_errors_are_logged_at_error_with_the_traceback(caplog):
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        error = GraphQLError("boom", path=["models"], original_error=exc)
    client_error = GraphQLError("Syntax Error: Expected Name, found <EOF>.")
    with caplog.at_level(logging.INFO, logger="inferql.api"):
        log_errors([error, client_error])
    server, client = caplog.records
    assert server.levelno == logging.ERROR and server.exc_info[1] is error.original_error
    assert "INTERNAL" in server.getMessage() and "models" in server.getMessage()
    assert client.levelno == logging.INFO and not client.exc_info
    assert "client error BAD_USER_INPUT" in client.getMessage()
