"""Horizontal meters: two `apifast meter` processes share ONE durable JetStream consumer and
ONE ClickHouse while events are published under load. One meter is SIGKILLed inside a batch
(in its Postgres transaction, held by our lock on the ledger), and the survivor takes its
batch; then both are killed while one's ClickHouse write was sent and not acked (the write
lands after it died; the restarted meters get the batch again); then one is killed at an
arbitrary point; each comes back. Every event
is debited exactly once in the ledger, stored exactly once in ClickHouse (its rollups count it
once), and the balances are exact.

ClickHouse is a server in production. Here it is the real chdb engine behind its HTTP
interface in a process of its own (tests/fakes/clickhouse_http.py), because chdb is one
process per path and there is no server binary; APIFAST_TEST_CLICKHOUSE_URL=http://... runs
the test against a real server instead (without the held-write step, which needs the shim).
Why meters must share one ClickHouse: docs/scaling.md, "Several meters"."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from apifast.key_admin import insert_key
from apifast.keys import hash_key
from apifast.server.migrations import migrate_database
from apifast.settings import Settings
from tests.fault_tools import (
    MeterProcess,
    SharedClickHouse,
    audit,
    consumer_state,
    create_consumer,
    ledger_usage_ids,
    publish_events,
    stream_generation_ids,
    usage_events,
    wait_in_ledger,
)
from tests.harness import SECRET, stack_settings

CREDIT = Decimal("100.00")
BATCH = 50


async def _keys(settings: Settings, n: int = 4) -> list[bytes]:
    await migrate_database(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        hashes = []
        for _ in range(n):
            async with conn.transaction():
                key, _, _ = await insert_key(conn, SECRET.encode(), CREDIT)
            hashes.append(hash_key(SECRET.encode(), key))
        return hashes
    finally:
        await conn.close()


async def _until(predicate: Callable[[], object], what: str, timeout: float = 180) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():  # type: ignore[misc]
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


async def test_two_meters_share_one_consumer_and_survive_kills(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    shim = None
    if clickhouse_url.startswith("http"):
        shared = clickhouse_url
    else:
        shim = SharedClickHouse(tmp_path / "chdb", tmp_path / "clickhouse")
        await shim.start()
        shared = shim.url
    settings = stack_settings(
        database_url=database_factory("faults_meters"), nats_url=nats_url,
        clickhouse_url=shared, data_dir=tmp_path / "data", models_file=None,
        meter_batch_size=BATCH,
    )  # fmt: skip
    hashes = await _keys(settings)
    events = usage_events(hashes, 3000, seed=21)
    await create_consumer(settings, ack_wait_s=2)
    await publish_events(settings, events[:1000])

    def meter(n: int) -> MeterProcess:
        return MeterProcess(settings, tmp_path / "unused", tmp_path / f"meter-{n}",
                            clickhouse_url=shared)  # fmt: skip

    locker = await asyncpg.connect(settings.database_url)
    watcher = await asyncpg.connect(settings.database_url)
    meters = [meter(0), meter(1)]
    publishing: asyncio.Task[None] | None = None
    kills = 0

    async def ledger_count() -> int:
        return int(await watcher.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'"))

    try:
        # 1. Both meters inside a batch, held in their Postgres transaction by our lock; one
        # of them is killed there. Its unacked batch goes to the other after the ack wait.
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE ledger IN EXCLUSIVE MODE")
        for m in meters:
            m.start()

        async def both_blocked() -> bool:
            assert all(m.alive() for m in meters), [m.log() for m in meters]
            n = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
            return bool(n >= 2)

        await _until(both_blocked, "both meters to block inside a batch")
        state = await consumer_state(settings)
        assert state["num_ack_pending"] > BATCH, state  # two batches out, one consumer
        await meters[0].kill()
        kills += 1
        await tx.rollback()
        meters[0] = meter(0)
        meters[0].start()

        if shim is not None:
            # 2. Killed between the ClickHouse write and the ack: a meter has debited a batch
            # and sent its insert, which the store holds (the other waits for the ClickHouse
            # write lock, its batch debited too). Both die; then the insert lands. Their
            # batches come back to the restarted meters, which find the rows and add none.
            await _until(lambda: ledger_past(ledger_count, 200), "200 events metered")
            await shim.hold()

            async def writing() -> bool:
                assert all(m.alive() for m in meters), [m.log() for m in meters]
                return await shim.held() >= 1

            await _until(writing, "a meter to send a ClickHouse insert")
            for m in meters:
                await m.kill()
                kills += 1
            await shim.release()

            async def landed() -> bool:
                return await shim.held() == 0

            await _until(landed, "the held insert to land")
            meters = [meter(0), meter(1)]
            for m in meters:
                m.start()

        # 3. Under load: the rest is published while the meters work; one is killed at an
        # arbitrary point and restarted.
        publishing = asyncio.create_task(publish_events(settings, events[1000:]))
        await _until(lambda: ledger_past(ledger_count, 1600), "1600 events metered")
        assert all(m.alive() for m in meters), [m.log() for m in meters]
        await meters[0].kill()
        kills += 1
        meters[0] = meter(0)
        meters[0].start()
        await publishing
        await wait_in_ledger(settings.database_url, [gid for gid, _, _ in events], timeout=300)

        async def all_acked() -> bool:
            state = await consumer_state(settings)
            return state["num_pending"] == 0 and state["num_ack_pending"] == 0

        await _until(all_acked, "every event to be acked")
        for m in meters:
            assert await m.stop() == 0, m.log()
        logs = "".join(m.log() for m in meters)

        expected = [gid for gid, _, _ in events]
        db = settings.clickhouse_database
        read = shim.query if shim is not None else _server_query(shared)
        ch_ids = [r[0] for r in await asyncio.to_thread(
            read, db, "SELECT generation_id FROM usage_events")]  # fmt: skip
        report = audit(expected, {
            "stream": await stream_generation_ids(settings.nats_url, settings.nats_stream),
            "ledger": await ledger_usage_ids(settings.database_url),
            "clickhouse": ch_ids,
        })  # fmt: skip
        # The dashboards' rollups (materialized views, filled on insert) count each once too.
        rollups = await asyncio.to_thread(read, db, "SELECT sum(requests) FROM usage_key_daily")
        held = await shim.held() if shim is not None else 0
    finally:
        if publishing is not None and not publishing.done():
            publishing.cancel()
        for m in meters:
            if m.alive():
                await m.kill()
        await locker.close()
        await watcher.close()
        if shim is not None:
            shim.stop()
    print(f"\ntwo meters, one consumer, one ClickHouse, SIGKILL x{kills}: audit: {report}")
    assert report.clean, str(report)
    assert rollups[0][0] == len(events), logs
    assert held == 0
    assert "Traceback" not in logs, logs
    await _balances_exact(settings, events, hashes)


async def ledger_past(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n


def _server_query(url: str) -> Callable[[str, str], list[tuple[Any, ...]]]:
    def read(database: str, sql: str) -> list[tuple[Any, ...]]:
        import clickhouse_connect

        client = clickhouse_connect.get_client(dsn=url, database=database)
        try:
            return list(client.query(sql).result_rows)
        finally:
            client.close()

    return read


async def _balances_exact(settings: Settings, events: list[tuple[str, bytes, Decimal]],
                          hashes: list[bytes]) -> None:  # fmt: skip
    spent = {h: Decimal(0) for h in hashes}
    for i, (_, _, cost) in enumerate(events):
        spent[hashes[i % len(hashes)]] += cost
    conn = await asyncpg.connect(settings.database_url)
    try:
        for key_hash, total in spent.items():
            row = await conn.fetchrow(
                "SELECT balance_usd, spent_usd FROM api_keys WHERE key_hash = $1", key_hash
            )
            assert row is not None
            assert (row["spent_usd"], row["balance_usd"]) == (total, CREDIT - total)
    finally:
        await conn.close()
