"""The dashboards' rollups after a ClickHouse insert that died half-way: the raw rows were
stored, (some of) the materialized views' rows were not. The meter, finding those events
already stored on redelivery, must repair the rollups, so that `/v1/usage` (which reads
`usage_key_daily`) adds up to the ledger again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from apifast.key_admin import insert_key
from apifast.keys import hash_key
from apifast.metering.rollups import Scope
from apifast.server.migrations import migrate_database
from apifast.settings import Settings
from tests.fault_tools import (
    InProcessMeter,
    MeterProcess,
    RouterProcess,
    consumer_state,
    create_consumer,
    publish_events,
    usage_events,
)
from tests.harness import SECRET, models_toml, stack_settings
from tests.rollup_probe import run_probe

CREDIT = Decimal("100.00")


@pytest.fixture
def meter_settings(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
    clickhouse_database: str, tmp_path: Path,
) -> Callable[..., Settings]:  # fmt: skip
    def make(**overrides: object) -> Settings:
        return stack_settings(
            database_url=database_factory("faults_rollups"), nats_url=nats_url,
            clickhouse_url=clickhouse_url, clickhouse_database=clickhouse_database,
            data_dir=tmp_path / "data", models_file=None, **overrides,
        )  # fmt: skip

    return make


async def _keys(settings: Settings, n: int) -> list[str]:
    await migrate_database(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        keys = []
        for _ in range(n):
            async with conn.transaction():
                key, _, _ = await insert_key(conn, SECRET.encode(), CREDIT)
            keys.append(key)
        return keys
    finally:
        await conn.close()


async def _ledger(settings: Settings, key_hash: bytes) -> tuple[int, Decimal]:
    """The key's usage debits: how many, and their sum."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, coalesce(-sum(l.amount_usd), 0) AS usd FROM ledger l "
            "JOIN api_keys k ON k.id = l.key_id WHERE l.kind = 'usage' AND k.key_hash = $1",
            key_hash,
        )
        assert row is not None
        return int(row["n"]), Decimal(row["usd"])
    finally:
        await conn.close()


async def _until(predicate: Callable[[], object], what: str, timeout: float = 120) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():  # type: ignore[misc]
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


