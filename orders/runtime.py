"""The payments feature's runtime: configured processors, mailer, key ring, per-IP limits
and the reconciliation task. The composition root starts it with `start_payments(core)` in
its lifespan, keeps it at `app.state.payments`, and calls `stop()` on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import pluggy
from starlette.requests import Request

from apifast.context import Core
from apifast.crypto import KeyRing
from apifast.errors import ApiError
from apifast.ip_limits import IpRateLimiter
from apifast.orders.balance_alerts import BalanceAlerts
from apifast.orders.mailer import Mailer
from apifast.orders.reconcile import Reconciler
from apifast.payments import PaymentProcessor
from apifast.plugin_manager import payment_processor_types
from apifast.settings import Settings

log = logging.getLogger("apifast.payments")


@dataclass
class PaymentsRuntime:
    core: Core  # pool, secret and settings shared with every feature
    processors: dict[str, PaymentProcessor]
    mailer: Mailer
    keyring: KeyRing
    reconciler: Reconciler
    order_limiter: IpRateLimiter
    recover_limiter: IpRateLimiter
    alerts: BalanceAlerts  # the low-balance alerts' sweep (sweep() can be called directly)
    _jobs: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def settings(self) -> Settings:
        return self.core.settings

    def spawn(self, job: Coroutine[Any, Any, None]) -> None:
        """Run a short job after the response (recovery lookups), tracked until done."""
        task = asyncio.create_task(job)
        self._jobs.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("payments job failed: %s", type(task.exception()).__name__)

    async def drain(self) -> None:
        """Wait for background jobs and queued mail (tests and shutdown)."""
        while self._jobs:
            await asyncio.gather(*list(self._jobs), return_exceptions=True)
        await self.mailer.idle()

    def processor(self, name: str) -> PaymentProcessor | None:
        return self.processors.get(name)

    async def stop(self) -> None:
        """Stop reconciling, let queued jobs and mail finish (5 s at most), close the rest."""
        await self.reconciler.stop()
        await self.alerts.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.drain(), timeout=5)
        await self.mailer.close()
        for processor in self.processors.values():
            with contextlib.suppress(Exception):
                await processor.close()


def runtime(request: Request) -> PaymentsRuntime:
    """The running payments feature (`app.state.payments`); 503 when it is not started."""
    found: PaymentsRuntime | None = getattr(request.app.state, "payments", None)
    if found is None:
        raise ApiError(
            503, "payments are not available on this server", code="payments_unavailable"
        )
    return found


def build_processors(pm: pluggy.PluginManager, settings: Settings) -> dict[str, PaymentProcessor]:
    """Every registered processor that its settings configure, by registered name."""
    processors = {}
    for name, cls in sorted(payment_processor_types(pm).items()):
        instance = cls.from_settings(settings)
        if instance is not None:
            processors[name] = instance
    return processors


async def start_payments(core: Core) -> PaymentsRuntime:
    """Build and start the payments feature; the caller keeps it and awaits its `stop()`."""
    settings = core.settings
    processors = build_processors(core.plugin_manager, settings)
    for processor in processors.values():
        await processor.start()
    mailer = Mailer(
        settings.smtp_url,
        settings.smtp_from,
        timeout_s=settings.smtp_timeout_s,
        attempts=settings.mail_retry_attempts,
        retry_base_s=settings.mail_retry_base_s,
    )
    await mailer.start()
    reconciler = Reconciler(
        core.pool,
        processors,
        policy=settings.partially_paid_policy,
        delay_s=settings.reconcile_delay_s,
        interval_s=settings.reconcile_interval_s,
        max_age_s=settings.reconcile_max_age_s,
    )
    keyring = KeyRing.from_settings(settings.encryption_keys, core.secret)
    payments = PaymentsRuntime(
        core=core,
        processors=processors,
        mailer=mailer,
        keyring=keyring,
        reconciler=reconciler,
        order_limiter=IpRateLimiter(
            settings.order_rate_limit, settings.rate_limit_window_s, name="order"
        ),
        recover_limiter=IpRateLimiter(
            settings.recover_rate_limit, settings.rate_limit_window_s, name="recovery"
        ),
        alerts=BalanceAlerts(core.pool, mailer, keyring, settings.balance_alert_interval_s),
    )
    reconciler.start()
    payments.alerts.start()
    if processors:
        log.info("payment processors on offer: %s", ", ".join(processors))
    else:
        log.info("no payment processor is configured; POST /v1/orders is unavailable")
    return payments
