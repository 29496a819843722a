"""Property-based fuzzing of the live endpoint (tiny random model, one server).

Hypothesis generates inputs of every shape: wrong types, huge and negative numbers,
NaN and infinities, unicode and control characters, long strings, nulls, extra and
missing keys, and query text from a small grammar plus garbage. For every response:
no 5xx, every error carries a known public code (never INTERNAL, never missing), and
nothing internal (tracebacks, file paths) leaks. Valid generations are kept to at most
8 new tokens, so the whole file stays well under 90 s.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ServerProcess
from tests.gql import GENERATE, collect

CODES = {"BAD_USER_INPUT", "UNAUTHENTICATED", "FORBIDDEN", "NOT_FOUND", "RATE_LIMITED", "OVERLOADED"}
LEAKS = ("Traceback", 'File "', ".py", "site-packages", "/app/")
MAX_VALID_TOKENS = 8
CONTEXT = 512

accepted: Counter[str] = Counter()  # valid inputs that really ran: the fuzzing reached the model

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def fuzz(n: int):
    return settings(FUZZ, max_examples=n)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = ServerProcess(tmp_path_factory.mktemp("fuzz"), {"INFERQL_MODEL_PATH": str(tiny_model_dir)}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Authorization": f"Bearer {server.key}", "content-type": "application/json"}) as client:
        yield client


# ---- checking a response ----------------------------------------------------------------------

def sent_text(payload) -> str:
    try:
        return json.dumps(payload, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError):
        return repr(payload)


def check(resp: httpx.Response, payload) -> dict | None:
    """The invariants every response keeps; returns the JSON body when there is one."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:2000], sent_text(payload)[:2000])
    sent = sent_text(payload)
    for needle in LEAKS:
        if needle.lower() not in sent.lower():  # an echo of the client's own text is no leak
            assert needle not in resp.text, (needle, resp.text[:2000])
    try:
        body = resp.json()
    except ValueError:
        assert resp.status_code >= 400, resp.text[:500]  # a non-JSON answer is only a refusal
        return None
    if isinstance(body, dict) and body.get("errors"):
        for error in body["errors"]:
            code = (error.get("extensions") or {}).get("code")
            assert code in CODES, (error, sent[:2000])
    return body


def post(http: httpx.Client, query: str, variables=None) -> dict | None:
    payload = {"query": query, "variables": variables}
    # NaN / Infinity go out as Python's JSON extensions (the server's json.loads takes them);
    # ensure_ascii escapes everything else, lone surrogates included.
    resp = http.post("/graphql", content=json.dumps(payload, allow_nan=True).encode())
    return check(resp, payload)


# ---- strategies -------------------------------------------------------------------------------

# Bugs fuzzing found earlier have their own regression tests at the end of this file.
special_text = st.sampled_from([
    "\ud800", "a\udfffb", "", " ", "\t\n", "\x00", "\x00\x01\x1b[31m", "\u202e\u200b\ufeff", "💥" * 5,
    "ℌ𝔢𝔩𝔩𝔬", "null", "undefined", "NaN", "Infinity", "-1", "1e309", "0x10", "{{x}}", "${x}", "%s%n%x",
    "<script>alert(1)</script>", "../../../../etc/passwd", "'; DROP TABLE jobs;--", "x" * 40_000,
    "word " * 1000, "word " * 8000, "é" * 33_000, "\n" * 1000,
])
text = st.one_of(st.text(max_size=40), special_text,
                 st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs", "So", "Lo", "Mn"]), max_size=30))
ints = st.one_of(st.integers(-10, 600), st.integers(),
                 st.sampled_from([0, -1, 2**31 - 1, 2**31, -(2**31) - 1, 2**53 + 1, 2**63, 2**64, 10**400]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3),
                   st.sampled_from([0.0, -0.0, 1e-320, 1e308, float("nan"), float("inf"), float("-inf")]),
                   st.sampled_from(["nan", "inf", "-inf", "1e309", "0.5"]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, text)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def loose(valid):
    """Mostly the field's own kind of value, sometimes anything at all."""
    return st.one_of(valid, valid, json_values)


messages = st.lists(
    st.fixed_dictionaries(
        {"role": loose(st.sampled_from(["USER", "SYSTEM", "ASSISTANT", "ROBOT", "user", ""])),
         "content": loose(text)},
        optional={"extra": json_values},
    ),
    max_size=4,
)
extra_keys = st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=2)


def clamp_tokens(inp):
    """Bounded work: a valid maxTokens is at most 8 (a missing one would default to 128)."""
    if not isinstance(inp, dict):
        return inp
    value = inp.get("maxTokens", MAX_VALID_TOKENS)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= CONTEXT:
        return inp if "maxTokens" in inp else {**inp, "maxTokens": MAX_VALID_TOKENS}
    return {**inp, "maxTokens": min(value, MAX_VALID_TOKENS)}


# Three kinds of input: valid (the model runs), valid but for one field (the error names it),
# and chaos (any shape at all).
plain = st.text(min_size=1, max_size=60).filter(str.strip)
valid_generation = st.one_of(
    st.fixed_dictionaries({"prompt": plain}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["USER", "SYSTEM", "ASSISTANT"]), "content": plain}), min_size=1, max_size=3)}),
).flatmap(lambda base: st.fixed_dictionaries({**{k: st.just(v) for k, v in base.items()},
                                              "maxTokens": st.integers(1, MAX_VALID_TOKENS)}, optional={
    "temperature": st.floats(0, 2),
    "topP": st.floats(0.01, 1),
    "seed": st.integers(0, 2**31 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=5), max_size=3),
    "alternatives": st.integers(0, 10),
}))
GENERATION_FIELDS = ["prompt", "messages", "maxTokens", "temperature", "topP", "seed", "stop", "alternatives", "raw",
                     "bogus"]
