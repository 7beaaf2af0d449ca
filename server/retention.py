"""Postgres retention. Records kept to operate the service go once they are old, and the money
stays exact.

Always, whatever the settings:
- A sub-key's spend per UTC day (`sub_key_daily`) goes once it is three days old: only
  today's row is read (the daily cap, the children's usage), and the two days before are a
  margin for statements running across midnight.

With APIFAST_ORDER_RETENTION_DAYS, as the privacy policy promises:
- Ledger rows booked before the cutoff are deleted and their amounts added to their key's one
  `carried_forward` row, so each key's ledger still sums to the same total. Balances live in
  `api_keys` and are not touched: they stay exact.
- Orders closed before the cutoff go, with their payments and history. An open order stays.
- The per-request overage records before the cutoff go with their ledger rows.

The cutoff is at least 30 days back (settings): the ledger's unique generation id must outlive
every redelivery of an event (the stream keeps 7 days), or a late copy would be debited again;
and `apifast reconcile` looks no further back than the ledger keeps (metering/reconcile.py).
Every router runs the job about hourly; an advisory lock lets one at a time do it. Each
statement deletes at most `_BATCH` rows, so that no transaction runs long. (Holds, stream
checkpoints and rate windows expire within the minute: the meter's sweep removes them.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from apifast.ledger_retention import carry_ledger_forward
from apifast.metering.ledger import delete_old_overages
from apifast.orders.retention import delete_closed_orders
from apifast.router.retention import delete_past_sub_key_days

log = logging.getLogger("apifast.retention")

_LOCK = 0x61665F72  # pg advisory lock: one retention pass at a time across routers
_BATCH = 5000  # rows per statement, so that no transaction runs long
_EVERY_S = 3600.0


@dataclass
class RetentionPass:
    sub_key_days: int = 0  # rows of sub_key_daily
    ledger_rows: int = 0  # deleted, their sums carried forward
    overages: int = 0
    orders: int = 0
    payments: int = 0
    order_events: int = 0


def retention_cutoff(days: int, now: datetime | None = None) -> datetime:
    return (now or datetime.now(UTC)) - timedelta(days=days)


async def apply_retention(
    pool: asyncpg.Pool, order_days: int, *, now: datetime | None = None
) -> RetentionPass | None:
    """One pass: past days of sub-key spend always, then (unless `order_days` is 0, keep)
    ledger rows, overages and closed orders older than `order_days`. None when another
    process holds the pass."""
    done = RetentionPass()
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK):
            return None
        try:
            while True:
                n = await delete_past_sub_key_days(conn, _BATCH)
                done.sub_key_days += n
                if n < _BATCH:
                    break
            if order_days:
                await _apply_order_retention(conn, retention_cutoff(order_days, now), done)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)
    if done.ledger_rows or done.orders or done.sub_key_days:
        log.info("retention: %d ledger rows carried forward, %d closed orders deleted, "
                 "%d past days of sub-key spend deleted",
                 done.ledger_rows, done.orders, done.sub_key_days)  # fmt: skip
    return done


async def _apply_order_retention(
    conn: asyncpg.Connection, cutoff: datetime, done: RetentionPass
) -> None:
    while True:
        n = await carry_ledger_forward(conn, cutoff, _BATCH)
        done.ledger_rows += n
        if n < _BATCH:
            break
    done.overages = await delete_old_overages(conn, cutoff)
    while True:
        orders, payments, events = await delete_closed_orders(conn, cutoff, _BATCH)
        done.orders += orders
        done.payments += payments
        done.order_events += events
        if orders < _BATCH:
            break


class RetentionJob:
    """Runs `apply_retention` about hourly while the router runs."""

    def __init__(self, pool: asyncpg.Pool, order_days: int) -> None:
        self._pool, self._order_days = pool, order_days
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="apifast-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await apply_retention(self._pool, self._order_days)
            except Exception as exc:  # Postgres away: the next pass catches up
                log.warning("retention pass failed: %s", type(exc).__name__)
            await asyncio.sleep(_EVERY_S)
