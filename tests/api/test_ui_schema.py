"""The schema's fields for UIs, with values, against a real server (tiny random model, one
generation at a time so jobs queue): Job.input, partialText and progress, the 63-bit
seed, batch jobs in input order, viewer, JobError.code. (Live JobQueued position updates:
tests/jobs/test_queue_positions.py, where the queue holds still.)"""

from __future__ import annotations

import pytest

from app.api.types.events import JobError
from app.jobs.domain import JobError as JobErrorData
from app.jobs.domain import JobErrorCode
from tests.conftest import ServerProcess, wait_until
from tests.gql import SUBMIT

JOB_UI = """
query Job($id: ID!) {
  job(id: $id) {
    id status batchIndex partialText progress { tokens maxTokens fraction }
    input { prompt messages { role content } raw maxTokens temperature topP seed stop alternatives }
    result { text usage { completionTokens } }
  }
}
"""
CANCEL = "mutation($id: ID!) { cancelJob(id: $id) { status } }"
LONG = {"prompt": "Tell me a long story.", "maxTokens": 400}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    server = ServerProcess(tmp_path_factory.mktemp("ui-schema"), {
        "INFERQL_MODEL_PATH": str(tiny_model_dir),
        "INFERQL_MAX_BATCH_SIZE": "1",
    }).start()
    yield server
    server.stop()


@pytest.fixture
async def client(server):
    async with server.client() as c:
        yield c


async def submit(client, inp, **options):
    return (await client.execute(SUBMIT, {"input": inp, "options": options or None}))["submitGeneration"]


async def job(client, job_id):
    return (await client.execute(JOB_UI, {"id": job_id}))["job"]


async def ended(client, job_id):
    async def check():
        j = await job(client, job_id)
        return j if j["status"] not in ("QUEUED", "RUNNING") else None
    return await wait_until(check, "the job to end", timeout=120)


async def test_job_input_reports_what_was_asked_with_a_63_bit_seed(client):
    seed = str(2**63 - 1)
    inp = {"messages": [{"role": "SYSTEM", "content": "Be brief."}, {"role": "USER", "content": "Hi"}],
           "maxTokens": 3, "temperature": 0.7, "topP": 0.9, "seedLong": seed, "stop": ["\n\n"], "alternatives": 2}
    j = await job(client, (await submit(client, inp))["id"])
    assert j["input"] == {"prompt": None, "raw": False, "maxTokens": 3, "temperature": 0.7, "topP": 0.9,
                          "seed": seed, "stop": ["\n\n"], "alternatives": 2,
                          "messages": [{"role": "SYSTEM", "content": "Be brief."}, {"role": "USER", "content": "Hi"}]}
    j = await job(client, (await submit(client, {"prompt": "Hi", "maxTokens": 2, "seedLong": 12, "raw": True}))["id"])
    assert j["input"]["prompt"] == "Hi" and j["input"]["seed"] == "12" and j["input"]["raw"] is True
    j = await job(client, (await submit(client, {"prompt": "Hi", "maxTokens": 2, "seed": 7}))["id"])
    assert j["input"]["seed"] == "7" and j["input"]["messages"] is None and j["input"]["stop"] == []
    await ended(client, j["id"])


@pytest.mark.parametrize("bad", [
    {"seed": 1, "seedLong": "1"},        # not both
    {"seedLong": "-1"},                 # below the range
    {"seedLong": str(2**63)},           # beyond a Long
    {"seedLong": "12abc"},              # not a number
    {"seed": 2**31},                    # beyond GraphQL's Int: seedLong is the way
], ids=["both", "negative", "too big", "not a number", "int overflow"])
async def test_bad_seeds_are_bad_user_input(client, bad):
    body = await client.execute_raw(SUBMIT, {"input": {"prompt": "Hi", "maxTokens": 2, **bad}})
    assert [e["extensions"]["code"] for e in body["errors"]] == ["BAD_USER_INPUT"], body


