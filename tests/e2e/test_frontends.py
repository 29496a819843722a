"""What a frontend developer uses, against one live server with the real model: the npm
clients from the README (Apollo Client 4, urql, graphql-sse, graphql-ws), the graphql-http
audit, subscriptions over HTTP, and GraphiQL and the playground in headless Chromium
with every request to another host aborted.

The npm packages are pinned in tests/js/package-lock.json; scripts/_setup.sh installs them
(`npm ci`) and Debian's chromium. Screenshots go to tests/artifacts/browser/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from app.api.possible_types import possible_types
from app.api.schema import schema
from tests.harness import ROOT

pytestmark = pytest.mark.e2e

JS = ROOT / "tests" / "js"
EXAMPLES = JS / ".examples"
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
README_URL, README_KEY = "http://localhost:8000/graphql", "<your key>"
SUBSCRIBE = 'subscription { generate(input: {prompt: "Hi", maxTokens: 2}) { __typename ... on JobEvent { seq } } }'
ANSWER = re.compile(r"^answer [0-9a-f-]{36} The capital of France is Paris\. 0\.\d+$", re.M)


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.skip("Node.js is not installed (the frontend tests run the npm clients with it)")
    if not (JS / "node_modules" / ".package-lock.json").exists():
        pytest.fail("tests/js/node_modules is missing: run scripts/_setup.sh (it runs npm ci there)")
    return found


def run_node(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([node(), "--experimental-websocket", "--no-warnings", *args], cwd=JS,
                          capture_output=True, text=True, timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def server(real_server):
    """The session's real-model server (tests/conftest.py), shared with the other e2e tests.
    CORS is tested without a server (tests/api/test_cors.py)."""
    return real_server


def headers(server, **extra) -> dict:
    return {"Authorization": f"Bearer {server.key}", **extra}


# ---- the README's snippets, run as written ---------------------------------------------

def readme_examples() -> dict[str, str]:
    """The README's ```js blocks that start with `// example: NAME.mjs`."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```js\n(// example: ([\w.-]+\.mjs).*?)```", readme, re.S)
    return {name: code for code, name in blocks}


def test_readme_has_the_examples():
    assert set(readme_examples()) == {"apollo.mjs", "apollo-ws.mjs", "urql.mjs", "graphql-sse.mjs", "graphql-ws.mjs"}


def write_example(server, name: str, code: str) -> Path:
    EXAMPLES.mkdir(exist_ok=True)
    # What `inferql schema --possible-types` prints (tests/api/test_static.py runs the command).
    (EXAMPLES / "possibleTypes.json").write_text(json.dumps(possible_types(schema._schema), indent=2) + "\n")
    assert README_URL in code and README_KEY in code, name
    path = EXAMPLES / name
    path.write_text(code.replace(README_URL, server.url + "/graphql").replace(README_KEY, server.key))
    return path


@pytest.mark.parametrize("name", ["apollo.mjs", "apollo-ws.mjs", "urql.mjs", "graphql-sse.mjs", "graphql-ws.mjs"])
def test_readme_client(server, name):
    path = write_example(server, name, readme_examples()[name])
    proc = run_node(str(path.relative_to(JS)))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert ANSWER.search(proc.stdout), proc.stdout + proc.stderr
    seqs = [int(s) for s in re.findall(r"^token (\d+) ", proc.stdout, re.M)]
    assert seqs and seqs == list(range(3, 3 + len(seqs))), proc.stdout  # jobId/seq came through the cache
    probabilities = [float(p) for p in re.findall(r"^token \d+ \".*\" ([\d.e-]+)$", proc.stdout, re.M)]
    assert all(0 < p <= 1 for p in probabilities) and len(probabilities) == len(seqs)
    if name.startswith("apollo") or name == "urql.mjs":
        assert "model SmolLM2-135M-Instruct " in proc.stdout or name == "apollo-ws.mjs"


def test_apollo_without_possible_types_loses_job_event_fields(server):
    """Why the README insists on possibleTypes: without it Apollo's cache drops `seq`/`jobId`."""
    code = readme_examples()["apollo.mjs"].replace("new InMemoryCache({ possibleTypes })", "new InMemoryCache()")
    path = write_example(server, "apollo-no-possible-types.mjs", code)
    proc = run_node(str(path.relative_to(JS)))
    assert proc.returncode == 0, proc.stderr
    assert "token undefined " in proc.stdout and "answer undefined The capital" in proc.stdout, proc.stdout


