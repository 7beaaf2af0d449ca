"""Usage retention, as the privacy policy promises: raw usage events and the per-key daily
rollup live APIFAST_USAGE_RETENTION_DAYS in ClickHouse; past it only model-level rollups
(no key hash) remain, and their totals still add up."""

from __future__ import annotations

import time
from decimal import Decimal

import orjson

from apifast.metering.clickhouse import ClickHouseStore
from apifast.metering.event import UsageEvent
from apifast.providers import Usage

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
        for table in ("usage_events", "usage_key_daily"):
            await store.command(f"OPTIMIZE TABLE {table} FINAL")  # what merges do in time
        raw = await store.query("SELECT generation_id FROM usage_events ORDER BY 1", {})
        assert [r["generation_id"] for r in raw] == ["gen-retention-10", "gen-retention-11"]
        per_key = await store.query("SELECT sum(requests) AS n FROM usage_key_daily", {})
        assert per_key[0]["n"] == 2  # the 40-day-old rows of the key are gone
        assert await _model_totals(store) == before == (5, Decimal("0.005"))
        await store.apply_retention(0)  # 0 keeps everything from now on
        tables = await store.query(
            "SELECT create_table_query AS q FROM system.tables WHERE database = {db:String} "
            "AND name = 'usage_events'", {"db": clickhouse_database},
        )  # fmt: skip
        assert " TTL " not in tables[0]["q"]
    finally:
        await store.close()


async def _model_totals(store: ClickHouseStore) -> tuple[int, Decimal]:
    rows = await store.query(
        "SELECT sum(requests) AS n, sum(cost_usd) AS cost FROM usage_daily", {}
    )
    return int(rows[0]["n"]), Decimal(str(rows[0]["cost"]))
