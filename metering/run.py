"""Runs the meter as its own process (`apifast meter`) until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal

from apifast.db import create_pool
from apifast.metering.clickhouse import ClickHouseStore
from apifast.metering.consumer import Meter
from apifast.metrics import Metrics, MetricsServer
from apifast.settings import Settings
from apifast.tracing import Tracer


async def run_meter(settings: Settings) -> None:
    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    clickhouse = ClickHouseStore(settings.clickhouse_url, settings.clickhouse_database)
    await clickhouse.start()
    await clickhouse.apply_retention(settings.usage_retention_days)
    meter = Meter.from_settings(settings, pool, clickhouse)
    server = None
    if settings.metrics_listen:
        meter.metrics = Metrics()
        server = MetricsServer(meter.metrics.registry, settings.metrics_listen)
        server.start()
    if settings.otel_endpoint:
        meter.tracer = Tracer(settings.otel_endpoint, "apifast-meter")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, meter.stop)
    try:
        await meter.run()
    finally:
        if server is not None:
            server.stop()
        if meter.tracer is not None:
            await asyncio.to_thread(meter.tracer.shutdown)  # exports the last batches' spans
        await clickhouse.close()
        await pool.close()