def test_urql_streams_over_http_too(server):
    """urql's fetchSubscriptions (SSE: it splits events on LF-only blank lines)."""
    code = f"""import {{ Client, cacheExchange, fetchExchange, gql }} from "@urql/core";
import {{ pipe, subscribe }} from "wonka";
const client = new Client({{ url: "{README_URL}", fetchSubscriptions: true,
  fetchOptions: {{ headers: {{ Authorization: "Bearer {README_KEY}" }} }}, exchanges: [cacheExchange, fetchExchange] }});
const query = gql`subscription {{ generate(input: {{ prompt: "What is the capital of France?", maxTokens: 8 }}) {{
  __typename ... on JobEvent {{ jobId seq }} ... on TokenGenerated {{ text probability }}
  ... on GenerationCompleted {{ result {{ text confidence {{ score }} }} }} }} }}`;
// No unsubscribe(): the server ends the stream after the terminal event, and aborting the
// fetch while it does races with it (an unhandled AbortError in Node).
pipe(client.subscription(query, {{}}), subscribe(({{ data, error }}) => {{
  if (error) {{ console.error(error); process.exit(1); }}
  const event = data.generate;
  if (event.__typename === "TokenGenerated") console.log("token", event.seq, JSON.stringify(event.text), event.probability);
  if (event.__typename === "GenerationCompleted") {{
    console.log("answer", event.jobId, event.result.text, event.result.confidence.score);
  }}
}}));
"""
    path = write_example(server, "urql-http.mjs", code)
    proc = run_node(str(path.relative_to(JS)))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert ANSWER.search(proc.stdout), proc.stdout + proc.stderr


# ---- GraphQL over HTTP -------------------------------------------------------------------

def test_graphql_http_audit(server):
    proc = run_node("audit.mjs", server.url + "/graphql", server.key)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["warn"] == 0 and report["error"] == 0, report["problems"]
    assert report["ok"] >= 50


def test_graphql_response_status_codes(server):
    accept = {"Accept": "application/graphql-response+json"}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        ok = http.post("/graphql", json={"query": "{ models { id } }"}, headers=headers(server, **accept))
        assert ok.status_code == 200 and ok.headers["content-type"].startswith("application/graphql-response+json")
        bad = http.post("/graphql", json={"query": "{ nope }"}, headers=headers(server, **accept))
        assert bad.status_code == 400 and "data" not in bad.json()
        assert bad.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
        unauthenticated = http.post("/graphql", json={"query": "{ models { id } }"}, headers=accept)
        assert unauthenticated.status_code == 401 and "data" not in unauthenticated.json()
        # application/json (and no Accept) keeps answering 200 with `data`, as before.
        legacy = http.post("/graphql", json={"query": "{ nope }"}, headers=headers(server))
        assert legacy.status_code == 200 and legacy.json()["data"] is None
        assert legacy.headers["content-type"].startswith("application/json")


def test_a_query_from_a_client_that_also_accepts_streams_gets_json(server):
    """urql's Accept for a query lists the JSON types, then text/event-stream and multipart."""
    accept = ("application/graphql-response+json, application/graphql+json, application/json, "
              "text/event-stream, multipart/mixed")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.post("/graphql", json={"query": "{ models { id } }"}, headers=headers(server, Accept=accept))
    assert response.headers["content-type"].startswith("application/graphql-response+json")
    body = response.json()
    assert body["data"]["models"][0]["id"] == "SmolLM2-135M-Instruct" and "rateLimit" in body["extensions"]