async def test_partial_text_and_progress_while_running_then_the_result(client):
    j = await submit(client, LONG)
    seen = None
    async def running_with_tokens():
        nonlocal seen
        seen = await job(client, j["id"])
        return seen if seen["status"] != "QUEUED" and (seen["progress"]["tokens"] > 0
                                                      or seen["status"] != "RUNNING") else None
    await wait_until(running_with_tokens, "a running job with tokens", timeout=120, interval=0.02)
    final = await ended(client, j["id"])
    if seen["status"] == "RUNNING":
        p = seen["progress"]
        assert 0 < p["tokens"] < 400 and p["maxTokens"] == 400 and p["fraction"] == pytest.approx(p["tokens"] / 400)
        assert seen["result"] is None and seen["partialText"]
        assert final["result"]["text"].startswith(seen["partialText"])
    assert final["partialText"] == final["result"]["text"]
    assert final["progress"]["tokens"] == final["result"]["usage"]["completionTokens"]
    q = await job(client, (await submit(client, {"prompt": "Hi", "maxTokens": 5}))["id"])
    if q["status"] == "QUEUED":
        assert q["partialText"] == "" and q["progress"] == {"tokens": 0, "maxTokens": 5, "fraction": 0.0}


async def _status_is(client, job_id, status):
    return (await job(client, job_id))["status"] == status or None


async def test_batch_jobs_come_in_input_order_with_their_index(client):
    prompts = [f"Say {i}." for i in range(5)]
    batch = (await client.execute(
        "mutation($inputs: [GenerationInput!]!) { submitBatch(inputs: $inputs) { id } }",
        {"inputs": [{"prompt": p, "maxTokens": 1} for p in prompts]},
    ))["submitBatch"]
    page = """query($id: ID!, $after: String) { batch(id: $id) { jobs(first: 2, after: $after) {
                nodes { batchIndex input { prompt } } pageInfo { hasNextPage endCursor } } } }"""
    nodes, after = [], None
    while True:
        jobs = (await client.execute(page, {"id": batch["id"], "after": after}))["batch"]["jobs"]
        nodes += jobs["nodes"]
        if not jobs["pageInfo"]["hasNextPage"]:
            break
        after = jobs["pageInfo"]["endCursor"]
    assert nodes == [{"batchIndex": i, "input": {"prompt": p}} for i, p in enumerate(prompts)]
    body = await client.execute_raw(page, {"id": batch["id"], "after": "bm90IGEgY3Vyc29y"})
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_viewer_shows_the_key_its_limits_and_usage(server):
    key = server.create_key("viewer-test", "--rpm", "50", "--tpm", "9000", "--concurrency", "4")
    query = """{ viewer { name admin limits { requestsPerMinute tokensPerMinute concurrency maxPriority }
                 usage { requests { limit remaining resetMs } tokens { limit remaining } activeJobs } } }"""
    async with server.client(key=key) as c:
        first = (await c.execute(query))["viewer"]
        second = (await c.execute(query))["viewer"]
    assert first["name"] == "viewer-test" and first["admin"] is False
    assert first["limits"] == {"requestsPerMinute": 50, "tokensPerMinute": 9000, "concurrency": 4,
                               "maxPriority": first["limits"]["maxPriority"]}
    assert first["usage"]["requests"]["limit"] == 50 and first["usage"]["requests"]["remaining"] == 49
    assert second["usage"]["requests"]["remaining"] == 48 and second["usage"]["requests"]["resetMs"] > 0
    assert first["usage"]["tokens"] == {"limit": 9000, "remaining": 9000} and first["usage"]["activeJobs"] == 0


def test_job_error_code_is_an_enum_and_unknown_codes_read_as_internal():
    assert JobError.of(JobErrorData("WORKER_LOST", "gone")).code is JobErrorCode.WORKER_LOST
    assert JobError.of(JobErrorData("ENGINE_ERROR", "x")).code is JobErrorCode.ENGINE_ERROR
    assert JobError.of(JobErrorData("SOMETHING_NEW", "x")).code is JobErrorCode.INTERNAL
