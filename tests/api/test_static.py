"""The pages' assets: vendored files match their recorded checksums, every one comes with
its license, and the pages load nothing from elsewhere. `inferql schema --possible-types`
matches the schema. No server needed (tests/e2e/test_frontends.py serves them for real)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

from app.api.possible_types import possible_types
from app.api.schema import schema

STATIC = Path(__file__).resolve().parents[2] / "app" / "api" / "static"
VENDOR = STATIC / "vendor"
ROOT = Path(__file__).resolve().parents[2]


def test_vendored_files_match_their_checksums():
    """Refresh with scripts/refresh-graphiql (it rewrites SHA256SUMS)."""
    listed = {}
    for line in (VENDOR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    present = {p.relative_to(VENDOR).as_posix() for p in VENDOR.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert present == set(listed), "files not in SHA256SUMS, or listed but missing"
    for name, digest in listed.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name


def test_every_package_is_pinned_and_licensed():
    sources = json.loads((VENDOR / "SOURCES.json").read_text())
    assert {s["package"] for s in sources} >= {"react", "react-dom", "graphiql", "graphql-ws"}
    for source in sources:
        assert re.fullmatch(r"\d+\.\d+\.\d+", source["version"]), source
        assert source["integrity"].startswith("sha512-"), source
        license_file = VENDOR / "LICENSES" / (source["package"].replace("@", "").replace("/", "__") + ".txt")
        assert "MIT" in license_file.read_text() or "Permission is hereby granted" in license_file.read_text()
        for name in source["files"]:
            assert (VENDOR / name).is_file(), name


def test_pages_reference_only_this_server():
    for page in ["graphiql.html", "playground.html", "graphiql.js", "playground.js", "playground.css"]:
        text = (STATIC / page).read_text()
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|from\s+["']([^"']+)["']""", text)
        for url in filter(None, (a or b for a, b in urls)):
            assert url.startswith(("/", "#", "data:")), f"{page} loads {url}"
        assert not re.search(r"https?://|wss?://", text), f"{page} names another host"


def test_playground_keeps_its_dom_contract():
    html = (STATIC / "playground.html").read_text()
    for element in ['id="api-key"', 'id="prompt"', 'id="run"', 'id="cancel"', 'id="confidence"', 'id="jobs-tab"']:
        assert element in html
    js = (STATIC / "playground.js").read_text()
    assert 'span.className = "token"' in js and "span.dataset.probability" in js


def test_possible_types_command():
    out = subprocess.run([sys.executable, "-m", "app.cli", "schema", "--possible-types"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    types = json.loads(out)
    assert types == possible_types(schema._schema)
    events = ["GenerationCancelled", "GenerationCompleted", "GenerationFailed", "GenerationStarted",
              "JobQueued", "TokenGenerated", "TokensGenerated"]
    assert types["GenerationEvent"] == events and types["JobEvent"] == events


def test_pages_are_served_where_graphiql_is():
    from starlette.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    dev = TestClient(create_app(Settings()))  # no `with`: no lifespan, no model
    assert 'id="api-key"' in dev.get("/playground").text
    assert dev.get("/static/vendor/graphiql.min.js").status_code == 200
    prod = TestClient(create_app(Settings(env="production")))
    assert prod.get("/playground").status_code == 404
    assert prod.get("/static/vendor/graphiql.min.js").status_code == 404