def test_a_subscription_where_it_cannot_stream_is_bad_user_input(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for response in [
            http.post("/graphql", json={"query": SUBSCRIBE}, headers=headers(server)),
            http.get("/graphql", params={"query": SUBSCRIBE}, headers=headers(server, Accept="application/json")),
        ]:
            assert response.status_code == 200, response.text
            error = response.json()["errors"][0]
            assert error["extensions"]["code"] == "BAD_USER_INPUT"
            assert "text/event-stream" in error["message"] and "multipart/mixed" in error["message"]
        strict = http.post("/graphql", json={"query": SUBSCRIBE},
                           headers=headers(server, Accept="application/graphql-response+json"))
        assert strict.status_code == 400 and strict.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


def test_http_streams_need_a_key(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for accept in ["text/event-stream", 'multipart/mixed;subscriptionSpec="1.0",application/json']:
            response = http.post("/graphql", json={"query": SUBSCRIBE}, headers={"Accept": accept})
            assert response.status_code == 401
            assert response.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


def test_multipart_subscription_streams_events(server):
    """What Apollo's HttpLink does, spelled out: one JSON part per event, then the closing boundary."""
    accept = 'multipart/mixed;boundary="graphql";subscriptionSpec=1.0,application/json'
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post("/graphql", json={"query": SUBSCRIBE}, headers=headers(server, Accept=accept))
    assert response.headers["content-type"].startswith("multipart/mixed")
    payloads = [json.loads(part)["payload"] for part in re.findall(r"\r\n\r\n(\{.*?\})\r\n--graphql", response.text)
                if "payload" in part]
    kinds = [p["data"]["generate"]["__typename"] for p in payloads]
    assert kinds[0] == "JobQueued" and kinds[-1] == "GenerationCompleted", kinds
    assert [p["data"]["generate"]["seq"] for p in payloads] == list(range(1, len(payloads) + 1))
    assert response.text.rstrip().endswith("--graphql--")


# ---- the pages ---------------------------------------------------------------------------

def test_pages_are_served_from_this_server(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        page = http.get("/graphql", headers={"Accept": "text/html"})
        assert page.status_code == 200 and "/static/vendor/graphiql.min.js" in page.text
        for src in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            assert http.get(src).status_code == 200, src
        playground = http.get("/playground")
        assert playground.status_code == 200 and 'id="api-key"' in playground.text
        assert http.get("/static/vendor/graphql-ws/client.js").headers["content-type"].startswith(
            ("text/javascript", "application/javascript"))


def test_browser(server):
    """GraphiQL runs a query and a subscription; the playground streams coloured tokens and
    a confidence; Cancel stops a generation; the jobs tab re-attaches. Offline: every
    request to another host is aborted (and reported)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: scripts/_setup.sh installs Debian's chromium (as root)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    proc = run_node("browser.mjs", server.url, server.key, str(ARTIFACTS), timeout=240)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    (ARTIFACTS / "report.json").write_text(json.dumps(seen, indent=2))
    assert seen["blocked"] == [], "the pages asked for another host"
    for step in ["graphiql", "playground", "cancel", "jobs"]:
        assert "error" not in seen[step], f"{step}: {seen[step].get('error')} (see {ARTIFACTS}/{step}.png)"
    assert not [e for e in seen["consoleErrors"] if "401" not in e], seen["consoleErrors"]

    graphiql = seen["graphiql"]
    assert "subscription Generate" in graphiql["welcome"] and "generate(input:" in graphiql["welcome"]
    assert json.loads(graphiql["headersPlaceholder"]) == {"Authorization": "Bearer <your key>"}
    assert graphiql["playgroundLink"] == "/playground"
    assert graphiql["query"]["data"]["models"][0]["id"] == "SmolLM2-135M-Instruct"
    assert graphiql["subscription"]["data"]["generate"]["__typename"] == "GenerationCompleted"

    play = seen["playground"]
    assert "".join(t["text"] for t in play["tokens"]) == "The capital of France is Paris."
    assert all(0 < t["probability"] <= 1 for t in play["tokens"])
    backgrounds = {t["background"] for t in play["tokens"]}
    assert len(backgrounds) > 1 and "rgba(0, 0, 0, 0)" not in backgrounds  # coloured, by probability
    assert "alternatives:" in play["tokens"][0]["tip"]
    assert 0 < float(play["confidence"]) <= 1 and play["needsReview"] in ("true", "false")
    assert play["model"].startswith("SmolLM2-135M-Instruct ") and play["finishReason"] == "STOP"
    assert "total" in play["timing"] and "completion" in play["usage"]

    cancel = seen["cancel"]
    assert cancel["finishReason"] == "CANCELLED" and cancel["status"] == "cancelled"
    assert cancel["tokensLater"] == cancel["tokensAtEnd"] < 400 and cancel["runEnabled"]

    jobs = seen["jobs"]
    statuses = {row[1] for row in jobs["rows"]}
    assert {"SUCCEEDED", "CANCELLED"} <= statuses
    assert jobs["replayed"]["tokens"] > 0 and jobs["replayed"]["finishReason"]
