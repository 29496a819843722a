"""JSON out of the view: orjson where it can, json.dumps where orjson refuses."""

from __future__ import annotations

import json

import pytest

from app.api.view import InferQLGraphQL

encode = InferQLGraphQL.encode_json  # uses nothing of the view


def test_a_token_message_is_the_same_json_as_before():
    message = {"id": "1", "type": "next", "payload": {"data": {"generate": {
        "__typename": "TokenGenerated", "seq": 12, "at": "2026-11-29T19:00:00.123456+00:00",
        "token": {"text": " héllo ✓ 👋", "logprob": -0.123456789, "probability": 0.88, "index": 11,
                  "alternatives": [{"text": "\n\t\"", "logprob": -1e-9}]}}}}}
    out = encode(None, message)
    assert isinstance(out, str)
    assert json.loads(out) == message
    assert " " not in out.replace(" héllo ✓ 👋", "")  # compact: no spaces after separators


@pytest.mark.parametrize("value", [2**70, "lone \ud800 surrogate", {1: "an int key"}])
def test_what_orjson_refuses_takes_json_dumps(value):
    out = encode(None, {"data": value})
    assert out == json.dumps({"data": value}, separators=(",", ":"))
