"""`create_app()`: wires settings, plugins, catalog, pools and clients into a FastAPI app.
Nothing is built at import time; the lifespan owns every pool, client and task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from admin.mount import install_admin
from apifast import __version__
from apifast.db import create_pool
from apifast.plugins import make_plugin_manager, provider_types
from apifast.providers import Provider
from apifast.settings import Settings
from router import (
    chat,
    embeddings,
    fast_path,
    key_api,
    models_api,
    orders_api,  # payments (issue #3)
    recover_api,  # payments (issue #3)
    usage_api,
    webhooks_api,  # payments (issue #3)
)
from router.catalog import Catalog, demo_catalog, load_catalog
from router.errors import ContainUnhandledErrors, install_error_handlers
from router.payments_runtime import start_payments
from router.publisher import EventPublisher
from router.reservations import Reserver
from router.size_limits import oversize_refusal
from router.state import RouterState

log = logging.getLogger("apifast")

# A background service started after the core state exists; it gets the state and returns
# an async "stop" callable. Features (payments, admin, ...) append theirs in create_app.
Service = Callable[[RouterState], Awaitable[Callable[[], Awaitable[None]]]]


class ApiFastApp(FastAPI):
    """FastAPI, except that chat completions skip the framework (see router/fast_path.py)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = getattr(self.state, "settings", None)
        if scope["type"] == "http" and settings is not None:
            # Before routing, for every endpoint: uvicorn's httptools has no header limit.
            refused = oversize_refusal(scope, settings.max_header_bytes, settings.max_body_bytes)
            if refused is not None:
                await refused.response()(scope, receive, send)
                return
        if fast_path.handles(scope):
            state = getattr(self.state, "apifast", None)
            if state is not None:
                await fast_path.serve_chat(state, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def load_configured_catalog(settings: Settings, known_types: set[str]) -> Catalog:
    if settings.models_file is None:
        return demo_catalog()
    return load_catalog(settings.models_file, known_types=known_types)


def build_providers(catalog: Catalog, types: dict[str, type[Provider]]) -> dict[str, Provider]:
    return {name: types[cfg.type](cfg) for name, cfg in catalog.providers.items()}


def secret_bytes(settings: Settings) -> bytes:
    if not settings.secret_key:
        raise RuntimeError(
            "APIFAST_SECRET_KEY is not set: it keys the hashes of API keys. "
            "Generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    if len(settings.secret_key) < 32:
        raise RuntimeError("APIFAST_SECRET_KEY must be at least 32 characters")
    return settings.secret_key.encode()


def create_app(
    settings: Settings | None = None,
    *,
    run_meter: bool = False,
    extra_plugins: tuple[object, ...] = (),
) -> FastAPI:
    settings = settings or Settings()
    pm = make_plugin_manager(extra_plugins=extra_plugins)
    types = provider_types(pm)
    # A broken catalog stops start-up here, before anything listens.
    catalog = load_configured_catalog(settings, set(types))
    secret = secret_bytes(settings)
    services: list[Service] = []
    services.append(start_payments)  # payments (issue #3): processors, mailer, reconciliation

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await create_pool(settings.database_url)
        providers = build_providers(catalog, types)
        for provider in providers.values():
            await provider.start()
        publisher = EventPublisher(
            settings.nats_url,
            settings.nats_stream,
            settings.nats_subject,
            settings.resolved_data_dir() / "spool",
            settings.spool_max_events,
        )
        publisher.keep_holds_alive(pool, settings.reservation_ttl_s)
        await publisher.start()
        clickhouse = None
        if settings.clickhouse_url:
            from metering.clickhouse import ClickHouseStore

            clickhouse = ClickHouseStore(settings.clickhouse_url, settings.clickhouse_database)
            await clickhouse.start()
        state = RouterState(
            settings=settings,
            secret=secret,
            pool=pool,
            catalog=catalog,
            providers=providers,
            publisher=publisher,
            clickhouse=clickhouse,
            reserver=Reserver(pool, settings.reservation_ttl_s),
        )
        state.extras["plugin_manager"] = pm
        app.state.apifast = state
        stops: list[Callable[[], Awaitable[None]]] = []
        meter_task: asyncio.Task[None] | None = None
        try:
            if run_meter:
                assert clickhouse is not None, "the meter needs APIFAST_CLICKHOUSE_URL"
                from metering.consumer import Meter

                meter = Meter(
                    nats_url=settings.nats_url,
                    stream=settings.nats_stream,
                    subject=settings.nats_subject,
                    durable=settings.meter_durable,
                    pool=pool,
                    clickhouse=clickhouse,
                    batch_size=settings.meter_batch_size,
                    batch_wait_s=settings.meter_batch_wait_s,
                )
                state.extras["meter"] = meter
                meter_task = asyncio.create_task(meter.run())
            for service in services:
                stops.append(await service(state))
            yield
        finally:
            for stop in reversed(stops):
                with contextlib.suppress(Exception):
                    await stop()
            # Drain usage events before the meter stops, so it can still count them.
            await publisher.close()
            if meter_task is not None:
                meter = state.extras["meter"]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_wait_idle(meter, publisher), timeout=10)
                meter.stop()
                with contextlib.suppress(Exception):
                    await meter_task
            for provider in providers.values():
                with contextlib.suppress(Exception):
                    await provider.close()
            if clickhouse is not None:
                await clickhouse.close()
            if state.reserver is not None:
                await state.reserver.close()  # the pool's close waits for its connections
            await pool.close()

    app = ApiFastApp(
        title="ApiFast",
        version=__version__,
        description="Anonymous, prepaid, OpenAI-compatible LLM API gateway.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(ContainUnhandledErrors)

    # --- API routers: one line per resource. ---
    for module in (chat, embeddings, models_api, key_api, usage_api):
        app.include_router(module.api)
    for module in (orders_api, webhooks_api, recover_api):  # payments (issue #3)
        app.include_router(module.api)
    install_admin(app, services, settings)  # admin panel, dashboard, live catalog (issue #4)

    @app.get("/healthz", tags=["health"])
    async def healthz(request: Request) -> Response:
        state: RouterState = request.app.state.apifast
        body: dict[str, Any] = {"status": "ok", "version": __version__}
        try:
            await state.pool.fetchval("SELECT 1")
            body["postgres"] = "ok"
        except Exception:
            body["postgres"] = "down"
            body["status"] = "degraded"
        body["nats"] = "ok" if state.publisher._connected() else "down"
        body["spooled_events"] = state.publisher.spool.count
        if body["nats"] != "ok":
            body["status"] = "degraded"
        status = 200 if body["postgres"] == "ok" else 503
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    app.state.settings = settings
    app.state.services = services
    return app


async def _wait_idle(meter: Any, publisher: EventPublisher) -> None:
    # The meter is idle once a fetch came back empty after the publisher's last event.
    target = publisher.published
    while True:
        meter.idle.clear()
        await meter.idle.wait()
        if publisher.published <= target:
            return
        target = publisher.published
