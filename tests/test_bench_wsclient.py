"""The bench's lean websocket client (scripts/benchlib/wsclient.py) against a real server:
it must see what app.client sees, or the bench's API phases would count the wrong thing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_wsclient", ROOT / "scripts" / "benchlib" / "wsclient.py")
wsclient = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wsclient)

GENERATE = """
subscription G($input: GenerationInput!) {
  generate(input: $input) {
    __typename
    ... on TokenGenerated { seq index text }
    ... on TokensGenerated { tokens { seq index text } }
    ... on GenerationCompleted { result { text usage { completionTokens } } }
  }
}
"""


def tokens_of(results: list[dict]) -> list[tuple[int, str]]:
    out = []
    for data in results:
        event = data["generate"]
        if event["__typename"] == "TokenGenerated":
            out.append((event["index"], event["text"]))
        elif event["__typename"] == "TokensGenerated":
            out += [(t["index"], t["text"]) for t in event["tokens"]]
    return out


async def test_the_lean_client_sees_what_app_client_sees(tiny_server):
    variables = {"input": {"prompt": "hello there", "maxTokens": 16, "temperature": 0}}
    lean = wsclient.LeanSubscriptions(tiny_server.url, tiny_server.key)
    sent, got = [], []
    await lean.run(GENERATE, variables, on_data=got.append, on_send=lambda m: sent.append(m["type"]))
    async with tiny_server.client() as client:
        expected = [data async for data in client.subscribe(GENERATE, variables)]
    assert sent == ["connection_init", "subscribe"]
    assert got[-1]["generate"]["__typename"] == "GenerationCompleted"
    assert tokens_of(got) == tokens_of(expected)
    result = got[-1]["generate"]["result"]
    assert len(tokens_of(got)) == result["usage"]["completionTokens"] > 0
    assert "".join(text for _, text in tokens_of(got)) == result["text"]


async def test_an_error_result_raises(tiny_server):
    lean = wsclient.LeanSubscriptions(tiny_server.url, tiny_server.key)
    with pytest.raises(RuntimeError, match="GraphQL errors"):
        await lean.run(GENERATE, {"input": {"prompt": "hi", "maxTokens": -1}}, on_data=lambda data: None)


async def test_a_refused_key_raises(tiny_server):
    lean = wsclient.LeanSubscriptions(tiny_server.url, "iq_not-a-key")
    with pytest.raises((RuntimeError, ConnectionError)):
        await lean.run(GENERATE, {"input": {"prompt": "hi", "maxTokens": 2}}, on_data=lambda data: None)


async def test_one_socket_serves_subscriptions_one_after_another(tiny_server):
    variables = {"input": {"prompt": "hello there", "maxTokens": 6, "temperature": 0}}
    lean = wsclient.LeanSubscriptions(tiny_server.url, tiny_server.key)
    runs = []
    for _ in range(3):
        sent, got = [], []
        await lean.run(GENERATE, variables, on_data=got.append, on_send=lambda m: sent.append(m["type"]))
        runs.append((sent, got))
    assert [sent for sent, _ in runs] == [["connection_init", "subscribe"], ["subscribe"], ["subscribe"]]
    assert len(lean._idle) == 1
    for _, got in runs:
        assert got[-1]["generate"]["__typename"] == "GenerationCompleted"
        assert tokens_of(got) == tokens_of(runs[0][1]) and len(tokens_of(got)) == 6
    await lean.close_idle()
    assert not lean._idle


async def test_a_failed_subscription_does_not_leave_its_socket_for_the_next(tiny_server):
    lean = wsclient.LeanSubscriptions(tiny_server.url, tiny_server.key)
    with pytest.raises(RuntimeError, match="GraphQL errors"):
        await lean.run(GENERATE, {"input": {"prompt": "hi", "maxTokens": -1}}, on_data=lambda data: None)
    assert not lean._idle
    got = []
    await lean.run(GENERATE, {"input": {"prompt": "hi", "maxTokens": 2, "temperature": 0}}, on_data=got.append)
    assert got[-1]["generate"]["__typename"] == "GenerationCompleted"
    await lean.close_idle()
