"""Retention, as the privacy policy promises: raw usage events and the per-key daily rollup
live APIFAST_USAGE_RETENTION_DAYS in ClickHouse; past it only model-level rollups (no key
hash) remain, and their totals still add up. Closed orders and ledger rows live
APIFAST_ORDER_RETENTION_DAYS in Postgres; past it the ledger keeps one carried-forward row per
key, balances stay exact and `apifast reconcile` still agrees."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import orjson

from apifast.db import create_pool
from apifast.key_admin import insert_key
from apifast.keys import hash_key
from apifast.metering.clickhouse import ClickHouseStore
from apifast.metering.event import UsageEvent
from apifast.metering.ledger import release_expired
from apifast.metering.reconcile import reconcile
from apifast.providers import Usage
from apifast.server.migrations import migrate_database
from apifast.server.retention import apply_retention
from apifast.settings import Settings
from tests.harness import SECRET

DAY = 86_400


def _event(n: int, key: bytes, age_days: int) -> dict[str, object]:
    event = UsageEvent(
        generation_id=f"gen-retention-{n}", key_hash=key, key_id=1, model="fast-chat",
        endpoint="chat", stream=False, reserved_usd=Decimal("0.01"),
        usage=Usage(input_tokens=10, output_tokens=20), cost_usd=Decimal("0.001"),
        started_at=time.time() - age_days * DAY,
    )  # fmt: skip
    event.latency_ms = 5
    return dict(orjson.loads(event.to_bytes()))


async def test_old_usage_goes_and_model_totals_stay(
    clickhouse_url: str, clickhouse_database: str
) -> None:
    store = ClickHouseStore(clickhouse_url, clickhouse_database)
    await store.start()
    try:
        key = bytes(range(32))
        old = [_event(n, key, age_days=40) for n in range(3)]
        recent = [_event(n + 10, key, age_days=1) for n in range(2)]
        assert await store.insert_new_events(old + recent) == 5
        before = await _model_totals(store)
        await store.apply_retention(30)
        await store.apply_retention(30)  # unchanged: nothing to do the second time
        tables = ("usage_events", "usage_key_daily", "active_keys_hourly", "active_keys_daily")
        for table in tables:
            await store.command(f"OPTIMIZE TABLE {table} FINAL")  # what merges do in time
        raw = await store.query("SELECT generation_id FROM usage_events ORDER BY 1", {})
        assert [r["generation_id"] for r in raw] == ["gen-retention-10", "gen-retention-11"]
        per_key = await store.query("SELECT sum(requests) AS n FROM usage_key_daily", {})
        assert per_key[0]["n"] == 2  # the 40-day-old rows of the key are gone
        for table in ("active_keys_hourly", "active_keys_daily"):
            # The distinct-key states (built from the key hashes) of 40 days ago are gone too.
            oldest = await store.query(
                f"SELECT min(period) AS p, uniqCombinedMerge(12)(keys) AS n FROM {table}", {}
            )
            assert oldest[0]["n"] == 1, table
            assert oldest[0]["p"].timestamp() > time.time() - 3 * DAY, table
        assert await _model_totals(store) == before == (5, Decimal("0.005"))
        await store.apply_retention(0)  # 0 keeps everything from now on
        tables = await store.query(
            "SELECT create_table_query AS q FROM system.tables WHERE database = {db:String} "
            "AND name = 'usage_events'", {"db": clickhouse_database},
        )  # fmt: skip
        assert " TTL " not in tables[0]["q"]
        kept = await store.query(
            "SELECT name, create_table_query AS q FROM system.tables WHERE database = "
            "{db:String} AND name LIKE 'active_keys_%' AND engine NOT LIKE '%View%'",
            {"db": clickhouse_database},
        )  # fmt: skip
        assert len(kept) == 2 and not [r for r in kept if " TTL " in r["q"]]
    finally:
        await store.close()


async def _model_totals(store: ClickHouseStore) -> tuple[int, Decimal]:
    rows = await store.query(
        "SELECT sum(requests) AS n, sum(cost_usd) AS cost FROM usage_daily", {}
    )
    return int(rows[0]["n"]), Decimal(str(rows[0]["cost"]))


async def test_every_table_with_a_key_hash_has_the_retention_ttl(
    clickhouse_url: str, clickhouse_database: str
) -> None:
    """Past the retention only model-level aggregates remain: whatever table keeps a key hash
    per row lives no longer than the raw events."""
    store = ClickHouseStore(clickhouse_url, clickhouse_database)
    await store.start()
    try:
        await store.apply_retention(30)
        keyed = await store.query(
            "SELECT t.name AS name, t.create_table_query AS q FROM system.columns c "
            "JOIN system.tables t ON t.database = c.database AND t.name = c.table "
            "WHERE c.database = {db:String} AND c.name = 'key_hash' AND t.engine NOT LIKE "
            "'%View%'", {"db": clickhouse_database},
        )  # fmt: skip
        assert {r["name"] for r in keyed} == {"usage_events", "usage_key_daily"}
        assert all(" TTL " in r["q"] for r in keyed)
        # The states of distinct keys are built from the key hashes: the same TTL.
        states = await store.query(
            "SELECT DISTINCT t.name AS name, t.create_table_query AS q FROM system.columns c "
            "JOIN system.tables t ON t.database = c.database AND t.name = c.table "
            "WHERE c.database = {db:String} AND c.type LIKE 'AggregateFunction(uniq%' "
            "AND t.engine NOT LIKE '%View%'", {"db": clickhouse_database},
        )  # fmt: skip
        assert {r["name"] for r in states} == {"active_keys_hourly", "active_keys_daily"}
        assert all("TTL period + toIntervalDay(30)" in r["q"] for r in states)
    finally:
        await store.close()


# --- orders and the ledger (APIFAST_ORDER_RETENTION_DAYS) -------------------------------------


async def _book(conn: asyncpg.Connection, key_id: int, kind: str, ref: str, amount: Decimal,
                when: datetime) -> None:  # fmt: skip
    """A ledger row and its effect on the balance, as the real paths book them."""
    await conn.execute(
        "INSERT INTO ledger (key_id, kind, ref, amount_usd, created_at) "
        "VALUES ($1, $2, $3, $4, $5)", key_id, kind, ref, amount, when,
    )  # fmt: skip
    spent = -amount if kind == "usage" else Decimal(0)
    await conn.execute(
        "UPDATE api_keys SET balance_usd = balance_usd + $2, spent_usd = spent_usd + $3 "
        "WHERE id = $1", key_id, amount, spent,
    )  # fmt: skip


async def _order(conn: asyncpg.Connection, order_id: str, key_id: int, created: datetime,
                 closed: datetime | None) -> None:  # fmt: skip
    await conn.execute(
        "INSERT INTO orders (id, key_id, amount_usd, processor, status, created_at, closed_at) "
        "VALUES ($1, $2, 5, 'fake', $3, $4, $5)",
        order_id, key_id, "finished" if closed else "waiting", created, closed,
    )  # fmt: skip
    await conn.execute(
        "INSERT INTO payments (processor, payment_id, order_id, status) "
        "VALUES ('fake', $1, $2, 'finished')", f"pay-{order_id}", order_id,
    )  # fmt: skip
    await conn.execute(
        "INSERT INTO order_events (order_id, status, source) VALUES ($1, 'finished', 'webhook')",
        order_id,
    )


async def _per_key(conn: asyncpg.Connection) -> dict[int, tuple[Decimal, Decimal, Decimal]]:
    """(ledger sum, balance, spent) per key."""
    rows = await conn.fetch(
        "SELECT k.id, k.balance_usd, k.spent_usd, "
        "(SELECT sum(amount_usd) FROM ledger l WHERE l.key_id = k.id) AS total FROM api_keys k"
    )
    return {r["id"]: (r["total"], r["balance_usd"], r["spent_usd"]) for r in rows}


async def test_old_orders_and_ledger_rows_go_and_balances_stay_exact(
    database_factory: Callable[[str], str], clickhouse_url: str, clickhouse_database: str
) -> None:
    settings = Settings(
        _env_file=None, database_url=database_factory("retention"), clickhouse_url=clickhouse_url,
        clickhouse_database=clickhouse_database, usage_retention_days=30,
        order_retention_days=30,
    )  # type: ignore[call-arg]  # fmt: skip
    await migrate_database(settings.database_url)
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=40), now - timedelta(hours=2)
    conn = await asyncpg.connect(settings.database_url)
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    store = ClickHouseStore(clickhouse_url, clickhouse_database)
    await store.start()
    try:
        keys: list[tuple[int, bytes]] = []
        for _ in range(2):
            async with conn.transaction():
                key, key_id, _ = await insert_key(conn, SECRET.encode(), Decimal("10"))
            keys.append((key_id, hash_key(SECRET.encode(), key)))
        await conn.execute("UPDATE ledger SET created_at = $1", old)  # keys made long ago
        events = []
        for key_id, key_hash in keys:
            for i, when in enumerate([old] * 3 + [recent] * 2):
                gid = f"gen-ret-{key_id}-{i}"
                cost = Decimal("0.010000") * (i + 1)
                await _book(conn, key_id, "usage", gid, -cost, when)
                events.append({"generation_id": gid, "key_hash": key_hash.hex(),
                               "model": "fast-chat", "cost_usd": str(cost),
                               "ts": int(when.timestamp() * 1000), "input_tokens": 1,
                               "output_tokens": 2})  # fmt: skip
            await _book(conn, key_id, "payment", f"pay-old-{key_id}", Decimal("5"), old)
            await _order(conn, f"ord_old_closed_{key_id}", key_id, old, old)
            await _order(conn, f"ord_old_open_{key_id}", key_id, old, None)
            await _order(conn, f"ord_recent_{key_id}", key_id, recent, recent)
        await store.insert_new_events(events)
        for gid, when in ((f"gen-ret-{keys[0][0]}-0", old), (f"gen-ret-{keys[0][0]}-3", recent)):
            await conn.execute(
                "INSERT INTO usage_overages (generation_id, key_id, model, overage_usd, "
                "created_at) VALUES ($1, $2, 'fast-chat', 0.5, $3)", gid, keys[0][0], when,
            )  # fmt: skip
        before = await _per_key(conn)
        assert all(total == balance for total, balance, _ in before.values())

        done = await apply_retention(pool, settings.order_retention_days)
        assert done is not None
        assert done.ledger_rows == 2 * (1 + 3 + 1)  # per key: credit, 3 debits, 1 payment
        assert (done.orders, done.payments, done.order_events) == (2, 2, 2)
        assert done.overages == 1  # the old request's; the recent one stays
        assert await conn.fetchval("SELECT count(*) FROM usage_overages") == 1

        # Expired rows are gone; each key has one carried-forward row instead.
        cutoff = now - timedelta(days=30)
        assert not await conn.fetchval(
            "SELECT count(*) FROM ledger WHERE created_at < $1 AND kind <> 'carried_forward'",
            cutoff,
        )
        carried = await conn.fetch(
            "SELECT key_id, amount_usd FROM ledger WHERE kind = 'carried_forward'"
        )
        assert {r["key_id"] for r in carried} == {key_id for key_id, _ in keys}
        assert {r["amount_usd"] for r in carried} == {Decimal("10") - Decimal("0.06") + 5}
        orders = {r["id"] for r in await conn.fetch("SELECT id FROM orders")}
        assert orders == {f"ord_{kind}_{key_id}" for key_id, _ in keys
                          for kind in ("old_open", "recent")}  # fmt: skip
        assert await conn.fetchval("SELECT count(*) FROM payments") == 4
        # Totals still add up: balances, spent, and each key's ledger sum, unchanged.
        assert await _per_key(conn) == before
        again = await apply_retention(pool, settings.order_retention_days)
        assert again is not None and again.ledger_rows == again.orders == 0
        assert await _per_key(conn) == before

        # ClickHouse drops the old raw events (TTL); reconcile still agrees over what both keep.
        await store.apply_retention(settings.usage_retention_days)
        for table in ("usage_events", "usage_key_daily"):
            await store.command(f"OPTIMIZE TABLE {table} FINAL")
        report = await reconcile(settings, now - timedelta(days=60), now + timedelta(hours=1))
        assert report.clean, report.to_text()
        compared = [(k.ledger_events, k.clickhouse_events) for k in report.keys]
        assert sorted(compared) == [(2, 2), (2, 2)]  # the recent events, on both sides
        assert report.start >= cutoff  # never where the ledger carried its rows forward
        daily = await store.query("SELECT sum(requests) AS n FROM usage_daily", {})
        assert daily[0]["n"] == len(events)  # model-level totals keep the old events
    finally:
        await store.close()
        await pool.close()
        await conn.close()


# --- per-minute rate windows (the meter's sweep) ----------------------------------------------


async def test_the_meters_sweep_drops_past_rate_windows(
    database_factory: Callable[[str], str],
) -> None:
    """Only this minute's and the previous minute's counts are read (the rpm and tpm limits);
    older windows go at each sweep of the meter, whatever the retention settings."""
    url = database_factory("rate_windows")
    await migrate_database(url)
    pool = await create_pool(url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn, conn.transaction():
            _, key_id, _ = await insert_key(conn, SECRET.encode(), Decimal("1"))
        minute = await pool.fetchval("SELECT floor(extract(epoch FROM now()) / 60)::bigint")
        await pool.execute(
            "INSERT INTO key_rate_windows (key_id, minute, requests, tokens) "
            "SELECT $1, $2 - ago, 3, 40 FROM unnest($3::bigint[]) ago",
            key_id, minute, [0, 2, 60, 100_000],
        )  # fmt: skip
        await release_expired(pool)
        rows = await pool.fetch(
            "SELECT minute, requests, tokens FROM key_rate_windows WHERE key_id = $1", key_id
        )
        # This minute's counts stay whole (were a minute to pass meanwhile, it is the previous
        # one, kept too); the older ones are gone.
        assert [tuple(r) for r in rows] == [(minute, 3, 40)]
    finally:
        await pool.close()