one_fault_generation = st.builds(
    lambda base, field, value, drop: clamp_tokens(
        {k: v for k, v in base.items() if k != field} if drop else {**base, field: value}),
    valid_generation, st.sampled_from(GENERATION_FIELDS), st.one_of(ints, floats, text, messages, json_values),
    st.booleans(),
)
chaos_generation = st.one_of(
    st.builds(
        lambda base, extra: clamp_tokens({**extra, **base}),
        st.fixed_dictionaries({}, optional={
            "prompt": loose(text),
            "messages": loose(messages),
            "maxTokens": loose(ints),
            "temperature": loose(floats),
            "topP": loose(floats),
            "seed": loose(ints),
            "stop": loose(st.lists(text, max_size=10)),
            "alternatives": loose(ints),
            "raw": loose(st.booleans()),
        }),
        extra_keys,
    ),
    json_values.map(clamp_tokens),
)
generation_input = st.one_of(valid_generation, one_fault_generation, chaos_generation)
job_options = st.one_of(
    st.none(),
    st.fixed_dictionaries({}, optional={  # valid (no webhook: nothing to deliver to)
        "priority": st.integers(-100, 100), "idempotencyKey": plain, "deadlineSeconds": st.floats(0.5, 600),
    }),
    st.fixed_dictionaries({}, optional={
        "priority": loose(ints),
        "idempotencyKey": loose(text),
        # never a reachable receiver: only malformed URLs, or a closed local port
        "webhookUrl": loose(st.sampled_from(["", "ftp://x", "http://", "http://u:p@127.0.0.1:1/", "http://127.0.0.1:1/h",
                                             "http://[::1", "javascript:alert(1)", "http://127.0.0.1:99999/"])),
        "deadlineSeconds": loose(floats),
    }),
    json_values,
)
ids = st.one_of(text, st.uuids().map(str), ints, json_values)

atoms = st.one_of(
    st.sampled_from([
        "{", "}", "{", "}", "(", ")", ":", "...", "models", "id", "version", "contextLength", "jobs", "nodes", "edges",
        "node", "status", "first:", "3", "-1", "99999999999", "2.5", 'job(id: "x")', "job", "batch", "__typename",
        "__schema", "__type", "types", "fields", "name", "ofType", "fragment F on Query", "...F", "... on Query",
        "query", "mutation", "subscription", "Q", "$v", "($v: Int)", "($v: ID!)", "@include(if: true)",
        "@skip(if: $v)", "@deprecated", '"str"', '"""block"""', "a:", "b:", "a:", 'usage(from: "2020-01-01", to: "x")',
        "reviewQueue", "cancelJob(id: 1)", "cancelBatch(id: $v)", "{ models { id } }", "#comment\n", ",", "[", "]",
        "=", "!", "null", "true", "classify", "submitGeneration(input: {prompt: \"hi\", maxTokens: 2})",
        "submitGeneration(input: {prompt: \"hi\", maxTokens: 99999})", "generate", "jobEvents",
    ]),
    st.text(max_size=8),
)
query_text = st.one_of(st.lists(atoms, max_size=30).map(" ".join), st.text(max_size=100))

