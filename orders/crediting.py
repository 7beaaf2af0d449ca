"""Applying a processor's payment update: the one path by which payments become credit.

Webhooks and the reconciliation task both end here. Under the order's row lock, in one
transaction: the payment's status moves forward (never backwards, so duplicate and
out-of-order deliveries change nothing), the credit goes into the ledger (whose UNIQUE
(kind, ref) makes it exactly-once), and the key's balance, the order and its history follow.

Crediting policy:
- `finished` credits the order amount for the order's own payment, and the processor's
  price for a repeat deposit (a payment with a parent), which is credited as its own payment;
- `partially_paid` credits what arrived, in proportion to the price and capped at the order
  amount (policy "proportional"), or nothing (policy "none", left to an operator);
- a payment that later reaches a higher-paying status is topped up by the difference only;
- `expired`, `failed` and `refunded` credit nothing and close the order. A refund after a
  credit is not clawed back automatically; it is in the order's history for an operator.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

import asyncpg

from apifast.db import Queries
from apifast.payments import (
    CREDITING_STATUSES,
    FINAL_STATUSES,
    PaymentProcessor,
    PaymentStatus,
    PaymentUpdate,
    status_rank,
)

log = logging.getLogger("apifast.payments")
Q = Queries("apifast.orders")
CORE = Queries("apifast")  # credit_key: the ledger is the core's
ZERO = Decimal(0)

Outcome = Literal["applied", "unchanged", "unknown_order"]


@dataclass(frozen=True, slots=True)
class ApplyResult:
    outcome: Outcome
    order_id: str | None = None
    credited_usd: Decimal = ZERO


def credit_target(update: PaymentUpdate, order_amount: Decimal, policy: str) -> Decimal | None:
    """The total this payment is worth at its status; None when the amount is unknown."""
    own_payment = update.parent_payment_id is None
    if update.status is PaymentStatus.FINISHED:
        return order_amount if own_payment else update.credit_usd
    if update.status is PaymentStatus.PARTIALLY_PAID:
        if policy == "none":
            return ZERO
        if update.credit_usd is None:
            return None
        return min(update.credit_usd, order_amount) if own_payment else update.credit_usd
    return ZERO


def needs_amount(update: PaymentUpdate, policy: str) -> bool:
    """Whether crediting this update needs an amount that it does not carry."""
    return (
        update.status in CREDITING_STATUSES
        and update.credit_usd is None
        and credit_target(update, Decimal(1), policy) is None
    )


async def apply_update(
    pool: asyncpg.Pool, update: PaymentUpdate, *, policy: str, source: str
) -> ApplyResult:
    async with pool.acquire() as conn, conn.transaction():
        order_id = update.order_id
        if order_id is None:
            # A repeat deposit may arrive without our order id: follow its parent.
            for ref in (update.parent_payment_id, update.payment_id):
                if ref is not None and order_id is None:
                    order_id = await conn.fetchval(Q.order_id_for_payment, update.processor, ref)
        order = await conn.fetchrow(Q.order_lock, order_id, update.processor) if order_id else None
        if order is None:
            return ApplyResult("unknown_order")
        # The key credited: the order's, or the key it was rotated to since.
        moved = await conn.fetchval(Q.order_follow_rotation, order_id)
        key_id = order["key_id"] if moved is None else moved
        payment = await conn.fetchrow(Q.payment_lock, update.processor, update.payment_id)
        if payment is not None and payment["order_id"] != order_id:
            log.warning(
                "%s payment %s names another order; ignored", update.processor, update.payment_id
            )
            return ApplyResult("unchanged", order_id)
        if payment is not None and status_rank(update.status) <= status_rank(payment["status"]):
            return ApplyResult("unchanged", order_id)

        target = credit_target(update, order["amount_usd"], policy)
        if target is None:
            # Do not advance the status without its amount: a later fetch must still credit.
            log.error(
                "%s payment %s is %s but carries no amount; left for reconciliation",
                update.processor,
                update.payment_id,
                update.status,
            )
            return ApplyResult("unchanged", order_id)
        already: Decimal = payment["credited_usd"] if payment is not None else ZERO
        delta = max(target - already, ZERO)
        if delta > 0:
            ref = f"{update.processor}:{update.payment_id}"
            if already > 0:
                ref += f":{update.status}"  # the top-up of an earlier partial credit
            balance = await conn.fetchval(
                CORE.credit_key, key_id, "payment", ref, delta, f"order {order_id}"
            )
            if balance is None:
                delta = ZERO  # already in the ledger; the lock makes this unreachable
        await conn.execute(
            Q.payment_upsert,
            update.processor,
            update.payment_id,
            update.parent_payment_id,
            order_id,
            update.status.value,
            update.raw_status[:100],
            already + delta,
        )
        own_payment = update.parent_payment_id is None
        status = order["status"]
        if own_payment and status_rank(update.status) > status_rank(status):
            status = update.status.value
        await conn.execute(
            Q.order_apply,
            order_id,
            status,
            delta,
            status in FINAL_STATUSES,
            update.payment_id if own_payment else None,
        )
        await conn.execute(
            Q.order_event_insert,
            order_id,
            update.payment_id,
            update.status.value,
            update.raw_status[:100],
            delta,
            source,
        )
    if delta:
        log.info("order %s credited %s from %s", order_id, delta, update.processor)
    return ApplyResult("applied", order_id, delta)


async def settle_update(
    pool: asyncpg.Pool,
    processor: PaymentProcessor,
    processor_name: str,
    update: PaymentUpdate,
    *,
    policy: str,
    source: str,
) -> ApplyResult:
    """Apply an update, first fetching the payment when the update is only a hint or lacks
    the amount. Raises `PaymentError` when that fetch fails (the sender should retry)."""
    update = dataclasses.replace(update, processor=processor_name)
    if update.refetch or needs_amount(update, policy):
        fetched = await processor.fetch_payment(update.payment_id)
        update = dataclasses.replace(
            fetched,
            processor=processor_name,
            order_id=fetched.order_id or update.order_id,
            parent_payment_id=fetched.parent_payment_id or update.parent_payment_id,
            refetch=False,
        )
    return await apply_update(pool, update, policy=policy, source=source)
