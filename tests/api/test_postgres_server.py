"""The same server on PostgreSQL: migrations, a streamed generation, its persisted job."""

from __future__ import annotations


import asyncpg
import pytest

from tests.conftest import ServerProcess
from tests.gql import GENERATE, JOB, collect
from app.jobs.persistence.migrate import head
from tests.databases import fresh_postgres


@pytest.fixture
async def pg_url():
    async with fresh_postgres("inferql_srv") as url:
        yield url


async def test_server_on_postgresql(tmp_path, tiny_model_dir, pg_url):
    server = ServerProcess(tmp_path, {"INFERQL_MODEL_PATH": str(tiny_model_dir), "INFERQL_DATABASE_URL": pg_url})
    server.start()
    try:
        async with server.client() as client:
            events = await collect(client, GENERATE, {"input": {"prompt": "Hello", "maxTokens": 5}})
            assert events[-1]["__typename"] == "GenerationCompleted"
            job = (await client.execute(JOB, {"id": events[0]["jobId"]}))["job"]
            assert job["status"] == "SUCCEEDED"
            assert job["result"]["text"] == events[-1]["result"]["text"]
            assert job["createdAt"] <= job["startedAt"] <= job["finishedAt"]
    finally:
        server.stop()
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("select version_num from alembic_version") == head()
        assert await conn.fetchval("select count(*) from jobs where status = 'SUCCEEDED'") == 1
    finally:
        await conn.close()
