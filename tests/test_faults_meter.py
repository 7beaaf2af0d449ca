"""The meter under faults: killed with SIGKILL mid-batch (a subprocess with its own chdb
path, restarted until done), ClickHouse down, Postgres down. In each case nothing is acked
until both stores have the batch, the meter catches up afterwards, and the audit of stream,
ledger and ClickHouse finds nothing lost and nothing doubled; balances are exact."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from apifast.key_admin import insert_key
from apifast.keys import hash_key
from apifast.server.migrations import migrate_database
from apifast.settings import Settings
from tests.fault_tools import (
    Audit,
    InProcessMeter,
    MeterProcess,
    audit,
    clickhouse_ids_in_subprocess,
    consumer_state,
    create_consumer,
    ledger_usage_ids,
    publish_events,
    stream_generation_ids,
    usage_events,
    wait_in_ledger,
)
from tests.harness import SECRET, stack_settings
from tests.services import database_url

CREDIT = Decimal("100.00")


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
            assert row["spent_usd"] == total
            assert row["balance_usd"] == CREDIT - total
    finally:
        await conn.close()


async def _until(predicate: Callable[[], object], what: str, timeout: float = 120) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():  # type: ignore[misc]
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


async def _ledger_count(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'"))
    finally:
        await conn.close()


@pytest.fixture
def meter_settings(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
    clickhouse_database: str, tmp_path: Path,
) -> Callable[..., Settings]:  # fmt: skip
    def make(**overrides: object) -> Settings:
        return stack_settings(
            database_url=database_factory("faults_meter"), nats_url=nats_url,
            clickhouse_url=clickhouse_url, clickhouse_database=clickhouse_database,
            data_dir=tmp_path / "data", models_file=None, **overrides,
        )  # fmt: skip

    return make


async def test_meter_killed_mid_batch_loses_and_doubles_nothing(
    meter_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = meter_settings(meter_batch_size=50)
    hashes = await _keys(settings)
    events = usage_events(hashes, 1500)
    await create_consumer(settings, ack_wait_s=2)
    await publish_events(settings, events)
    chdb_path = tmp_path / "meter-chdb"
    kills = 0

    # 1. Deterministically mid-batch: the meter has fetched a batch and is inside its
    # Postgres transaction (held up by our lock on the ledger) when it is killed.
    locker = await asyncpg.connect(settings.database_url)
    watcher = await asyncpg.connect(settings.database_url)
    meter = MeterProcess(settings, chdb_path, tmp_path / "meter")
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE ledger IN EXCLUSIVE MODE")
        meter.start()

        async def meter_blocked() -> bool:
            assert meter.alive(), meter.log()
            n = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
            return bool(n)

        await _until(meter_blocked, "the meter to block inside a batch")
        state = await consumer_state(settings)
        assert state["num_ack_pending"] > 0 and state["ack_floor"] == 0
        await meter.kill()
        kills += 1
        await tx.rollback()
        assert await _ledger_count(settings) == 0

        # 2. Killed again at arbitrary points while catching up.
        for threshold in (300, 700, 1100):
            meter = MeterProcess(settings, chdb_path, tmp_path / "meter")
            meter.start()

            async def past(threshold: int = threshold, meter: MeterProcess = meter) -> bool:
                assert meter.alive(), meter.log()
                return await _ledger_count(settings) >= threshold

            await _until(past, f"{threshold} events metered")
            await meter.kill()
            kills += 1

        # 3. A last run to the end, stopped cleanly.
        meter = MeterProcess(settings, chdb_path, tmp_path / "meter")
        meter.start()
        await wait_in_ledger(settings.database_url, [gid for gid, _, _ in events])

        async def all_acked() -> bool:
            state = await consumer_state(settings)
            return state["num_pending"] == 0 and state["num_ack_pending"] == 0

        await _until(all_acked, "every event to be acked")
        assert await meter.stop() == 0
    finally:
        if meter.alive():
            await meter.kill()
        await locker.close()
        await watcher.close()
    ch_ids = await asyncio.to_thread(
        clickhouse_ids_in_subprocess, chdb_path, settings.clickhouse_database
    )
    report = audit([gid for gid, _, _ in events], {
        "stream": await stream_generation_ids(settings.nats_url, settings.nats_stream),
        "ledger": await ledger_usage_ids(settings.database_url),
        "clickhouse": ch_ids,
    })  # fmt: skip
    print(f"\nmeter SIGKILL x{kills}: audit: {report}")
    assert report.clean, str(report)
    await _balances_exact(settings, events, hashes)


async def _audit_in_process(
    settings: Settings, meter: InProcessMeter, events: list[tuple[str, bytes, Decimal]]
) -> Audit:
    # The dashboards' rollups (filled by materialized views on insert) count each event once.
    rows = await meter.store.query(
        "SELECT sum(requests) AS n, sum(cost_usd) AS cost FROM usage_key_daily", {}
    )
    assert rows[0]["n"] == len(events)
    assert rows[0]["cost"] == sum(cost for _, _, cost in events)
    return audit([gid for gid, _, _ in events], {
        "stream": await stream_generation_ids(settings.nats_url, settings.nats_stream),
        "ledger": await ledger_usage_ids(settings.database_url),
        "clickhouse": await meter.ids(),
    })  # fmt: skip


async def test_clickhouse_down_stops_acks_and_the_meter_catches_up(
    meter_settings: Callable[..., Settings],
) -> None:
    settings = meter_settings(meter_batch_size=100)
    hashes = await _keys(settings)
    events = usage_events(hashes, 400, seed=11)
    await create_consumer(settings, ack_wait_s=30)
    async with InProcessMeter(settings) as meter:
        await meter.store.command("DETACH TABLE usage_events")  # ClickHouse "down"
        await publish_events(settings, events)

        async def failing() -> bool:
            return meter.meter.failures >= 2

        await _until(failing, "the meter to fail on ClickHouse")
        # Money goes first: the batches tried were debited in Postgres (once)...
        assert await _ledger_count(settings) > 0
        # ...but nothing is acked while ClickHouse is missing the events.
        state = await consumer_state(settings)
        assert state["ack_floor"] == 0, state
        assert state["num_pending"] + state["num_ack_pending"] == len(events), state

        await meter.store.command("ATTACH TABLE usage_events")  # back

        async def caught_up() -> bool:
            state = await consumer_state(settings)
            return state["ack_floor"] == len(events) and state["num_ack_pending"] == 0

        await _until(caught_up, "the meter to catch up")
        report = await _audit_in_process(settings, meter, events)
    print(f"\nClickHouse down: failed batches={meter.meter.failures} audit: {report}")
    assert report.clean, str(report)
    await _balances_exact(settings, events, hashes)


async def test_postgres_down_stops_acks_and_the_meter_catches_up(
    meter_settings: Callable[..., Settings], pg_server_url: str
) -> None:
    settings = meter_settings(meter_batch_size=100)
    hashes = await _keys(settings)
    events = usage_events(hashes, 400, seed=13)
    await create_consumer(settings, ack_wait_s=30)
    name = urlsplit(settings.database_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_server_url)
    try:
        async with InProcessMeter(settings) as meter:
            # Postgres "down" for the meter: its database vanishes under it (renamed away,
            # its connections cut). The shared server itself keeps running.
            while True:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    name,
                )
                try:
                    await admin.execute(f'ALTER DATABASE "{name}" RENAME TO "{name}_down"')
                    break
                except asyncpg.ObjectInUseError:
                    continue  # the pool reconnected in between; cut it again
            try:
                await publish_events(settings, events)

                async def failing() -> bool:
                    return meter.meter.failures >= 2

                await _until(failing, "the meter to fail on Postgres")
                state = await consumer_state(settings)
                assert state["ack_floor"] == 0, state
                assert state["num_pending"] + state["num_ack_pending"] == len(events), state
            finally:
                await admin.execute(f'ALTER DATABASE "{name}_down" RENAME TO "{name}"')

            async def caught_up() -> bool:
                state = await consumer_state(settings)
                return state["ack_floor"] == len(events) and state["num_ack_pending"] == 0

            await _until(caught_up, "the meter to catch up")
            report = await _audit_in_process(settings, meter, events)
    finally:
        await admin.close()
    print(f"\nPostgres down: failed batches={meter.meter.failures} audit: {report}")
    assert report.clean, str(report)
    await _balances_exact(settings, events, hashes)
    assert database_url(pg_server_url, name) == settings.database_url
