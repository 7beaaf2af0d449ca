"""Settling holds to the exact cost as soon as a response ends, off the request path.

A hold is an upper bound (the whole `max_tokens`); the exact cost is known when the answer
ends, well before the meter debits it. The settler shrinks each finished request's hold to
its cost, in batches (one round trip for everything that finished meanwhile), so the rest
of the bound stops blocking the balance. Requests waiting for held-up balance are woken
after each batch. The meter's debit is still the only change to a balance: a settle that
comes after the debit (or fails) changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal

import asyncpg

from apifast.db import Queries
from apifast.router.reservations import DATABASE_DOWN

Q = Queries("apifast.router")
log = logging.getLogger("apifast.router")


class Settler:
    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = 1024) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self._pending: dict[str, tuple[bytes, Decimal]] = {}  # generation id -> key, cost
        self._task: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()  # set after each batch; waiters re-try their hold

    def submit(self, generation_id: str, key_hash: bytes, cost: Decimal) -> None:
        """Never blocks, never raises: a settle that cannot be made is only a lost speed-up."""
        self._pending[generation_id] = (key_hash, cost)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def wait(self, seconds: float) -> None:
        """Until the next batch settles, or `seconds`."""
        try:
            await asyncio.wait_for(self._settled.wait(), seconds)
        except TimeoutError:
            pass

    async def _flush(self) -> None:
        try:
            while self._pending:
                ids = list(self._pending)[: self.max_batch]
                batch = [self._pending.pop(i) for i in ids]
                try:
                    await self._send(ids, sorted({k for k, _ in batch}), [c for _, c in batch])
                except DATABASE_DOWN:
                    log.warning("settling %d holds: database unavailable", len(ids))
                except Exception as exc:  # the meter settles them anyway
                    log.warning("settling %d holds failed: %s", len(ids), type(exc).__name__)
                # Wake the requests waiting for held-up balance, then arm for the next batch.
                settled, self._settled = self._settled, asyncio.Event()
                settled.set()
        finally:
            self._task = None

    async def _send(self, ids: list[str], keys: list[bytes], costs: list[Decimal]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(Q.settle_async_commit)
            await conn.execute(Q.settle_lock_keys, keys)
            await conn.execute(Q.settle_holds, ids, costs)

    async def close(self) -> None:
        """Send what is pending (at shutdown: the meter would release it anyway)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