naive = st.datetimes().map(lambda d: d.isoformat())
aware = st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
# Naive, aware, mixed (a naive datetime is read as UTC), or anything at all.
datetime_pairs = st.one_of(st.tuples(naive, naive), st.tuples(aware, aware), st.tuples(naive, aware),
                           st.tuples(aware, naive), st.tuples(aware, text), st.tuples(json_values, json_values),
                           st.tuples(text, naive))

SUBMIT = """mutation S($input: GenerationInput!, $options: JobOptions) {
  submitGeneration(input: $input, options: $options) { id status queuePosition } }"""
BATCH = """mutation B($inputs: [GenerationInput!]!, $options: JobOptions) {
  submitBatch(inputs: $inputs, options: $options) { id size } }"""
CLASSIFY = """mutation C($input: ClassificationInput!) {
  classify(input: $input) { label confidence scores { label probability } usage { promptTokens } } }"""
BY_ID = {
    "job": "query J($id: ID!) { job(id: $id) { id status } }",
    "cancelJob": "mutation X($id: ID!) { cancelJob(id: $id) { id status } }",
    "batch": "query B($id: ID!) { batch(id: $id) { id size } }",
    "cancelBatch": "mutation Y($id: ID!) { cancelBatch(id: $id) { id } }",
    "submitReview": "mutation R($id: ID!) { submitReview(jobId: $id, verdict: APPROVED) { id } }",
}
PAGES = "query P($first: Int!, $after: String, $status: JobStatus) { jobs(first: $first, after: $after, status: $status) { nodes { id } pageInfo { endCursor } } }"
USAGE = "query U($from: DateTime!, $to: DateTime!) { usage(from: $from, to: $to) { requests totalTokens } }"


# ---- the properties ---------------------------------------------------------------------------

@fuzz(150)
@given(inp=generation_input, options=job_options)
def test_fuzz_submit_generation(http, inp, options):
    body = post(http, SUBMIT, {"input": inp, "options": options})
    if body and body.get("data"):
        accepted["submitGeneration"] += 1
        assert body["data"]["submitGeneration"]["status"] in ("QUEUED", "RUNNING", "SUCCEEDED", "CANCELLED",
                                                              "EXPIRED", "FAILED")


@fuzz(60)
@given(inputs=st.one_of(st.lists(generation_input, max_size=5), json_values), options=job_options)
def test_fuzz_submit_batch(http, inputs, options):
    post(http, BATCH, {"inputs": inputs, "options": options})


short_text = text.filter(lambda t: len(t) <= 200)  # classification is not held to the context (bug)
valid_classification = st.fixed_dictionaries(
    {"text": plain, "labels": st.lists(st.text(min_size=1, max_size=12).filter(str.strip), min_size=2, max_size=5,
                                       unique=True)},
    optional={"instruction": st.none() | st.text(max_size=60)},
)
one_fault_classification = st.builds(
    lambda base, field, value: {**base, field: value},
    valid_classification, st.sampled_from(["text", "labels", "instruction", "bogus"]),
    st.one_of(short_text, st.lists(short_text, max_size=6), json_values),
)
chaos_classification = st.one_of(
    st.fixed_dictionaries({}, optional={
        "text": loose(short_text), "labels": loose(st.lists(short_text, max_size=6)),
        "instruction": loose(st.none() | short_text),
    }).flatmap(lambda d: extra_keys.map(lambda e: {**e, **d})),
    json_values,
)


@fuzz(80)
@given(inp=st.one_of(valid_classification, one_fault_classification, chaos_classification))
def test_fuzz_classify(http, inp):
    body = post(http, CLASSIFY, {"input": inp})
    if body and body.get("data"):
        accepted["classify"] += 1
        scores = body["data"]["classify"]["scores"]
        assert math.isclose(sum(s["probability"] for s in scores), 1.0, abs_tol=1e-4)


@pytest.fixture(scope="module")
def real_ids(http) -> list[str]:
    """Ids that exist: made-up ones are mixed with these."""
    made = []
    for _ in range(3):
        made.append(post(http, SUBMIT, {"input": {"prompt": "hi", "maxTokens": 2}})["data"]["submitGeneration"]["id"])
    made.append(post(http, BATCH, {"inputs": [{"prompt": "hi", "maxTokens": 2}]})["data"]["submitBatch"]["id"])
    return made


