"""`apifast meter`: a durable JetStream pull consumer.

For each batch: insert the events ClickHouse does not have yet, then debit Postgres (the
ledger's unique generation id drops repeats), then ack. A failure in either store naks the
batch, which is redelivered later; both steps are idempotent, so a redelivery or a meter
killed mid-batch neither loses nor doubles anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg
import nats
import orjson
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from apifast.jetstream import ensure_usage_stream
from metering.clickhouse import ClickHouseStore
from metering.ledger import debit_batch, release_expired

log = logging.getLogger("apifast.meter")

_REQUIRED = ("generation_id", "key_hash", "model", "cost_usd", "ts")


class Meter:
    def __init__(
        self,
        *,
        nats_url: str,
        stream: str,
        subject: str,
        durable: str,
        pool: asyncpg.Pool,
        clickhouse: ClickHouseStore,
        batch_size: int = 500,
        batch_wait_s: float = 0.5,
    ) -> None:
        self.nats_url = nats_url
        self.stream = stream
        self.subject = subject
        self.durable = durable
        self.pool = pool
        self.clickhouse = clickhouse
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.processed = 0  # events newly counted, for tests and logs
        self._stop = asyncio.Event()
        self.idle = asyncio.Event()  # set whenever a fetch came back empty

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Consume until `stop()`; reconnects and retries on every failure."""
        housekeeping = asyncio.create_task(self._release_expired_forever())
        try:
            while not self._stop.is_set():
                try:
                    await self._consume()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - retried after a pause
                    log.warning("meter: %s; retrying", type(exc).__name__)
                    await self._sleep(1.0)
        finally:
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _release_expired_forever(self) -> None:
        while not self._stop.is_set():
            try:
                await release_expired(self.pool)
            except Exception as exc:  # noqa: BLE001 - Postgres may be down; try later
                log.warning("meter: releasing expired holds failed: %s", type(exc).__name__)
            await self._sleep(30)

    async def _consume(self) -> None:
        nc = await nats.connect(
            self.nats_url, name="apifast-meter", connect_timeout=2, max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )  # fmt: skip
        try:
            js = nc.jetstream()
            await ensure_usage_stream(js, self.stream, self.subject)
            sub = await js.pull_subscribe(
                self.subject,
                durable=self.durable,
                stream=self.stream,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=60,
                    max_ack_pending=self.batch_size * 4,
                ),
            )
            while not self._stop.is_set():
                try:
                    msgs = await sub.fetch(self.batch_size, timeout=self.batch_wait_s)
                except TimeoutError:
                    self.idle.set()
                    continue
                if not msgs:
                    self.idle.set()
                    continue
                self.idle.clear()
                await self._handle(msgs)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _handle(self, msgs: list[Msg]) -> None:
        events: list[dict[str, Any]] = []
        good: list[Msg] = []
        for msg in msgs:
            try:
                event = orjson.loads(msg.data)
                if not isinstance(event, dict) or any(k not in event for k in _REQUIRED):
                    raise ValueError("missing fields")
            except ValueError:
                # A malformed event can never succeed: terminate it instead of looping.
                log.error("meter: dropping malformed event (seq %s)", msg.metadata.sequence.stream)
                await msg.term()
                continue
            events.append(event)
            good.append(msg)
        if not events:
            return
        try:
            await self.process(events)
        except Exception:
            for msg in good:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=2)
            raise
        for msg in good:
            await msg.ack()

    async def process(self, events: list[dict[str, Any]]) -> None:
        """Write to ClickHouse, then debit Postgres. Safe to call again with the same events."""
        unique = list({e["generation_id"]: e for e in events}.values())
        await self.clickhouse.insert_new_events(unique)
        counted = await debit_batch(self.pool, unique)
        self.processed += len(counted)
