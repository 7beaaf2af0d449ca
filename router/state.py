"""Everything the router needs per request, built by the composition root's lifespan and kept
on `app.state.apifast`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from apifast.catalog.live import LiveCatalog
from apifast.catalog.toml import Catalog
from apifast.metrics import Metrics
from apifast.providers import Provider
from apifast.receipts import ReceiptSigner
from apifast.router.leases import LeaseBook
from apifast.router.limits import KeyRateLimiter
from apifast.router.publisher import EventPublisher
from apifast.router.reservations import Reserver
from apifast.router.route_book import RouteBook
from apifast.router.route_health import BreakerPolicy
from apifast.router.settle import Settler
from apifast.settings import Settings
from apifast.tracing import Tracer

if TYPE_CHECKING:
    from apifast.metering.clickhouse import ClickHouseStore
    from apifast.router.health_share import HealthShare


@dataclass(slots=True)
class RouterState:
    settings: Settings
    secret: bytes
    pool: asyncpg.Pool
    live: LiveCatalog  # swapped by the catalog sync; read through `catalog`/`providers`
    publisher: EventPublisher
    settler: Settler
    clickhouse: ClickHouseStore | None = None
    key_limits: KeyRateLimiter = field(default_factory=KeyRateLimiter)
    reserver: Reserver | None = None  # batches holds; None: one round trip per request
    leases: LeaseBook | None = None  # balance leases; None: every request holds in Postgres
    metrics: Metrics | None = None  # Prometheus series (APIFAST_METRICS_LISTEN); None: off
    receipts: ReceiptSigner | None = None  # signs X-ApiFast-Receipt; None: no receipts
    tracer: Tracer | None = None  # OpenTelemetry spans (APIFAST_OTEL_ENDPOINT); None: off
    # Route health, observations and attempt order (router/route_book.py).
    routes: RouteBook = field(default_factory=lambda: RouteBook(BreakerPolicy()))
    health: HealthShare | None = None  # shares route health over NATS; None: local only

    @property
    def catalog(self) -> Catalog:
        return self.live.catalog

    @property
    def providers(self) -> dict[str, Provider]:
        return self.live.providers

    def route_health(self) -> list[dict[str, Any]]:
        """Every served route's health, for the admin overview (names included)."""
        return self.routes.snapshot(self.catalog.models)
