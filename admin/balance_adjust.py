"""Crediting and debiting a key by hand (the admin panel's "Credit or debit by hand").

A debit takes at most the key's available balance, its balance less what is held
(`reserved_usd`: requests in flight and routers' balance leases), so that the meter's
debits, each at most its request's hold, can never take the balance below zero. A debit
refused while leases hold part of the balance asks the routers to give their leases back
(the `apifast_keys` NOTIFY), so that the same debit goes through when tried again a moment
later (docs/billing.md, "Debits by hand")."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from apifast.db import Queries
from apifast.money import format_usd

Q = Queries("apifast.admin")


@dataclass(frozen=True, slots=True)
class Adjustment:
    done: bool
    balance: Decimal  # after the change when done, else as it is
    reserved: Decimal  # held by requests in flight and leases
    leased: Decimal  # the part of `reserved` in routers' balance leases
    sub_key: bool

    @property
    def available(self) -> Decimal:
        return self.balance - self.reserved


async def adjust_balance(
    pool: asyncpg.Pool, key_id: int, kind: str, ref: str, amount: Decimal, reason: str
) -> Adjustment | None:
    """Apply a signed `amount` once per (kind, ref); None when there is no such key."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(Q.admin_key_adjust, key_id, kind, ref, amount, reason)
        if row is None:
            return None
        result = Adjustment(
            done=row["done"], balance=row["balance_usd"], reserved=row["reserved_usd"],
            leased=row["leased_usd"], sub_key=row["sub_key"],
        )  # fmt: skip
        if not result.done and result.leased > 0:
            await conn.execute(Q.admin_key_leases_back, key_id)
    return result


def refusal(amount: Decimal, result: Adjustment | None) -> str:
    """Why a debit of `amount` was not done, for the operator."""
    if result is None:
        return "Not done: no such key."
    if result.sub_key:
        return "Not done: this is a sub-key (it spends its parent's balance: adjust the parent)."
    text = (
        f"Not done: a debit of ${format_usd(amount)} would take the available balance below 0. "
        f"Available: ${format_usd(result.available)} (balance ${format_usd(result.balance)}, "
        f"held ${format_usd(result.reserved)})."
    )
    if result.leased > 0:
        return text + (
            f" ${format_usd(result.leased)} of what is held is in routers' balance leases, "
            "which are being given back now: retry in a moment."
        )
    if result.reserved > 0:
        return text + (
            " The holds of requests in flight go as they finish: retry in a moment, or debit "
            "at most the available balance."
        )
    return text
