"""`AdminState`: what the admin pages use, built by the composition root and kept at
`app.state.admin`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from apifast.catalog.live import CatalogSync, LiveCatalog
from apifast.context import Core
from apifast.ip_limits import IpRateLimiter
from apifast.settings import Settings


class UsageStore(Protocol):
    """The ClickHouse usage store, as the overview charts read it."""

    async def query(self, sql: str, parameters: dict[str, Any]) -> list[dict[str, Any]]: ...


@dataclass(slots=True)
class AdminState:
    core: Core
    live: LiveCatalog  # the catalog being served, shared with the router
    catalog_sync: CatalogSync | None = None  # None: the model and provider pages are unavailable
    clickhouse: UsageStore | None = None  # None: the overview shows credit sold only
    login_limiter: IpRateLimiter = field(init=False)  # per-IP password attempts
    # This router's route health (state, error rate per model and route); None: not shown.
    route_health: Callable[[], list[dict[str, Any]]] | None = None

    def __post_init__(self) -> None:
        s = self.core.settings
        self.login_limiter = IpRateLimiter(
            s.admin_login_rate_limit, s.admin_login_window_s, name="login"
        )

    @classmethod
    def create(
        cls,
        core: Core,
        live: LiveCatalog,
        catalog_sync: CatalogSync | None,
        clickhouse: UsageStore | None,
    ) -> AdminState:
        return cls(core=core, live=live, catalog_sync=catalog_sync, clickhouse=clickhouse)

    @property
    def pool(self) -> asyncpg.Pool:
        return self.core.pool

    @property
    def settings(self) -> Settings:
        return self.core.settings

    @property
    def secret(self) -> bytes:
        return self.core.secret
