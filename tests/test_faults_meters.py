"""Horizontal meters: two `apifast meter` processes share ONE durable JetStream consumer while
events are published under load; one is SIGKILLed inside a batch (its Postgres transaction
held up by our lock on the ledger), the other later at an arbitrary point, and both are
restarted. Every event is debited exactly once in the Postgres ledger, and the balances are
exact.

ClickHouse (docs/scaling.md, "Several meters"): meters that share one ClickHouse server dedupe
there too (a redelivered event is found before it is inserted), so with
APIFAST_TEST_CLICKHOUSE_URL set to a server the audit asks for exactly once in ClickHouse as
well. The embedded chdb engine is one process per path, so here each meter has its own store:
the test then shows that every event is in the union, that no store holds one twice, and it
counts the cross-store copies, which only events redelivered from a killed meter's unacked
batch can have (at most its max_ack_pending per kill)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import asyncpg

from apifast.key_admin import insert_key
from apifast.keys import hash_key
from apifast.server.migrations import migrate_database
from apifast.settings import Settings
from tests.fault_tools import (
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


def _server_ids(url: str, database: str) -> list[str]:
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=url, database=database)
    try:
        return [r[0] for r in client.query("SELECT generation_id FROM usage_events").result_rows]
    finally:
        client.close()


async def test_two_meters_share_one_consumer_and_survive_a_kill(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
    clickhouse_database: str, tmp_path: Path,
) -> None:  # fmt: skip
    shared = clickhouse_url if clickhouse_url.startswith("http") else ""
    settings = stack_settings(
        database_url=database_factory("faults_meters"), nats_url=nats_url,
        clickhouse_url=clickhouse_url, clickhouse_database=clickhouse_database,
        data_dir=tmp_path / "data", models_file=None, meter_batch_size=BATCH,
    )  # fmt: skip
    hashes = await _keys(settings)
    events = usage_events(hashes, 3000, seed=21)
    await create_consumer(settings, ack_wait_s=2)
    await publish_events(settings, events[:1000])
    paths = [tmp_path / "chdb-a", tmp_path / "chdb-b"]

    def meter(n: int) -> MeterProcess:
        return MeterProcess(settings, paths[n], tmp_path / f"meter-{n}", clickhouse_url=shared)

    locker = await asyncpg.connect(settings.database_url)
    watcher = await asyncpg.connect(settings.database_url)
    meters = [meter(0), meter(1)]
    publishing: asyncio.Task[None] | None = None
    kills = 0
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

        # 2. Under load: the rest is published while the survivor works and the killed meter
        # comes back; then the other one is killed at an arbitrary point and restarted.
        publishing = asyncio.create_task(publish_events(settings, events[1000:]))
        meters[0] = meter(0)
        meters[0].start()

        async def ledger_past(n: int) -> bool:
            assert all(m.alive() for m in meters), [m.log() for m in meters]
            return int(await watcher.fetchval(
                "SELECT count(*) FROM ledger WHERE kind = 'usage'")) >= n  # fmt: skip

        await _until(lambda: ledger_past(1600), "1600 events metered")
        await meters[1].kill()
        kills += 1
        meters[1] = meter(1)
        meters[1].start()
        await publishing
        await wait_in_ledger(settings.database_url, [gid for gid, _, _ in events], timeout=300)

        async def all_acked() -> bool:
            state = await consumer_state(settings)
            return state["num_pending"] == 0 and state["num_ack_pending"] == 0

        await _until(all_acked, "every event to be acked")
        for m in meters:
            assert await m.stop() == 0, m.log()
    finally:
        if publishing is not None and not publishing.done():
            publishing.cancel()
        for m in meters:
            if m.alive():
                await m.kill()
        await locker.close()
        await watcher.close()

    expected = [gid for gid, _, _ in events]
    if shared:
        stores = {"clickhouse": _server_ids(shared, settings.clickhouse_database)}
    else:
        stores = {
            f"clickhouse-{n}": await asyncio.to_thread(
                clickhouse_ids_in_subprocess, path, settings.clickhouse_database
            )
            for n, path in enumerate(paths)
        }
    report = audit(expected, {
        "stream": await stream_generation_ids(settings.nats_url, settings.nats_stream),
        "ledger": await ledger_usage_ids(settings.database_url),
    })  # fmt: skip
    assert report.clean, str(report)  # money: every event debited exactly once
    if shared:
        ch = audit(expected, stores)
        print(f"\ntwo meters, shared ClickHouse, SIGKILL x{kills}: {report}; {ch}")
        assert ch.clean, str(ch)
    else:
        union = Counter(gid for ids in stores.values() for gid in ids)
        for name, ids in stores.items():
            assert ids, f"{name} got nothing: the meters did not share the consumer"
            assert len(ids) == len(set(ids)), f"{name} holds an event twice"
        assert set(union) == set(expected)  # none lost in ClickHouse
        cross = sum(n - 1 for n in union.values())
        print(f"\ntwo meters, chdb each, SIGKILL x{kills}: {report}; "
              f"per store {[len(v) for v in stores.values()]}, cross-store copies={cross}")  # fmt: skip
        # Only a killed meter's unacked events can be written by both meters.
        assert cross <= kills * BATCH * 4
    await _balances_exact(settings, events, hashes)


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
