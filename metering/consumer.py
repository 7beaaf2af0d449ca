"""`apifast meter`: a durable JetStream pull consumer.

For each batch: debit Postgres (the ledger's unique generation id drops repeats), then insert
the events ClickHouse does not have yet (under a Postgres advisory lock, so that several
meters sharing one ClickHouse never both insert an event), then ack. Money goes first so
that balances do not wait on analytics. When either store fails the batch is nak'ed and
nothing is acked; the meter backs off and retries until the store is back, then catches up
on the backlog. Both steps are idempotent, so a redelivery or a meter killed mid-batch
neither loses nor doubles anything. Events found already in ClickHouse on redelivery get
their dashboard rollups checked and repaired (`rollups.py`): the insert that stored them may
have died before every materialized view had run.

Reservations of crashed routers are released once they expire, but only while the meter is
caught up with the stream: an event still waiting in the stream settles its own hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import nats
import orjson
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from apifast.metering.clickhouse import ClickHouseStore
from apifast.metering.event import event_problem
from apifast.metering.ledger import (
    abandoned_streams,
    capped_debit,
    debit_batch,
    drop_settled_checkpoints,
    record_checkpoints,
    release_expired,
)
from apifast.metering.stream import NatsErrorLog, ensure_usage_stream, nats_servers
from apifast.metrics import Metrics
from apifast.tracing import Tracer

if TYPE_CHECKING:
    from apifast.settings import Settings

log = logging.getLogger("apifast.meter")
T = TypeVar("T")

_MAX_BACKOFF_S = 10.0
# Postgres advisory lock held around each batch's ClickHouse check-and-insert: with several
# meters on one ClickHouse, two of them can hold the same event at once (a message left in
# one meter's fetch queue past its ack wait is redelivered to another), and both would find
# it missing and insert it. The lock makes check-and-insert one step across meters; Postgres
# debits still run in parallel. A dead meter's lock goes with its connection.
CLICKHOUSE_WRITE_LOCK = 0x61665F63
_LAG_EVERY_S = 5.0  # how often the consumer's backlog is read for /metrics


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
        ack_wait_s: float = 60.0,
        sweep_s: float = 30.0,
        replicas: int = 1,
    ) -> None:
        self.nats_url = nats_url
        self.stream = stream
        self.subject = subject
        self.durable = durable
        self.pool = pool
        self.clickhouse = clickhouse
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.ack_wait_s = ack_wait_s
        self.sweep_s = sweep_s  # how often expired holds are looked for
        self.replicas = replicas  # of the usage stream, when this meter creates it
        self.processed = 0  # events newly counted, for tests and logs
        self.failures = 0  # batches that failed and were nak'ed
        self.overages = 0  # events debited whose upstream usage went beyond the hold
        self.nats_errors = NatsErrorLog("apifast-meter")
        self._stop = asyncio.Event()
        self.idle = asyncio.Event()  # set whenever a fetch came back empty
        self.metrics: Metrics | None = None  # set by the composition root
        self.tracer: Tracer | None = None  # likewise, when APIFAST_OTEL_ENDPOINT is set

    @classmethod
    def from_settings(
        cls, settings: Settings, pool: asyncpg.Pool, clickhouse: ClickHouseStore
    ) -> Meter:
        """The meter `apifast meter` and `apifast serve`/`dev` run, configured by settings."""
        return cls(
            nats_url=settings.nats_url,
            stream=settings.nats_stream,
            subject=settings.nats_subject,
            durable=settings.meter_durable,
            pool=pool,
            clickhouse=clickhouse,
            batch_size=settings.meter_batch_size,
            batch_wait_s=settings.meter_batch_wait_s,
            sweep_s=settings.reservation_sweep_s,
            replicas=settings.nats_replicas,
        )

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Consume until `stop()`; reconnects and retries on every failure."""
        # Names and sizes only: the URLs may carry passwords.
        log.info("meter: started on stream %s (subject %s) as consumer %s, batches of up to "
                 "%d events", self.stream, self.subject, self.durable, self.batch_size)  # fmt: skip
        housekeeping = asyncio.create_task(self._release_expired_forever())
        try:
            while not self._stop.is_set():
                try:
                    await self._consume()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # retried after a pause
                    log.warning("meter: %s; retrying", type(exc).__name__)
                    await self._sleep(1.0)
            log.info("meter: stopped; %d events metered, %d batches retried",
                     self.processed, self.failures)  # fmt: skip
        finally:
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _release_expired_forever(self) -> None:
        while not self._stop.is_set():
            # Only when caught up: a hold whose event is still in the stream is not abandoned.
            await self.idle.wait()
            try:
                await self.sweep()
            except Exception as exc:  # Postgres may be down; try later
                log.warning("meter: releasing expired holds failed: %s", type(exc).__name__)
            await self._sleep(self.sweep_s)

    async def sweep(self) -> None:
        """Bill the streams whose router died (at their latest checkpoint), then release
        the other expired holds."""
        abandoned = await abandoned_streams(self.pool)
        if abandoned:
            log.warning("meter: billing %d abandoned stream(s) at their last checkpoint",
                        len(abandoned))  # fmt: skip
            await self.process(abandoned)
        await release_expired(self.pool)
        await drop_settled_checkpoints(self.pool)

    async def _consume(self) -> None:
        nc = await nats.connect(
            nats_servers(self.nats_url), name="apifast-meter", connect_timeout=2,
            max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            error_cb=self.nats_errors.report,
        )  # fmt: skip
        try:
            js = nc.jetstream()
            await ensure_usage_stream(js, self.stream, self.subject, self.replicas)
            sub = await js.pull_subscribe(
                self.subject,
                durable=self.durable,
                stream=self.stream,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=self.ack_wait_s,
                    max_ack_pending=self.batch_size * 4,
                ),
            )
            info = await sub.consumer_info()
            ack_wait = info.config.ack_wait or self.ack_wait_s
            lag = None if self.metrics is None else asyncio.create_task(self._read_lag(sub))
            try:
                await self._fetch_until_stopped(sub, ack_wait)
            finally:
                if lag is not None:
                    lag.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await lag
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _read_lag(self, sub: JetStreamContext.PullSubscription) -> None:
        """Export the consumer's backlog every few seconds, until cancelled. Beside the loop
        that fetches, not in it: a batch held up in a store shows as in flight while it is."""
        assert self.metrics is not None
        while True:
            with contextlib.suppress(Exception):
                info = await sub.consumer_info()
                self.metrics.meter_lag.set(info.num_pending or 0)
                self.metrics.meter_in_flight.set(info.num_ack_pending or 0)
            await asyncio.sleep(_LAG_EVERY_S)

    async def _fetch_until_stopped(
        self, sub: JetStreamContext.PullSubscription, ack_wait: float
    ) -> None:
        backoff = 0.0
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
            if await self._handle(msgs, ack_wait):
                backoff = 0.0
                continue
            # A store is down: nothing was acked. Wait, then take the batch again.
            backoff = min(_MAX_BACKOFF_S, max(0.5, backoff * 2))
            await self._sleep(backoff)

    async def _handle(self, msgs: list[Msg], ack_wait: float) -> bool:
        """Store a batch and ack it; False (and every message nak'ed) when a store failed."""
        events: list[dict[str, Any]] = []
        good: list[Msg] = []
        for msg in msgs:
            try:
                event = orjson.loads(msg.data)
                problem = event_problem(event)
            except ValueError:
                problem = "not JSON"
            if problem is not None:
                # It can never succeed: terminate it instead of blocking every later event.
                log.error("meter: dropping malformed event (seq %s): %s",
                          msg.metadata.sequence.stream, problem)  # fmt: skip
                await msg.term()
                continue
            events.append(event)
            good.append(msg)
        if not events:
            return True
        heartbeat = asyncio.create_task(_keep_in_progress(good, ack_wait))
        try:
            await self._traced("meter.batch", self.process(events), len(events))
        except Exception as exc:
            self.failures += 1
            log.warning("meter: batch of %d failed (%s); will retry", len(good), type(exc).__name__)
            for msg in good:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1)
            return False
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        for msg in good:
            await msg.ack()
        return True

    async def process(self, events: list[dict[str, Any]]) -> None:
        """Debit Postgres, then write to ClickHouse. Safe to call again with the same events."""
        checkpoints = [e for e in events if e.get("checkpoint")]
        if checkpoints:
            await record_checkpoints(self.pool, checkpoints)
            events = [e for e in events if not e.get("checkpoint")]
        unique = list({e["generation_id"]: e for e in events}.values())
        if not unique:
            return
        overages: dict[str, tuple[str, Decimal]] = {}  # generation id -> (model, overage)
        for event in unique:
            # ClickHouse shows what the ledger debits: the cost capped at the hold.
            debit, overage = capped_debit(event)
            if overage:
                event["cost_usd"], event["overage_usd"] = str(debit), str(overage)
                overages[event["generation_id"]] = (str(event.get("model", "")), overage)
        try:
            counted = await self._traced("meter.postgres", debit_batch(self.pool, unique))
        except Exception:
            self._store_failed("postgres")
            raise
        # Counted once: only for the events this batch debited (a redelivery debits nothing).
        for generation_id in counted & overages.keys():
            model, overage = overages[generation_id]
            self.overages += 1
            if self.metrics is not None:
                self.metrics.overage(model, overage)
        try:
            async with self.pool.acquire() as conn:
                # Released by hand, and by the pool's reset if this is cancelled.
                await conn.execute("SELECT pg_advisory_lock($1)", CLICKHOUSE_WRITE_LOCK)
                try:
                    await self._traced(
                        "meter.clickhouse", self.clickhouse.insert_new_events(unique)
                    )
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1)", CLICKHOUSE_WRITE_LOCK)
        except Exception:
            self._store_failed("clickhouse")
            raise
        self.processed += len(counted)
        if self.metrics is not None:
            self.metrics.meter_events.inc(len(counted))

    async def _traced(self, name: str, step: Awaitable[T], events: int = 0) -> T:
        """`step`, in a span when tracing is on (counts only: no event's content)."""
        if self.tracer is None:
            return await step
        return await self.tracer.within(name, step, {"apifast.events": events} if events else None)

    def _store_failed(self, store: str) -> None:
        if self.metrics is not None:
            self.metrics.store_errors.labels(store).inc()


async def _keep_in_progress(msgs: list[Msg], ack_wait: float) -> None:
    """Tell the server the batch is still being worked on, so a slow store does not get
    it redelivered (to another meter) while this one still holds it."""
    interval = max(0.5, ack_wait / 3) if math.isfinite(ack_wait) else 10.0
    while True:
        await asyncio.sleep(interval)
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.in_progress()
