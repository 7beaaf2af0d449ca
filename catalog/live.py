"""The live catalog: the TOML catalog overlaid by models and providers stored in Postgres
(managed in /admin), kept current on every running router without a restart.

A change to `db_models` or `db_providers` bumps `catalog_version` and sends NOTIFY
`apifast_catalog` (triggers in migration 0003). Each router LISTENs on a dedicated
connection, and also polls the version every `catalog_poll_s` seconds in case a notification
was lost. On a new version it rebuilds the catalog, starts the providers whose configuration
changed, swaps `live.catalog` and `live.providers` together (no await between the two
assignments, so no request sees one without the other), and closes the replaced providers
after a grace period that lets requests already using them finish.

Overlay rules: a stored provider replaces the TOML provider of the same name; a stored model
replaces the TOML model of the same id, and a disabled one hides it. A stored model that no
longer validates (say, its provider was removed) is not served at all, rather than served at
a stale price; the problem is logged and shown in the admin panel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from apifast.catalog.toml import Catalog, CatalogError, Model, parse_model, parse_providers
from apifast.crypto import EncryptedKey, KeyRing, KeyRingError
from apifast.db import Queries
from apifast.providers import Provider

log = logging.getLogger("apifast.catalog")
Q = Queries("apifast.catalog")
CHANNEL = "apifast_catalog"
SOURCE = "admin catalog"
_GRACE_EXTRA_S = 5.0


@dataclass(slots=True)
class LiveCatalog:
    """The catalog being served and the providers it routes to. Shared by the router (which
    serves it) and the admin panel (which shows it); `CatalogSync` swaps both together."""

    catalog: Catalog
    providers: dict[str, Provider]


# --- stored rows ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredModel:
    id: str
    spec: dict[str, Any]
    enabled: bool
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class StoredProvider:
    name: str
    type: str
    base_url: str
    options: dict[str, Any]
    sealed_key: EncryptedKey | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Overlay:
    version: int
    models: tuple[StoredModel, ...] = ()
    providers: tuple[StoredProvider, ...] = ()


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value


async def load_overlay(conn: asyncpg.Connection) -> Overlay:
    """The stored models and providers, read in one snapshot with their version."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        version = await conn.fetchval(Q.catalog_version)
        models = await conn.fetch(Q.stored_models)
        providers = await conn.fetch(Q.stored_providers)
    return Overlay(
        version=int(version or 0),
        models=tuple(
            StoredModel(r["id"], _json(r["spec"]), r["enabled"], r["updated_at"]) for r in models
        ),
        providers=tuple(
            StoredProvider(
                name=r["name"],
                type=r["type"],
                base_url=r["base_url"],
                options=_json(r["options"]),
                sealed_key=(
                    EncryptedKey(r["api_key_kid"], r["api_key_nonce"], r["api_key_ciphertext"])
                    if r["api_key_ciphertext"] is not None
                    else None
                ),
                updated_at=r["updated_at"],
            )
            for r in providers
        ),
    )


# --- provider credentials ------------------------------------------------------------------


def _aad(provider: str) -> bytes:
    # Binds each ciphertext to its provider row, so rows cannot be swapped.
    return b"apifast-provider-api-key:" + provider.encode()


def seal_api_key(ring: KeyRing, provider: str, api_key: str) -> EncryptedKey:
    return ring.encrypt(api_key.encode(), _aad(provider))


def open_api_key(ring: KeyRing, provider: str, sealed: EncryptedKey) -> str:
    return ring.decrypt(sealed, _aad(provider)).decode()


def mask_secret(secret: str) -> str:
    """What the panel shows of a credential: its last four characters, if it is long."""
    return "••••" + secret[-4:] if len(secret) >= 16 else "••••"


# --- merging -------------------------------------------------------------------------------


@dataclass
class MergeResult:
    catalog: Catalog
    problems: dict[str, str] = field(default_factory=dict)  # "model X" / "provider Y" -> why


def provider_table(stored: StoredProvider, ring: KeyRing) -> dict[str, Any]:
    """A stored provider as a [providers.NAME] TOML table, its API key decrypted."""
    table: dict[str, Any] = {**stored.options, "type": stored.type, "base_url": stored.base_url}
    if stored.sealed_key is not None:
        table["api_key"] = open_api_key(ring, stored.name, stored.sealed_key)
    return table


