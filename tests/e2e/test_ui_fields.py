"""The UI schema fields and the metrics on the real default model (a real server)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import wait_until
from tests.gql import SUBMIT

pytestmark = pytest.mark.e2e

JOB = """query($id: ID!) { job(id: $id) { status partialText progress { tokens maxTokens fraction }
  input { prompt maxTokens seed } result { text usage { completionTokens } } } }"""


async def test_a_real_answer_through_the_ui_fields_and_the_metrics(real_server):
    def finished_ok() -> float:
        for line in httpx.get(real_server.url + "/metrics").text.splitlines():
            if line.startswith('inferql_jobs_finished_total{status="SUCCEEDED"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = finished_ok()
    async with real_server.client() as client:
        inp = {"prompt": "What is the capital of France?", "maxTokens": 32, "seedLong": "9223372036854775807"}
        job_id = (await client.execute(SUBMIT, {"input": inp}))["submitGeneration"]["id"]

        async def ended():
            job = (await client.execute(JOB, {"id": job_id}))["job"]
            return job if job["status"] not in ("QUEUED", "RUNNING") else None

        job = await wait_until(ended, "the job to end", timeout=120)
    assert job["status"] == "SUCCEEDED"
    assert job["result"]["text"] == "The capital of France is Paris."
    assert job["partialText"] == job["result"]["text"]
    tokens = job["result"]["usage"]["completionTokens"]
    assert job["progress"] == {"tokens": tokens, "maxTokens": 32, "fraction": pytest.approx(tokens / 32)}
    assert job["input"] == {"prompt": inp["prompt"], "maxTokens": 32, "seed": "9223372036854775807"}
    assert finished_ok() >= before + 1  # (the shared server may finish an earlier test's job too)
