"""Postgres unreachable from the router: paid requests are refused with 503 and
Retry-After in OpenAI's shape (never a 500, never served unbilled), and the router recovers
by itself when the database is back. The shared server keeps running: the test's own
database is renamed away under the router, its connections cut."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import models_toml, running_stack

BODY = {"model": "fast-chat", "messages": [{"role": "user", "content": "hello"}]}


async def test_router_answers_503_while_postgres_is_unreachable(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI, pg_server_url: str
) -> None:
    settings = stack_settings_factory(models_toml(fake_openai.url))
    name = urlsplit(settings.database_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_server_url)
    try:
        async with running_stack(settings) as stack:
            key = await stack.create_key("1.00")
            calls = len(fake_openai.requests)
            while True:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    name,
                )
                try:
                    await admin.execute(f'ALTER DATABASE "{name}" RENAME TO "{name}_down"')
                    break
                except asyncpg.ObjectInUseError:
                    continue
            try:
                async with stack.client(key) as c:
                    for stream in (False, True):
                        r = await c.post("/v1/chat/completions", json={**BODY, "stream": stream})
                        assert r.status_code == 503, r.text
                        assert int(r.headers["retry-after"]) >= 1
                        error = r.json()["error"]
                        assert set(error) == {"message", "type", "code", "param"}
                        assert error["code"] == "database_unavailable"
                assert len(fake_openai.requests) == calls  # nothing was served unbilled
                async with stack.client() as c:
                    # Alive all the same (a liveness probe must not restart the routers
                    # for a database outage), but out of rotation.
                    health = await c.get("/healthz")
                    assert health.status_code == 200, health.text
                    assert health.json()["postgres"] == "down"
                    assert health.json()["status"] == "degraded"
                    ready = await c.get("/readyz")
                    assert ready.status_code == 503 and ready.json()["postgres"] == "down"
            finally:
                await admin.execute(f'ALTER DATABASE "{name}_down" RENAME TO "{name}"')
            async with stack.client(key) as c:
                r = await c.post("/v1/chat/completions", json=BODY)
                assert r.status_code == 200, r.text
                await stack.wait_metered([r.json()["id"]])
    finally:
        await admin.close()
