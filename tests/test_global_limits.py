"""Per-key limits hold across routers: two router processes on one database share one rpm
and one tpm budget per key (counted in Postgres by the hold's round trip, and by the meter
for tokens), with 429 rate_limit_exceeded and Retry-After past it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from apifast.key_admin import insert_key
from apifast.server.migrations import migrate_database
from apifast.settings import Settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fault_tools import InProcessMeter, RouterProcess, wait_in_ledger
from tests.harness import SECRET, models_toml, stack_settings

BODY = {"model": "fast-chat", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def two_routers(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
    clickhouse_database: str, fake_openai: FakeOpenAI, tmp_path: Path,
) -> AsyncIterator[tuple[Settings, RouterProcess, RouterProcess]]:  # fmt: skip
    models = tmp_path / "models.toml"
    models.write_text(models_toml(fake_openai.url))
    settings = stack_settings(
        database_url=database_factory("limits"), nats_url=nats_url,
        clickhouse_url=clickhouse_url, clickhouse_database=clickhouse_database,
        data_dir=tmp_path / "data", models_file=models,
    )  # fmt: skip
    await migrate_database(settings.database_url)
    routers = (
        RouterProcess(settings, tmp_path / "a", name="a"),
        RouterProcess(settings, tmp_path / "b", name="b"),
    )
    for router in routers:
        router.start()
    try:
        for router in routers:
            await router.wait_ready()
        yield settings, *routers
    finally:
        for router in routers:
            await router.stop()


async def _key(settings: Settings, rpm: int | None, tpm: int | None) -> str:
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            key, key_id, _ = await insert_key(conn, SECRET.encode(), Decimal("5.00"))
            await conn.execute(
                "UPDATE api_keys SET rpm_limit = $2, tpm_limit = $3 WHERE id = $1",
                key_id, rpm, tpm,
            )  # fmt: skip
        return key
    finally:
        await conn.close()


async def _fresh_minute() -> None:
    """The rpm budget is per clock minute: start well inside one."""
    into = time.time() % 60
    if into > 45:
        await asyncio.sleep(60 - into + 0.2)


def _refused(r: httpx.Response) -> bool:
    if r.status_code != 429:
        return False
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 61
    return True


async def test_two_routers_share_one_requests_per_minute_limit(
    two_routers: tuple[Settings, RouterProcess, RouterProcess],
) -> None:
    settings, a, b = two_routers
    key = await _key(settings, rpm=10, tpm=None)
    headers = {"Authorization": f"Bearer {key}"}
    await _fresh_minute()
    async with (
        httpx.AsyncClient(base_url=a.base_url, headers=headers, timeout=30) as ca,
        httpx.AsyncClient(base_url=b.base_url, headers=headers, timeout=30) as cb,
    ):
        answers = await asyncio.gather(*(
            (ca if n % 2 else cb).post("/v1/chat/completions", json=BODY) for n in range(30)
        ))  # fmt: skip
    served = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if _refused(r)]
    # Each router alone would have let 10 through (20 in all): together, exactly 10.
    assert len(served) == 10, [r.status_code for r in answers]
    assert len(refused) == 20


async def test_two_routers_share_one_tokens_per_minute_limit(
    two_routers: tuple[Settings, RouterProcess, RouterProcess],
) -> None:
    settings, a, b = two_routers
    key = await _key(settings, rpm=None, tpm=60)
    headers = {"Authorization": f"Bearer {key}"}
    await _fresh_minute()
    async with (
        InProcessMeter(settings),
        httpx.AsyncClient(base_url=a.base_url, headers=headers, timeout=30) as ca,
        httpx.AsyncClient(base_url=b.base_url, headers=headers, timeout=30) as cb,
    ):
        used = 0
        n = 0
        while used < 60:
            client = ca if n % 2 else cb
            r = await client.post("/v1/chat/completions", json=BODY)
            assert r.status_code == 200, r.text
            used += r.json()["usage"]["total_tokens"]
            await wait_in_ledger(settings.database_url, [r.json()["id"]])
            n += 1
        assert n >= 2  # both routers spent from the one budget
        await _until_refused(ca)
        # Once the tokens are counted, neither router serves the key this minute.
        assert _refused(await cb.post("/v1/chat/completions", json=BODY))
        assert _refused(await ca.post("/v1/chat/completions", json=BODY))


async def _until_refused(client: httpx.AsyncClient) -> Any:
    # The meter counts the tokens as it debits them: at most its batch wait behind.
    for _ in range(100):
        r = await client.post("/v1/chat/completions", json=BODY)
        if _refused(r):
            return r
        assert r.status_code == 200
        await asyncio.sleep(0.05)
    raise AssertionError("the tokens were never counted")