class Gate:
    """An HTTP server on 127.0.0.1 that accepts the gate view's POST and never answers:
    `reached` is set once an insert is held inside the gate."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self._held: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.url = ""

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # the request line: the insert is inside the gate
        self._held.append(writer)
        self.reached.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gate]:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/gate"
        try:
            yield self
        finally:
            for writer in self._held:
                writer.close()
            self._server.close()
            await self._server.wait_closed()


async def test_meter_killed_mid_insert_leaves_usage_equal_to_the_ledger(
    meter_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = meter_settings(meter_batch_size=50)
    keys = await _keys(settings, 3)
    hashes = [hash_key(SECRET.encode(), k) for k in keys]
    events = usage_events(hashes, 300, seed=21)
    await create_consumer(settings, ack_wait_s=2)
    await publish_events(settings, events)
    chdb_path = tmp_path / "meter-chdb"
    db = settings.clickhouse_database

    # Kill the meter while its insert is held inside the gate: the raw rows of the batch are
    # stored, and the views after the gate have not run. ClickHouse runs the views
    # concurrently, in no fixed order, so usage_key_daily is sometimes already written when
    # the gate holds the insert; then the meter is restarted and killed in the next insert.
    crashed: dict[str, Any] = {"differences": []}
    kills = 0
    async with Gate().running() as gate:
        await asyncio.to_thread(run_probe, chdb_path, db, "gate", gate.url)
        while "usage_key_daily" not in crashed["differences"] and kills < 10:
            gate.reached.clear()
            meter = MeterProcess(settings, chdb_path, tmp_path / "meter")
            try:
                meter.start()

                async def held(meter: MeterProcess = meter) -> bool:
                    assert meter.alive(), meter.log()
                    return gate.reached.is_set()

                await _until(held, "the meter's insert to reach the gate")
                await meter.kill()
                kills += 1
            finally:
                if meter.alive():
                    await meter.kill()
            crashed = await asyncio.to_thread(run_probe, chdb_path, db, "state")
    # What the crash left: raw rows that usage_key_daily does not count.
    assert "usage_key_daily" in crashed["differences"], crashed
    assert crashed["key_daily_requests"] < crashed["raw_events"], crashed
    await asyncio.to_thread(run_probe, chdb_path, db, "ungate")

    meter = MeterProcess(settings, chdb_path, tmp_path / "meter")
    try:
        meter.start()

        async def all_acked() -> bool:
            assert meter.alive(), meter.log()
            state = await consumer_state(settings)
            return state["ack_floor"] == len(events) and state["num_ack_pending"] == 0

        await _until(all_acked, "every event to be acked")
        assert await meter.stop() == 0
    finally:
        if meter.alive():
            await meter.kill()
    after = await asyncio.to_thread(run_probe, chdb_path, db, "state")
    assert after["raw_events"] == len(events) and after["differences"] == [], after
    assert Decimal(after["key_daily_cost"]) == sum(cost for _, _, cost in events)

    # /v1/usage, served from the meter's data, adds up to the ledger for every key.
    models = tmp_path / "models.toml"
    models.write_text(models_toml("http://127.0.0.1:9/v1"))  # never called: usage reads only
    router = RouterProcess(settings, tmp_path / "router")
    router.env["APIFAST_CLICKHOUSE_URL"] = f"chdb://{chdb_path}"
    router.env["APIFAST_MODELS_FILE"] = str(models)
    router.start()
    try:
        await router.wait_ready()
        async with httpx.AsyncClient(base_url=router.base_url, timeout=30) as client:
            for key, key_hash in zip(keys, hashes, strict=True):
                usage = (await client.get(
                    "/v1/usage", headers={"Authorization": f"Bearer {key}"}
                )).json()  # fmt: skip
                n, usd = await _ledger(settings, key_hash)
                assert n == len(events) // len(keys)
                assert usage["total_requests"] == n, usage
                assert Decimal(usage["total_cost_usd"]) == usd, usage
    finally:
        await router.stop()
    assert "correction rows" in meter.log(), meter.log()  # the meter's repair did it
    print(f"\nmeter SIGKILL mid-insert (x{kills}): after the crash {crashed}; repaired")


async def test_a_view_failing_mid_insert_is_repaired_on_redelivery(
    meter_settings: Callable[..., Settings],
) -> None:
    settings = meter_settings(meter_batch_size=40)
    keys = await _keys(settings, 2)
    events = usage_events([hash_key(SECRET.encode(), k) for k in keys], 120, seed=23)
    await create_consumer(settings, ack_wait_s=30)
    async with InProcessMeter(settings) as meter:
        store = meter.store
        # A view that always fails, after the raw rows were written: every batch's insert
        # fails once; its redelivery finds the rows stored and repairs the rollups.
        await store.command("CREATE TABLE probe_sink (n UInt8) ENGINE = Null")
        await store.command(
            "CREATE MATERIALIZED VIEW probe_fail_mv TO probe_sink AS SELECT "
            "throwIf(count() > 0, 'probe: view down') AS n FROM usage_events"
        )
        try:
            await publish_events(settings, events)

            async def caught_up() -> bool:
                state = await consumer_state(settings)
                return state["ack_floor"] == len(events) and state["num_ack_pending"] == 0

            await _until(caught_up, "the meter to catch up")
        finally:
            await store.command("DROP VIEW probe_fail_mv")
        assert meter.meter.failures >= len(events) // 40, "every insert failed in the view"
        rows = await store.query(
            "SELECT sum(requests) AS n, sum(cost_usd) AS cost FROM usage_key_daily", {}
        )
        assert rows[0]["n"] == len(events)
        assert rows[0]["cost"] == sum(cost for _, _, cost in events)
        span = (await store.query("SELECT min(ts) AS lo, max(ts) AS hi FROM usage_events", {}))[0]
        scope = Scope.between(span["lo"], span["hi"] + timedelta(seconds=1))
        assert await store.rollup_differences(scope) == []
        assert store.rollup_corrections > 0  # the meter's repair did it
