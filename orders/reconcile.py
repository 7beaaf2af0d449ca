"""Reconciliation: re-fetch open orders from their processor, so that a lost webhook cannot
lose a payment. Credits go through `crediting.settle_update`, the webhooks' own path.

An order is due once it is `reconcile_delay_s` old, then every `reconcile_interval_s`,
until it closes or is `reconcile_max_age_s` old. Replicas share the work (SKIP LOCKED).
Repeat deposits that no webhook announced cannot be found this way: processors offer no
lookup by address.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

import asyncpg

from apifast.db import Queries
from apifast.orders.crediting import settle_update
from apifast.payments import PaymentError, PaymentProcessor

log = logging.getLogger("apifast.payments.reconcile")
Q = Queries("apifast.orders")
_BATCH = 200  # per pass; the rest wait for the next pass


class Reconciler:
    def __init__(
        self,
        pool: asyncpg.Pool,
        processors: dict[str, PaymentProcessor],
        *,
        policy: str,
        delay_s: float,
        interval_s: float,
        max_age_s: float,
    ) -> None:
        self._pool = pool
        self._processors = processors
        self._policy = policy
        self.delay_s = delay_s
        self.interval_s = interval_s
        self.max_age_s = max_age_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and self._processors:
            self._task = asyncio.create_task(self._run(), name="apifast-reconcile")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            # Sleep first: orders are never due at start-up before the delay anyway.
            await asyncio.sleep(min(self.interval_s, max(self.delay_s, 1.0)))
            try:
                await self.run_once()
            except Exception as exc:  # keep the loop alive; retried next time
                log.error("reconciliation pass failed: %s", type(exc).__name__)

    async def run_once(self, *, interval_s: float | None = None) -> int:
        """One pass over the due orders; returns how many updates changed something."""
        changed = 0
        due = await self._pool.fetch(
            Q.orders_claim_for_reconcile,
            list(self._processors),
            float(self.delay_s),
            float(self.max_age_s),
            float(self.interval_s if interval_s is None else interval_s),
            _BATCH,
        )
        for order in due:
            changed += await self._reconcile_order(
                order["id"], order["processor"], order["payment_id"]
            )
        return changed

    async def _reconcile_order(self, order_id: str, name: str, payment_id: str | None) -> int:
        processor = self._processors[name]
        ids = [r["payment_id"] for r in await self._pool.fetch(Q.order_open_payment_ids, order_id)]
        if payment_id is not None and payment_id not in ids:
            ids.insert(0, payment_id)
        changed = 0
        for pid in ids:
            try:
                update = await processor.fetch_payment(pid)
                if update.order_id is None:
                    update = dataclasses.replace(update, order_id=order_id)
                result = await settle_update(
                    self._pool, processor, name, update, policy=self._policy, source="reconcile"
                )
            except PaymentError as exc:
                log.warning("reconcile %s: fetch from %s failed: %s", order_id, name, exc)
                continue
            changed += result.outcome == "applied"
        return changed
