"""Everything a request needs, built by the lifespan and kept on `app.state.apifast`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from apifast.providers import Provider
from apifast.settings import Settings
from router.catalog import Catalog
from router.limits import KeyRateLimiter
from router.publisher import EventPublisher
from router.reservations import Reserver

if TYPE_CHECKING:
    from metering.clickhouse import ClickHouseStore


@dataclass
class RouterState:
    settings: Settings
    secret: bytes
    pool: asyncpg.Pool
    catalog: Catalog
    providers: dict[str, Provider]
    publisher: EventPublisher
    clickhouse: ClickHouseStore | None = None
    key_limits: KeyRateLimiter = field(default_factory=KeyRateLimiter)
    reserver: Reserver | None = None  # batches holds; None: one round trip per request
    extras: dict[str, Any] = field(default_factory=dict)  # services added by other features
