"""The real SmolLM2-135M-Instruct behind a real uvicorn server, driven by a real websocket client."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
import websockets

from app.client import LEGACY_WS, TRANSPORT_WS
from app.inference.weights import weights_version
from tests.gql import CLASSIFY, GENERATE, JOB, collect

pytestmark = pytest.mark.e2e

FRANCE = {"prompt": "What is the capital of France?", "maxTokens": 32}


@pytest.fixture
async def client(real_server):
    async with real_server.client() as c:
        yield c


async def wait_terminal(client, job_id, timeout=60):
    for _ in range(int(timeout / 0.1)):
        job = (await client.execute(JOB, {"id": job_id}))["job"]
        if job["status"] not in ("QUEUED", "RUNNING"):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def check_stream(events, real_model_dir):
    """Everything the contract promises about one completed stream."""
    kinds = [e["__typename"] for e in events]
    assert kinds[0] == "JobQueued" and kinds[1] == "GenerationStarted" and kinds[-1] == "GenerationCompleted"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["jobId"] for e in events}) == 1
    tokens = [e for e in events if e["__typename"] == "TokenGenerated"]
    result = events[-1]["result"]
    assert "Paris" in result["text"]
    assert "".join(t["text"] for t in tokens) == result["text"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert all(0.0 < t["probability"] <= 1.0 for t in tokens)
    assert result["usage"]["completionTokens"] == len(tokens)
    assert result["usage"]["promptTokens"] == events[1]["promptTokens"] > 0
    assert result["usage"]["totalTokens"] == result["usage"]["promptTokens"] + len(tokens)
    # the result repeats the streamed tokens, seq numbers included
    assert [(t["index"], t["text"], t["seq"]) for t in result["tokens"]] == [
        (t["index"], t["text"], t["seq"]) for t in tokens
    ]
    assert result["model"]["version"] == weights_version(real_model_dir)
    assert result["model"]["id"] == "SmolLM2-135M-Instruct" and result["model"]["contextLength"] == 8192
    assert events[1]["model"]["version"] == result["model"]["version"]
    timing = result["timing"]
    assert 0 <= timing["queuedMs"] <= timing["timeToFirstTokenMs"] <= timing["totalMs"]
    assert timing["totalMs"] > 0 and timing["generationMs"] > 0 and timing["tokensPerSecond"] > 0
    conf = result["confidence"]
    assert 0 < conf["score"] <= 1 and conf["minProbability"] <= conf["score"]
    assert conf["perplexity"] == pytest.approx(1 / conf["score"], rel=1e-6)
    assert result["finishReason"] == "STOP"
    return result


@pytest.mark.parametrize("protocol", [TRANSPORT_WS, LEGACY_WS])
async def test_capital_of_france_streams_with_metadata(client, real_model_dir, protocol):
    events = await collect(client, GENERATE, {"input": FRANCE}, protocol=protocol)
    result = check_stream(events, real_model_dir)
    # the persisted job holds the same answer
    job = (await client.execute(JOB, {"id": events[0]["jobId"]}))["job"]
    assert job["status"] == "SUCCEEDED" and job["result"]["text"] == result["text"]
    assert job["startedAt"] and job["finishedAt"] and job["queuePosition"] is None


async def test_client_leaving_after_three_tokens_cancels_the_job(client):
    events = await collect(
        client, GENERATE, {"input": {"prompt": "Write a long story about a dragon.", "maxTokens": 200}},
        stop_after_tokens=3,
    )
    job = await wait_terminal(client, events[0]["jobId"])
    assert job["status"] == "CANCELLED"
    result = job["result"]
    assert result["finishReason"] == "CANCELLED"
    # The cancel lands within a step or two of the client leaving: 3 tokens seen, more in
    # flight. After the first token, tokens reach the loop every INFERQL_STREAM_INTERVAL_MS
    # (50 ms), so the third one comes with ~10 others at ~220 tokens/s (the native step on an
    # AVX512-BF16 EPYC), and a 50 ms round trip on a busy 2-core machine adds ~10; out of 200.
    assert 3 <= result["usage"]["completionTokens"] <= 40
    assert result["text"].startswith("".join(e["text"] for e in events if e["__typename"] == "TokenGenerated"))
    # and the server serves the next request normally
    after = await collect(client, GENERATE, {"input": FRANCE})
    assert after[-1]["__typename"] == "GenerationCompleted" and "Paris" in after[-1]["result"]["text"]


async def test_dropped_socket_mid_stream_cancels_the_job(real_server, client):
    """No `complete`, no close handshake: the TCP connection just goes away."""
    ws = await websockets.connect(client.ws_url, subprotocols=[TRANSPORT_WS])
    await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {client.api_key}"}}))
    assert json.loads(await ws.recv())["type"] == "connection_ack"
    variables = {"input": {"prompt": "Tell me a very long story.", "maxTokens": 300}}
    await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": GENERATE, "variables": variables}}))
    job_id, tokens = None, 0
    while tokens < 2:
        event = json.loads(await ws.recv())["payload"]["data"]["generate"]
        job_id = event["jobId"]
        tokens += event["__typename"] == "TokenGenerated"
    ws.transport.abort()  # drop the socket
    job = await wait_terminal(client, job_id)
    assert job["status"] == "CANCELLED"
    assert job["result"]["usage"]["completionTokens"] < 300


async def metric(client, name):
    text = (await client._http.get(client.base_url + "/metrics")).text
    return float(re.search(rf"^{name}(?:_total)? (\S+)$", text, re.M).group(1))


async def test_concurrent_streams_share_batches(client):
    shared_before = await metric(client, "inferql_engine_shared_decode_steps")
    prompts = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?", "Say hello in Spanish."]
    runs = await asyncio.gather(
        *[collect(client, GENERATE, {"input": {"prompt": p, "maxTokens": 24}}) for p in prompts]
    )
    assert all(r[-1]["__typename"] == "GenerationCompleted" for r in runs)
    assert all(r[-1]["result"]["usage"]["completionTokens"] > 0 for r in runs)
    # Shown by the engine's own counters: decode passes that served several requests at once.
    assert await metric(client, "inferql_engine_shared_decode_steps") > shared_before
    assert await metric(client, "inferql_engine_max_batch_size") >= 2


async def test_same_seed_and_greedy_are_reproducible(client):
    sampled = {"prompt": "Write one sentence about the sea.", "maxTokens": 24, "temperature": 0.9, "seed": 1234}
    a = await collect(client, GENERATE, {"input": sampled})
    b = await collect(client, GENERATE, {"input": sampled})
    assert a[-1]["result"]["text"] == b[-1]["result"]["text"] != ""
    greedy = {"prompt": "Write one sentence about the sea.", "maxTokens": 24}
    c = await collect(client, GENERATE, {"input": greedy})
    d = await collect(client, GENERATE, {"input": greedy})
    assert c[-1]["result"]["text"] == d[-1]["result"]["text"] != ""
    # Confidence is from the model's own distribution, so equal texts get equal scores.
    assert c[-1]["result"]["confidence"] == d[-1]["result"]["confidence"]


async def test_generate_with_a_used_idempotency_key_replays_that_job(client):
    """generate follows the job submit returned (JobService.own_events): for a key already
    used, the job that ended earlier, from its first event, not a second generation."""
    short = {"prompt": "Name a colour.", "maxTokens": 6}
    options = {"idempotencyKey": "replay-through-generate"}
    first = await collect(client, GENERATE, {"input": short, "options": options})
    again = await collect(client, GENERATE, {"input": short, "options": options})
    assert again[-1]["__typename"] == "GenerationCompleted"
    assert {e["jobId"] for e in again} == {first[0]["jobId"]}
    assert [e["seq"] for e in again] == list(range(1, len(first) + 1))
    assert again[-1]["result"]["text"] == first[-1]["result"]["text"] != ""


async def test_alternatives_and_stop_sequences(client):
    events = await collect(client, GENERATE, {"input": {**FRANCE, "alternatives": 3, "stop": [" Paris"]}})
    tokens = [e for e in events if e["__typename"] == "TokenGenerated"]
    result = events[-1]["result"]
    assert result["finishReason"] == "STOP_SEQUENCE"
    assert result["text"] == "The capital of France is"
    assert "".join(t["text"] for t in tokens) == result["text"]
    for t in tokens:
        alts = t["alternatives"]
        assert len(alts) == 3
        assert [a["logprob"] for a in alts] == sorted((a["logprob"] for a in alts), reverse=True)
        assert alts[0]["tokenId"] == t["tokenId"]  # greedy picks the most likely token


async def test_classify_a_clearly_positive_sentence(client, real_model_dir):
    data = await client.execute(CLASSIFY, {"input": {
        "text": "I absolutely love this product, it works perfectly and I would buy it again!",
        "labels": ["positive", "negative"],
    }})
    result = data["classify"]
    assert result["label"] == "positive"
    assert abs(sum(s["probability"] for s in result["scores"]) - 1.0) < 1e-6
    assert result["confidence"] == max(s["probability"] for s in result["scores"])
    assert result["model"]["version"] == weights_version(real_model_dir)
    assert result["usage"]["promptTokens"] > 0 and result["timing"]["totalMs"] > 0


async def test_health_and_readiness(real_server):
    async with httpx.AsyncClient() as http:
        assert (await http.get(real_server.url + "/healthz")).json() == {"status": "ok"}
        ready = (await http.get(real_server.url + "/readyz")).json()
        assert ready == {"status": "ready", "model": True, "database": True}
        page = await http.get(real_server.url + "/graphql", headers={"accept": "text/html"})
        assert page.status_code == 200 and "graphiql" in page.text.lower()
