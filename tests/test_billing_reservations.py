"""The batching `Reserver` on real Postgres: concurrent holds over several keys never exceed
a balance and add up exactly; a request cancelled while its batch is in flight leaves no
hold behind; refusals keep their meaning (401, 402)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from decimal import Decimal

import asyncpg
import pytest

from apifast.db import create_pool
from apifast.errors import ApiError
from apifast.key_admin import insert_key
from apifast.keys import hash_key
from apifast.router.reservations import Hold, Reserver
from apifast.server.migrations import migrate_database
from tests.harness import SECRET


@pytest.fixture
async def pool(database_factory: Callable[[str], str]) -> AsyncIterator[asyncpg.Pool]:
    url = database_factory("reservations")
    await migrate_database(url)
    pool = await create_pool(url, min_size=2, max_size=8)
    try:
        yield pool
    finally:
        await pool.close()


async def _key(pool: asyncpg.Pool, credit: str) -> bytes:
    async with pool.acquire() as conn, conn.transaction():
        key, _, _ = await insert_key(conn, SECRET.encode(), Decimal(credit))
    return hash_key(SECRET.encode(), key)


async def test_concurrent_batched_holds_never_exceed_the_balance(pool: asyncpg.Pool) -> None:
    keys = [await _key(pool, credit) for credit in ("0.010", "0.004", "1.000")]
    reserver = Reserver(pool, ttl_s=900)
    want = Decimal("0.001")

    async def ask(n: int) -> Hold | int:
        try:
            return await reserver.reserve(keys[n % 3], f"gen-batch-{n}", Decimal("0.0002"), want)
        except ApiError as exc:
            return exc.status

    results = await asyncio.gather(*(ask(n) for n in range(90)))
    for i, key_hash in enumerate(keys):
        mine = [r for n, r in enumerate(results) if n % 3 == i]
        held = sum((r.reserved for r in mine if isinstance(r, Hold)), Decimal(0))
        row = await pool.fetchrow(
            "SELECT balance_usd, reserved_usd, "
            "(SELECT sum(amount_usd) FROM reservations r WHERE r.key_id = k.id) AS in_table "
            "FROM api_keys k WHERE key_hash = $1",
            key_hash,
        )
        assert row is not None
        assert row["reserved_usd"] == held == (row["in_table"] or 0)
        assert held <= row["balance_usd"]
        # 429: refused only because of holds in flight (the core waits on those first).
        assert {r for r in mine if not isinstance(r, Hold)} <= {402, 429}
    # The small keys ran out (partly held at the end), the large one did not.
    refused = (402, 429)
    assert any(r in refused for r in results[0::3]) and any(r in refused for r in results[1::3])
    assert all(isinstance(r, Hold) and r.reserved == want for r in results[2::3])


async def test_refusals_keep_their_statuses(pool: asyncpg.Pool) -> None:
    reserver = Reserver(pool, ttl_s=900)
    empty = await _key(pool, "0")
    unknown = b"\x01" * 32
    outcomes = await asyncio.gather(
        reserver.reserve(empty, "gen-r-1", Decimal("0.01"), Decimal("0.02")),
        reserver.reserve(unknown, "gen-r-2", Decimal("0.01"), Decimal("0.02")),
        return_exceptions=True,
    )
    assert [o.status for o in outcomes if isinstance(o, ApiError)] == [402, 401]


async def test_cancelled_request_leaves_no_hold(pool: asyncpg.Pool) -> None:
    key_hash = await _key(pool, "1.00")
    reserver = Reserver(pool, ttl_s=900)
    blocker = await pool.acquire()
    watcher = await pool.acquire()
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM api_keys WHERE key_hash = $1 FOR UPDATE", key_hash)
        request = asyncio.create_task(
            reserver.reserve(key_hash, "gen-cancelled", Decimal("0.01"), Decimal("0.05"))
        )
        await _until_blocked(watcher)
        request.cancel()  # the client went away while its hold was being made
        await tx.rollback()
        with pytest.raises(asyncio.CancelledError):
            await request
        await _until_idle(reserver)
    finally:
        await pool.release(blocker)
        await pool.release(watcher)
    assert await pool.fetchval("SELECT count(*) FROM reservations") == 0
    assert await pool.fetchval("SELECT reserved_usd FROM api_keys") == 0


async def _until_blocked(conn: asyncpg.Connection) -> None:
    """Until some backend of this database waits for a lock."""
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    )
    while True:
        if await conn.fetchval(sql):
            return
        await asyncio.sleep(0.01)


async def _until_idle(reserver: Reserver) -> None:
    """Until the batch in flight (finishing in the background) is done."""
    while True:
        if not reserver._inflight:
            return
        await asyncio.sleep(0.01)
