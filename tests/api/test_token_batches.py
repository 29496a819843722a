"""Tokens that piled up while a subscriber was busy go out in one TokensGenerated event
(each token with its own seq, in order, exactly once); a subscriber that keeps up, or one
whose selection does not name TokensGenerated, gets one TokenGenerated per token. What
piled up is what the event bus hands a follower in one read."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from datetime import UTC, datetime

import pytest

from app.api.subscriptions import group_tokens
from app.jobs import events as ev
from app.jobs.domain import TokenRecord
from tests.gql import EVENT_FIELDS, JOB_EVENTS, SUBMIT, collect

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def token(seq: int) -> ev.TokenGenerated:
    record = TokenRecord(index=seq - 3, token_id=seq, text=f"t{seq}", logprob=-0.1, alternatives=(), at=0.0,
                         seq=seq)
    return ev.TokenGenerated("j", NOW, record, seq=seq)


def job_events(n_tokens: int) -> list[ev.JobEvent]:
    from app.inference.types import ModelInfo

    model = ModelInfo(id="m", version="v", parameters=1, dtype="float32", device="cpu", context_length=8,
                      source="s")
    return [ev.JobQueued("j", NOW, 0, seq=1), ev.GenerationStarted("j", NOW, model, 3, seq=2),
            *[token(s) for s in range(3, 3 + n_tokens)],
            ev.GenerationFailed("j", NOW, ev.JobError("X", "x"), seq=3 + n_tokens)]


async def produce(bus: ev.MemoryEventBus, events, gaps: float) -> None:
    """Events appended `gaps` seconds apart, like tokens from decode steps."""
    for event in events:
        await asyncio.sleep(gaps)
        await bus.append(event)


def flatten(grouped):
    out = []
    for item in grouped:
        out.extend(item if isinstance(item, list) else [item])
    return out


async def messages_of(events, gaps: float, busy: float = 0.0) -> list:
    """What a consumer taking `busy` seconds per message is sent for events `gaps` apart."""
    bus = ev.MemoryEventBus()
    await bus.append(events[0])
    producer = asyncio.ensure_future(produce(bus, events[1:], gaps))
    messages = []
    async with aclosing(await bus.follow_batches("j")) as batches:
        async for ready in batches:
            messages += group_tokens(ready)
            if busy:
                await asyncio.sleep(busy)
    await producer
    return messages


async def test_a_lagging_consumer_gets_every_event_once_in_order_in_fewer_messages():
    events = job_events(40)
    messages = await messages_of(events, 0.001, busy=0.02)  # a slow client: ~20 events pile up meanwhile
    assert flatten(messages) == events
    assert [e.seq for e in flatten(messages)] == list(range(1, len(events) + 1))
    batches = [m for m in messages if isinstance(m, list)]
    assert batches and len(messages) < len(events) / 2
    assert all(all(isinstance(t, ev.TokenGenerated) for t in b) and len(b) > 1 for b in batches)


async def test_a_consumer_that_keeps_up_gets_one_event_per_message():
    events = job_events(10)
    messages = await messages_of(events, 0.005)
    assert messages == events  # no lists: one TokenGenerated per token


def test_grouping_keeps_non_token_events_between_runs():
    events = job_events(3)
    assert group_tokens(events) == [events[0], events[1], events[2:5], events[5]]
    assert group_tokens(events[:3]) == events[:3]  # a run of one stays a plain token event


async def test_a_follower_that_leaves_while_waiting_leaves_nothing_behind():
    events = job_events(0)  # queued, started, failed
    bus = ev.MemoryEventBus()
    await bus.append(events[0])
    follower = await bus.follow_batches("j")
    assert [e.seq for e in await anext(follower)] == [1]
    waiting = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await follower.aclose()
    await bus.append(events[1])  # wakes no one, fails nothing
    assert bus._streams["j"].waiters == []
    await bus.append(events[2])
    assert [e.seq async for e in await bus.follow("j")] == [1, 2, 3]


async def test_followers_share_one_stream_and_each_gets_all_of_it():
    events = job_events(6)
    bus = ev.MemoryEventBus()
    await bus.append(events[0])
    followers = [await bus.follow("j") for _ in range(3)]
    producer = asyncio.ensure_future(produce(bus, events[1:], 0.001))
    seen = await asyncio.gather(*[asyncio.wait_for(collect_all(f), 5) for f in followers])
    await producer
    assert all([e.seq for e in s] == list(range(1, len(events) + 1)) for s in seen)


async def collect_all(events) -> list:
    return [e async for e in events]


# ---- through the server ---------------------------------------------------------------------

BATCHED_EVENTS = f"""
subscription Events($id: ID!, $after: Int!) {{
  jobEvents(id: $id, after: $after) {{
    {EVENT_FIELDS}
    ...Batch
  }}
}}
fragment Batch on TokensGenerated {{ tokens {{ seq index text tokenId logprob }} }}
"""

BATCHED_GENERATE = f"""
subscription Generate($input: GenerationInput!) {{
  generate(input: $input) {{
    {EVENT_FIELDS}
    ... on TokensGenerated {{ tokens {{ seq index text tokenId logprob }} }}
  }}
}}
"""


@pytest.fixture
async def client(tiny_server):
    async with tiny_server.client() as c:
        yield c


def unbatched(events: list[dict]) -> list[dict]:
    out = []
    for e in events:
        if e["__typename"] == "TokensGenerated":
            assert len(e["tokens"]) > 1 and e["seq"] == e["tokens"][-1]["seq"]
            out += [{"__typename": "TokenGenerated", **t} for t in e["tokens"]]
        else:
            out.append(e)
    return out


def check(events: list[dict]) -> list[dict]:
    flat = unbatched(events)
    assert [e["seq"] for e in flat] == list(range(1, len(flat) + 1))
    assert flat[-1]["__typename"] == "GenerationCompleted"
    tokens = [e for e in flat if e["__typename"] == "TokenGenerated"]
    assert [(t["seq"], t["index"], t["text"]) for t in tokens] == [
        (t["seq"], t["index"], t["text"]) for t in flat[-1]["result"]["tokens"]]
    return tokens


async def finished_job(client, max_tokens: int = 12) -> str:
    job = (await client.execute(SUBMIT, {"input": {"prompt": "hello", "maxTokens": max_tokens}}))["submitGeneration"]
    for _ in range(600):
        events = await collect(client, JOB_EVENTS, {"id": job["id"], "after": 0})
        if events[-1]["__typename"] == "GenerationCompleted":
            return job["id"]
        await asyncio.sleep(0.05)
    raise AssertionError("the job did not finish")


async def test_replaying_a_finished_job_batches_its_tokens_for_a_client_that_asks(client):
    job_id = await finished_job(client)
    plain = await collect(client, JOB_EVENTS, {"id": job_id, "after": 0})
    assert "TokensGenerated" not in {e["__typename"] for e in plain}  # not named: one message per token
    batched = await collect(client, BATCHED_EVENTS, {"id": job_id, "after": 0})
    # the whole backlog is there at once: the tokens come in one message
    assert [e["__typename"] for e in batched] == ["JobQueued", "GenerationStarted", "TokensGenerated",
                                                  "GenerationCompleted"]
    assert unbatched(batched) == [{k: v for k, v in e.items() if k in ("__typename", "seq", "index", "text",
                                                                      "tokenId", "logprob")}
                                  if e["__typename"] == "TokenGenerated" else e for e in plain]
    check(batched)
    # resuming after a batch's seq continues right after its last token
    after = batched[2]["seq"]
    rest = await collect(client, BATCHED_EVENTS, {"id": job_id, "after": after})
    assert [e["seq"] for e in rest] == [after + 1]


async def test_generate_with_batches_delivers_every_token_once_in_order(client):
    runs = await asyncio.gather(*[collect(client, BATCHED_GENERATE, {"input": {"prompt": f"p{i}", "maxTokens": 24}})
                                  for i in range(4)])
    for events in runs:
        assert len(check(events)) == events[-1]["result"]["usage"]["completionTokens"]
