"""The meter as an operator sees it: a line when it starts and one when it stops (with no
password of a URL), and its backlog on /metrics, events waiting apart from events in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from apifast.keys import hash_key
from apifast.settings import Settings
from tests.fault_tools import (
    MeterProcess,
    funded_key,
    publish_events,
    usage_events,
    wait_in_ledger,
)
from tests.harness import SECRET, stack_settings


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 120) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


def _with_password(url: str, password: str) -> str:
    """The DSN with a password in it. The test server trusts local connections, so it is
    sent nowhere and refused by nothing: it only has to stay out of the log."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}"))


async def _funded_events(settings: Settings, count: int) -> list[tuple[str, bytes, Decimal]]:
    key, _ = await funded_key(settings, Decimal("5.00"))
    return usage_events([hash_key(SECRET.encode(), key)], count)


async def test_the_meter_logs_its_start_and_its_clean_stop(
    database_factory: Callable[[str], str], nats_url: str, tmp_path: Path
) -> None:
    """`apifast meter` once said nothing, at start or stop: an operator could not tell a
    meter that runs from one stuck connecting. The lines name the stream, the consumer and
    the batch size, then the events metered; never a URL (they carry passwords)."""
    password = "pw-canary-5e1b"
    url = _with_password(database_factory("meter_log"), password)
    assert password in url
    settings = stack_settings(
        database_url=url, nats_url=nats_url, clickhouse_url="", data_dir=tmp_path / "data",
        models_file=None, meter_batch_size=50,
    )  # fmt: skip
    events = await _funded_events(settings, 3)
    meter = MeterProcess(settings, tmp_path / "chdb", tmp_path / "meter")
    meter.env["APIFAST_LOG_LEVEL"] = "INFO"
    meter.start()
    try:

        async def started() -> bool:
            assert meter.alive(), meter.log()
            return "meter: started" in meter.log()

        await _until(started, "the meter's start line")
        await publish_events(settings, events)
        await wait_in_ledger(settings.database_url, [gid for gid, _, _ in events])
    finally:
        code = await meter.stop()
    log = meter.log()
    assert code == 0, log
    (start,) = [line for line in log.splitlines() if "meter: started" in line]
    for name in (settings.nats_stream, settings.nats_subject, settings.meter_durable, "50"):
        assert name in start, (name, start)
    (stop,) = [line for line in log.splitlines() if "meter: stopped" in line]
    assert "3 events metered" in stop, stop
    assert password not in log and "postgresql://" not in log and "chdb://" not in log


async def test_the_meter_exports_events_in_flight_apart_from_pending(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str, tmp_path: Path
) -> None:
    """apifast_meter_pending is JetStream's num_pending: events no meter has taken yet. A
    batch taken and not yet acked (held up in a store) left it, and was counted nowhere:
    apifast_meter_in_flight counts it (num_ack_pending), read beside the fetch loop, so it
    shows while the batch is held up. The ledger is locked, so a batch of 5 of the 12 is
    held inside the meter's Postgres step."""
    from apifast.db import create_pool
    from apifast.metering.clickhouse import ClickHouseStore
    from apifast.metering.consumer import Meter
    from apifast.metrics import Metrics

    settings = stack_settings(
        database_url=database_factory("meter_lag"), nats_url=nats_url,
        clickhouse_url=clickhouse_url, data_dir=tmp_path / "data", models_file=None,
        meter_batch_size=5,
    )  # fmt: skip
    events = await _funded_events(settings, 12)
    await publish_events(settings, events)
    locker = await asyncpg.connect(settings.database_url)
    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    store = ClickHouseStore(settings.clickhouse_url, settings.clickhouse_database)
    await store.start()
    meter = Meter.from_settings(settings, pool, store)
    meter.metrics = Metrics()
    registry = meter.metrics.registry
    assert "apifast_meter_in_flight" in {family.name for family in registry.collect()}

    def backlog() -> tuple[float | None, float | None]:
        return (registry.get_sample_value("apifast_meter_pending"),
                registry.get_sample_value("apifast_meter_in_flight"))  # fmt: skip

    task: asyncio.Task[None] | None = None
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE ledger IN EXCLUSIVE MODE")
        task = running = asyncio.create_task(meter.run())

        async def batch_held() -> bool:
            assert not running.done()
            return backlog() == (7, 5)

        await _until(batch_held, "the held batch to show as in flight")
        await tx.rollback()
        await wait_in_ledger(settings.database_url, [gid for gid, _, _ in events])

        async def drained() -> bool:
            return backlog() == (0, 0)

        await _until(drained, "the backlog to drain")
    finally:
        meter.stop()
        if task is not None:
            await task
        await locker.close()
        await store.close()
        await pool.close()
    assert meter.processed == 12