def merge(
    base: Catalog,
    overlay: Overlay,
    ring: KeyRing,
    known_types: set[str],
    env: dict[str, str] | None = None,
) -> MergeResult:
    env = dict(os.environ) if env is None else env
    problems: dict[str, str] = {}
    providers = dict(base.providers)
    for stored in overlay.providers:
        try:
            table = provider_table(stored, ring)
            providers.update(parse_providers({stored.name: table}, SOURCE, env, known_types))
        except (CatalogError, KeyRingError) as exc:
            problems[f"provider {stored.name}"] = str(exc)
            providers.pop(stored.name, None)
    # A route whose provider is missing is skipped per request, like a failing one.
    models: dict[str, Model] = dict(base.models)
    for row in overlay.models:
        models.pop(row.id, None)
        if not row.enabled:
            continue
        try:
            models[row.id] = parse_model(
                {**row.spec, "id": row.id}, SOURCE, f"model {row.id}", set(providers)
            )
        except CatalogError as exc:
            problems[f"model {row.id}"] = str(exc)
    return MergeResult(Catalog(models=models, providers=providers, source=base.source), problems)


# --- the background service ----------------------------------------------------------------


class CatalogSync:
    """Keeps `live.catalog` and `live.providers` equal to TOML + the Postgres overlay."""

    def __init__(
        self,
        live: LiveCatalog,
        pool: asyncpg.Pool,
        *,
        database_url: str,
        base: Catalog,
        types: dict[str, type[Provider]],
        ring: KeyRing,
        poll_s: float,
    ) -> None:
        self.live = live
        self.pool = pool
        self.database_url = database_url
        self.base = base
        self.types = types
        self.ring = ring
        self.poll_s = poll_s
        self.version = -1
        self.problems: dict[str, str] = {}
        self._initial = set(map(id, live.providers.values()))  # closed by the app's lifespan
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._retired: set[Provider] = set()

    async def start(self) -> None:
        await self.refresh()
        await self._listen()
        self._task = asyncio.create_task(self._run(), name="apifast-catalog-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        for provider in {*self._retired, *self.live.providers.values()}:
            if id(provider) not in self._initial:
                with contextlib.suppress(Exception):
                    await provider.close()
        if self._listener is not None and not self._listener.is_closed():
            with contextlib.suppress(Exception):
                await self._listener.close()

    async def refresh(self, *, force: bool = False) -> bool:
        """Rebuild if the stored version changed; True when a new catalog was swapped in."""
        async with self._lock:
            async with self.pool.acquire() as conn:
                overlay = await load_overlay(conn)
            if overlay.version == self.version and not force:
                return False
            result = merge(self.base, overlay, self.ring, set(self.types))
            for what, problem in result.problems.items():
                log.error("catalog overlay: %s skipped: %s", what, problem)
            await self._swap(result.catalog)
            self.problems = result.problems
            self.version = overlay.version
            return True

    async def _swap(self, catalog: Catalog) -> None:
        old = self.live.providers
        new: dict[str, Provider] = {}
        for name, cfg in catalog.providers.items():
            current = old.get(name)
            cls = self.types[cfg.type]
            if current is not None and type(current) is cls and current.config == cfg:
                new[name] = current
                continue
            provider = cls(cfg)
            try:
                await provider.start()
            except Exception as exc:
                log.error("provider %s failed to start: %s", name, type(exc).__name__)
                continue
            new[name] = provider
        retired = [p for name, p in old.items() if new.get(name) is not p]
        # No await between these two: a request sees the old pair or the new pair.
        self.live.providers = new
        self.live.catalog = catalog
        for provider in retired:
            self._retire(provider)

    def _retire(self, provider: Provider) -> None:
        self._retired.add(provider)
        grace = provider.config.read_timeout_s + _GRACE_EXTRA_S

        async def close_later() -> None:
            await asyncio.sleep(grace)
            self._retired.discard(provider)
            with contextlib.suppress(Exception):
                await provider.close()

        task = asyncio.create_task(close_later())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _listen(self) -> None:
        try:
            conn = await asyncpg.connect(self.database_url)
            await conn.add_listener(CHANNEL, self._notified)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("catalog: cannot LISTEN (%s); polling only", type(exc).__name__)
            return
        self._listener = conn

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
            self._wake.clear()
            try:
                if self._listener is None or self._listener.is_closed():
                    await self._listen()
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("catalog refresh failed: %s", type(exc).__name__)
