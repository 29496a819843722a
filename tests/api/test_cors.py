"""CORS over HTTP from INFERQL_ALLOWED_ORIGINS, the setting the websockets use. The
middleware answers before the app, so no services (and no model) are needed here."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from app.main import create_app
from app.settings import Settings

ALLOWED = "http://localhost:3000"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


@pytest.fixture(scope="module")
def http():
    return TestClient(create_app(Settings(allowed_origins=[ALLOWED])))  # no `with`: no lifespan


def test_preflight_from_an_allowed_origin(http):
    response = http.options("/graphql", headers={"Origin": ALLOWED, **PREFLIGHT})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert set(response.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST"}
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"
    assert response.headers["access-control-max-age"] == "600"


def test_preflight_from_another_origin_is_refused(http):
    response = http.options("/graphql", headers={"Origin": "http://evil.example", **PREFLIGHT})
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


def test_simple_requests_carry_the_header_for_allowed_origins_only(http):
    allowed = http.get("/healthz", headers={"Origin": ALLOWED})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED
    other = http.get("/healthz", headers={"Origin": "http://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in http.get("/healthz").headers  # same origin: no CORS


def test_no_origin_is_allowed_by_default():
    http = TestClient(create_app(Settings()))
    response = http.options("/graphql", headers={"Origin": ALLOWED, **PREFLIGHT})
    assert "access-control-allow-origin" not in response.headers
