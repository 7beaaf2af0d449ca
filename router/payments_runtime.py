"""The payments feature's runtime: configured processors, mailer, key ring, per-IP limits
and the reconciliation task, started as a lifespan service (see `router.app`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pluggy
from starlette.requests import Request

from apifast.emailcrypt import KeyRing
from apifast.mailer import Mailer
from apifast.payments import PaymentProcessor
from apifast.plugins import payment_processor_types
from apifast.settings import Settings
from router.errors import ApiError
from router.ip_limits import IpRateLimiter
from router.reconcile import Reconciler
from router.state import RouterState

log = logging.getLogger("apifast.payments")
EXTRAS_KEY = "payments"


@dataclass
class PaymentsRuntime:
    settings: Settings
    processors: dict[str, PaymentProcessor]
    mailer: Mailer
    keyring: KeyRing
    reconciler: Reconciler
    order_limiter: IpRateLimiter
    recover_limiter: IpRateLimiter
    _jobs: set[asyncio.Task[None]] = field(default_factory=set)

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


def runtime(request: Request) -> PaymentsRuntime:
    state: RouterState = request.app.state.apifast
    found = state.extras.get(EXTRAS_KEY)
    if found is None:
        raise ApiError(
            503, "payments are not available on this server", code="payments_unavailable"
        )
    return found  # type: ignore[no-any-return]


def build_processors(pm: pluggy.PluginManager, settings: Settings) -> dict[str, PaymentProcessor]:
    """Every registered processor that its settings configure, by registered name."""
    processors = {}
    for name, cls in sorted(payment_processor_types(pm).items()):
        instance = cls.from_settings(settings)
        if instance is not None:
            processors[name] = instance
    return processors


async def start_payments(state: RouterState) -> Callable[[], Awaitable[None]]:
    """Lifespan service: builds the runtime into `state.extras["payments"]`."""
    settings = state.settings
    processors = build_processors(state.extras["plugin_manager"], settings)
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
        state.pool,
        processors,
        policy=settings.partially_paid_policy,
        delay_s=settings.reconcile_delay_s,
        interval_s=settings.reconcile_interval_s,
        max_age_s=settings.reconcile_max_age_s,
    )
    payments = PaymentsRuntime(
        settings=settings,
        processors=processors,
        mailer=mailer,
        keyring=KeyRing.from_settings(settings.encryption_keys, state.secret),
        reconciler=reconciler,
        order_limiter=IpRateLimiter(
            settings.order_rate_limit, settings.rate_limit_window_s, name="order"
        ),
        recover_limiter=IpRateLimiter(
            settings.recover_rate_limit, settings.rate_limit_window_s, name="recovery"
        ),
    )
    state.extras[EXTRAS_KEY] = payments
    reconciler.start()
    if processors:
        log.info("payment processors on offer: %s", ", ".join(processors))
    else:
        log.info("no payment processor is configured; POST /v1/orders is unavailable")

    async def stop() -> None:
        await reconciler.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(payments.drain(), timeout=5)
        await mailer.close()
        for processor in processors.values():
            with contextlib.suppress(Exception):
                await processor.close()

    return stop
