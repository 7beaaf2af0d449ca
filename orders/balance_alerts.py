"""Low-balance alerts: a key holder who left an email asks to be told when the key's
balance falls to a threshold (POST /v1/key/alerts). A sweep, off the request path, every
APIFAST_BALANCE_ALERT_INTERVAL_S, mails each alert that is due and disarms it in the same
statement, so a crossing mails at most once; a credit that lifts the balance above the
threshold arms it again (a trigger, migration 0014). The mail says the balance and the
threshold, nothing about usage. The address is stored only encrypted, bound to its key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from decimal import Decimal

import asyncpg

from apifast.crypto import EncryptedKey, KeyRing, KeyRingError
from apifast.db import Queries
from apifast.money import format_usd
from apifast.orders.mailer import Mail, Mailer

__all__ = ["BalanceAlerts", "alert_aad", "alert_mail"]

Q = Queries("apifast.orders")
log = logging.getLogger("apifast.payments")


def alert_aad(key_id: int) -> bytes:
    return b"apifast-alert-email:" + str(key_id).encode()


def alert_mail(to: str, prefix: str, balance: Decimal, threshold: Decimal) -> Mail:
    body = (
        f"The balance of your ApiFast key {prefix}... is ${format_usd(balance)}, at or below "
        f"the ${format_usd(threshold)} you asked to be told about.\n\n"
        "Top it up with POST /v1/orders. This alert is sent once each time the balance falls "
        "to the threshold; it is armed again when the balance is back above it. Stop these "
        "mails with DELETE /v1/key/alerts.\n"
    )
    return Mail(to, f"ApiFast: your balance is below ${format_usd(threshold)}", body)


class BalanceAlerts:
    def __init__(
        self, pool: asyncpg.Pool, mailer: Mailer, keyring: KeyRing, interval_s: float
    ) -> None:
        self.pool = pool
        self.mailer = mailer
        self.keyring = keyring
        self.interval_s = interval_s
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and self.mailer.configured:
            self._task = asyncio.create_task(self._run(), name="apifast-balance-alerts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except Exception as exc:  # Postgres may be down; the next sweep catches up
                log.warning("balance alerts: sweep failed: %s", type(exc).__name__)

    async def sweep(self) -> int:
        """Mail every alert that is due; returns how many were queued."""
        if not self.mailer.configured:
            return 0
        sent = 0
        for row in await self.pool.fetch(Q.balance_alerts_due):
            sealed = EncryptedKey(
                row["enc_key_id"], bytes(row["nonce"]), bytes(row["email_ciphertext"])
            )
            try:
                address = self.keyring.decrypt(sealed, alert_aad(row["key_id"])).decode()
            except KeyRingError as exc:
                log.error("a stored alert address does not open: %s", exc)
                continue
            mail = alert_mail(address, row["prefix"], row["balance_usd"], row["threshold_usd"])
            self.mailer.send(mail)
            sent += 1
        self.sent += sent
        return sent