@fuzz(150)
@given(op=st.sampled_from(sorted(BY_ID)), job_id=st.one_of(ids, st.integers(0, 3).map(lambda i: ("REAL", i))))
def test_fuzz_ids(http, real_ids, op, job_id):
    real = isinstance(job_id, tuple)
    if real:
        job_id = real_ids[job_id[1]]
    body = post(http, BY_ID[op], {"id": job_id})
    if body and op in ("job", "batch") and body.get("data") is not None and not body.get("errors") and not real:
        assert body["data"][op] is None  # made-up ids exist for no one


@fuzz(80)
@given(first=loose(ints), after=st.one_of(st.none(), text, st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode())),
       status=loose(st.sampled_from([None, "QUEUED", "SUCCEEDED", "queued", "BOGUS"])))
def test_fuzz_pagination(http, first, after, status):
    post(http, PAGES, {"first": first, "after": after, "status": status})


@fuzz(80)
@given(pair=datetime_pairs)
def test_fuzz_usage(http, pair):
    post(http, USAGE, {"from": pair[0], "to": pair[1]})


@fuzz(150)
@given(query=query_text, variables=st.one_of(st.none(), st.dictionaries(st.sampled_from(["v", "id", "input", "x"]),
                                                                          json_values, max_size=3), json_values))
def test_fuzz_query_text(http, query, variables):
    post(http, query, variables)


@fuzz(80)
@given(body=st.one_of(json_values, st.dictionaries(st.sampled_from(["query", "variables", "operationName",
                                                                        "extensions"]), json_values, max_size=4),
                      text, st.lists(atoms, max_size=20).map("".join)))
def test_fuzz_raw_bodies(http, body):
    """Whatever the body is: JSON of any shape, or text that may or may not be JSON."""
    # surrogatepass: a lone surrogate goes out as the (invalid) UTF-8 bytes a hostile client could send
    content = (body.encode(errors="surrogatepass") if isinstance(body, str)
               else json.dumps(body, allow_nan=True).encode())
    check(http.post("/graphql", content=content), body)


# ---- inputs the fuzzing once broke (fixed; kept as deterministic regression tests) -------------------------------------------

ID_QUERY = "query J($id: ID!) { job(id: $id) { id } }"


def assert_refused_cleanly(resp: httpx.Response, payload=None) -> None:
    body = check(resp, payload)
    assert resp.status_code < 500
    if body is not None and body.get("errors"):
        assert all((e.get("extensions") or {}).get("code") in CODES for e in body["errors"]), body


def test_non_utf8_body_is_refused(http):
    assert_refused_cleanly(http.post("/graphql", content=b"\x80"))


@pytest.mark.parametrize("raw", [b"null", b"1", b'"x"', b"true"])
def test_json_scalar_body_is_refused(http, raw):
    assert_refused_cleanly(http.post("/graphql", content=raw))


def test_deeply_nested_body_is_refused(http):
    assert_refused_cleanly(http.post("/graphql", content=b"[" * 100_000 + b"]" * 100_000))


@pytest.mark.parametrize("query,variables", [
    (ID_QUERY, {"id": "\ud800"}),
    (SUBMIT, {"input": {"prompt": "a\ud800", "maxTokens": 2}}),
], ids=["job id", "prompt"])
def test_lone_surrogate_is_refused(http, query, variables):
    """Text that is not valid Unicode is refused with the rest of unparseable bodies (400)."""
    payload = json.dumps({"query": query, "variables": variables}).encode()  # "\ud800" escaped
    resp = http.post("/graphql", content=payload)
    assert resp.status_code == 400
    assert_refused_cleanly(resp)


def test_usage_with_naive_and_aware_datetimes(http):
    body = post(http, USAGE, {"from": "2020-01-01T00:00:00", "to": "2030-01-01T00:00:00+00:00"})
    assert not body.get("errors") or body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


def test_classification_over_context_is_refused(http):
    body = post(http, CLASSIFY, {"input": {"text": "word " * 520, "labels": ["yes", "no"]}})
    assert body["data"] is None and body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_server_still_generates_after_fuzzing(server):
    async with server.client() as client:
        events = await asyncio.wait_for(
            collect(client, GENERATE, {"input": {"prompt": "Hello there", "maxTokens": 4}}), 120)
    assert events[-1]["__typename"] == "GenerationCompleted"
    assert events[-1]["result"]["usage"]["completionTokens"] >= 1
    print(f"\nFUZZ: valid inputs that ran: {dict(accepted)}")

