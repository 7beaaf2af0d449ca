"""`create_app()`: the composition root. It builds the shared core (settings, plugins, pool),
then each feature's state, routes and background services. Nothing is built at import time;
the lifespan owns every pool, client and task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from apifast import __version__
from apifast.admin.mount import install_admin
from apifast.admin.state import AdminState
from apifast.catalog.live import CatalogSync, LiveCatalog
from apifast.catalog.toml import Catalog, demo_catalog, load_catalog
from apifast.context import Core
from apifast.crypto import KeyRing
from apifast.db import create_pool
from apifast.errors import ContainUnhandledErrors, install_error_handlers, speaks_anthropic
from apifast.metering.clickhouse import ClickHouseStore
from apifast.metering.consumer import Meter
from apifast.metrics import Metrics, MetricsServer
from apifast.orders import install_payments
from apifast.orders.runtime import start_payments
from apifast.plugin_manager import make_plugin_manager, provider_types
from apifast.providers import Provider
from apifast.receipts import ReceiptSigner
from apifast.router import fast_path
from apifast.router.health_share import HealthShare
from apifast.router.leases import LeaseBook
from apifast.router.publisher import EventPublisher
from apifast.router.refusals import API_OF_PATH, count_refused
from apifast.router.reservations import Reserver
from apifast.router.route_book import RouteBook
from apifast.router.route_health import BreakerPolicy
from apifast.router.routes import install_router
from apifast.router.settle import Settler
from apifast.router.size_limits import oversize_refusal
from apifast.router.state import RouterState
from apifast.server.retention import RetentionJob
from apifast.settings import Settings
from apifast.tracing import Tracer

# The requests that get a root span when tracing is on: the inference endpoints.
TRACED_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/embeddings"}
)
# On shutdown, how long the requests uvicorn cut at the drain timeout get to settle (bill
# what they delivered, give back their holds) before the publisher flushes.
_SETTLE_S = 5.0


class ApiFastApp(FastAPI):
    """FastAPI, except that chat completions skip the framework (see router/fast_path.py).
    It counts the HTTP requests in flight, for the drain on shutdown."""

    tracer: Tracer | None = None  # set by the lifespan when APIFAST_OTEL_ENDPOINT is set
    in_flight = 0
    _settled: asyncio.Event | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)  # the lifespan
            return
        tracer = self.tracer
        if tracer is not None and scope["path"] in TRACED_PATHS:
            name = f"{scope['method']} {scope['path']}"
            await tracer.request(name, self._http, scope, receive, send)
            return
        await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.in_flight += 1
        try:
            settings = getattr(self.state, "settings", None)
            if settings is not None:
                # Before routing, for every endpoint: uvicorn's httptools has no header limit.
                refused = oversize_refusal(
                    scope, settings.max_header_bytes, settings.max_body_bytes
                )
                if refused is not None:
                    api = API_OF_PATH.get(scope["path"])
                    state = getattr(self.state, "apifast", None)
                    if api is not None and state is not None:
                        count_refused(state, api, refused)
                    await refused.response(speaks_anthropic(scope))(scope, receive, send)
                    return
            if fast_path.handles(scope):
                state = getattr(self.state, "apifast", None)
                if state is not None:
                    await fast_path.serve(state, scope, receive, send)
                    return
            await super().__call__(scope, receive, send)
        finally:
            self.in_flight -= 1
            if not self.in_flight and self._settled is not None:
                self._settled.set()

    async def settle(self, within_s: float) -> None:
        """Wait (up to `within_s`) until no request is in flight. uvicorn cancels the requests
        still running at the drain timeout and starts the lifespan's shutdown at once: their
        cleanup (billing what a cut stream delivered) must reach the publisher first."""
        if not self.in_flight:
            return
        self._settled = asyncio.Event()
        with suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), within_s)


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
    pm = make_plugin_manager(extra_plugins=extra_plugins, allowed_names=settings.plugins)
    types = provider_types(pm)
    # A broken catalog stops start-up here, before anything listens.
    catalog = load_configured_catalog(settings, set(types))
    secret = secret_bytes(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            own = app if isinstance(app, ApiFastApp) else None
            tracer = None
            if settings.otel_endpoint:
                # Shut down last, once every span (the meter's last batch too) has ended.
                tracer = Tracer(settings.otel_endpoint, "apifast-router")
                stack.push_async_callback(asyncio.to_thread, tracer.shutdown)
                if own is not None:
                    own.tracer = tracer
                    stack.callback(setattr, own, "tracer", None)  # before the shutdown
            pool = await create_pool(settings.database_url)
            stack.push_async_callback(pool.close)
            core = Core(settings=settings, secret=secret, pool=pool, plugin_manager=pm)
            app.state.core = core

            initial = build_providers(catalog, types)
            # The catalog sync closes the providers it started; these are ours to close.
            stack.push_async_callback(_close_providers, initial)
            for provider in initial.values():
                await provider.start()
            live = LiveCatalog(catalog, dict(initial))

            clickhouse = None
            if settings.clickhouse_url:
                clickhouse = ClickHouseStore(settings.clickhouse_url, settings.clickhouse_database)
                await clickhouse.start()
                await clickhouse.apply_retention(settings.usage_retention_days)
                stack.push_async_callback(clickhouse.close)

            # Off (None, nothing counted on the request path) unless a listener is set.
            metrics = Metrics() if settings.metrics_listen else None
            if metrics is not None and metrics.shared:
                # One of several workers: the parent serves them all (apifast/metrics.py).
                stack.callback(metrics.leave)
                refresh = asyncio.create_task(metrics.refresh_while_running())
                stack.push_async_callback(_cancel, refresh)
            elif metrics is not None:
                metrics_server = MetricsServer(metrics.registry, settings.metrics_listen)
                metrics_server.start()
                stack.callback(metrics_server.stop)
            reserver = Reserver(
                pool,
                settings.reservation_ttl_s,
                default_rpm=settings.default_rpm_limit,
                default_tpm=settings.default_tpm_limit,
            )
            stack.push_async_callback(reserver.close)  # before the pool: it holds connections
            settler = Settler(pool)
            stack.push_async_callback(settler.close)
            leases = None
            if settings.lease_share > 0:
                leases = LeaseBook(
                    pool,
                    share=settings.lease_share,
                    ttl_s=settings.lease_ttl_s,
                    idle_s=settings.lease_idle_s,
                    hold_ttl_s=settings.reservation_ttl_s,
                    database_url=settings.database_url,
                    default_limits=bool(settings.default_rpm_limit or settings.default_tpm_limit),
                    min_rps=settings.lease_min_rps,
                    metrics=metrics,
                )
                await leases.start()
            publisher = EventPublisher(
                settings.nats_url,
                settings.nats_stream,
                settings.nats_subject,
                settings.resolved_data_dir() / "spool",
                settings.spool_max_events,
                settings.nats_replicas,
            )
            publisher.keep_holds_alive(pool, settings.reservation_ttl_s)
            publisher.metrics = metrics
            if metrics is not None:
                metrics.watch(metrics.spool_events, lambda: publisher.spool.count)
                metrics.watch(metrics.spool_age, publisher.spool_age_s)
            await publisher.start()

            if run_meter:
                assert clickhouse is not None, "the meter needs APIFAST_CLICKHOUSE_URL"
                meter = Meter.from_settings(settings, pool, clickhouse)
                meter.metrics = metrics
                meter.tracer = tracer
                meter_task = asyncio.create_task(meter.run())
                stack.push_async_callback(_stop_meter, meter, meter_task, publisher)
            # Drain usage events before the meter stops, so it can still count them.
            stack.push_async_callback(publisher.close)
            if leases is not None:
                # Once requests are done: give back what the leases do not need.
                stack.push_async_callback(leases.close)
            # First of all: the requests cut at the drain timeout settle (bill what they
            # delivered, hand their events to the publisher) before anything closes.
            if own is not None:
                stack.push_async_callback(own.settle, _SETTLE_S)

            routes = RouteBook(
                BreakerPolicy(
                    failures=settings.breaker_failures,
                    error_rate=settings.breaker_error_rate,
                    window=settings.breaker_window,
                    cooldown_s=settings.breaker_cooldown_s,
                ),
                max_attempts=settings.route_max_attempts,
                deadline_s=settings.route_deadline_s,
            )
            health = HealthShare(
                routes, settings.nats_url, settings.resolved_route_health_subject(),
                lambda model_id: live.catalog.get(model_id),
            )  # fmt: skip
            await health.start()
            stack.push_async_callback(health.close)
            app.state.apifast = RouterState(
                settings=settings,
                secret=secret,
                pool=pool,
                live=live,
                publisher=publisher,
                settler=settler,
                clickhouse=clickhouse,
                reserver=reserver,
                leases=leases,
                metrics=metrics,
                tracer=tracer,
                receipts=ReceiptSigner.from_settings(
                    settings.receipt_keys, settings.resolved_data_dir()
                ),
                routes=routes,
                health=health,
            )

            # Every router keeps its catalog current, whether or not it serves the panel.
            sync = CatalogSync(
                live,
                pool,
                database_url=settings.database_url,
                base=catalog,
                types=types,
                ring=KeyRing.from_settings(settings.encryption_keys, secret),
                poll_s=settings.catalog_poll_s,
            )
            await sync.start()
            stack.push_async_callback(_quietly, sync.stop)
            app.state.admin = AdminState.create(core, live, sync, clickhouse)
            # The overview shows route health; the admin never imports the router.
            app.state.admin.route_health = app.state.apifast.route_health

            payments = await start_payments(core)
            stack.push_async_callback(_quietly, payments.stop)
            app.state.payments = payments
            retention = RetentionJob(pool, settings.order_retention_days)
            retention.start()
            stack.push_async_callback(retention.stop)
            yield

    app = ApiFastApp(
        title="ApiFast",
        version=__version__,
        description="Anonymous, prepaid, OpenAI-compatible LLM API gateway.",
        lifespan=lifespan,
        # Swagger UI loads its assets from a CDN: off unless asked for (no third-party loads).
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(ContainUnhandledErrors)
    install_router(app)  # /v1 inference, key, models, usage and generations
    install_payments(app)  # orders, webhooks, recovery
    install_admin(app, settings)  # admin panel and the key holder's dashboard
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["health"])
    app.add_api_route("/readyz", readyz, methods=["GET"], tags=["health"])
    app.state.settings = settings
    return app


async def healthz(request: Request) -> Response:
    """Liveness: 200 while the process serves, with the state of Postgres and NATS in the
    body ("degraded" when one is down). A database outage is not a reason to restart every
    router (a liveness probe that failed with it would): /readyz takes one out of rotation."""
    state: RouterState = request.app.state.apifast
    body: dict[str, object] = {"status": "ok", "version": __version__}
    try:
        await state.pool.fetchval("SELECT 1")
        body["postgres"] = "ok"
    except Exception:
        body["postgres"] = "down"
        body["status"] = "degraded"
    body["nats"] = "ok" if state.publisher.connected() else "down"
    body["spooled_events"] = state.publisher.spool.count
    if body["nats"] != "ok":
        body["status"] = "degraded"
    return Response(orjson.dumps(body), media_type="application/json")


async def readyz(request: Request) -> Response:
    """Ready to take traffic (for a load balancer): Postgres answers, the catalog is loaded
    (the file's and the stored models), and usage events can go somewhere (NATS connected,
    or the spool below its limit). /healthz stays the liveness check."""
    state: RouterState | None = getattr(request.app.state, "apifast", None)
    admin = getattr(request.app.state, "admin", None)
    if state is None or admin is None:
        body: dict[str, object] = {"status": "starting"}
        return Response(orjson.dumps(body), status_code=503, media_type="application/json")
    body = {"status": "ready"}
    try:
        await state.pool.fetchval("SELECT 1")
        body["postgres"] = "ok"
    except Exception:
        body["postgres"] = "down"
    sync = admin.catalog_sync
    body["catalog"] = "ok" if sync is not None and sync.version >= 0 else "not_loaded"
    body["nats"] = "ok" if state.publisher.connected() else "down"
    body["spooled_events"] = state.publisher.spool.count
    body["metering"] = "ok" if state.publisher.accepting else "spool_full"
    if body["postgres"] != "ok" or body["catalog"] != "ok" or body["metering"] != "ok":
        body["status"] = "not_ready"
    status = 200 if body["status"] == "ready" else 503
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


async def _quietly(stop: object) -> None:
    with suppress(Exception):
        await stop()  # type: ignore[operator]


async def _close_providers(providers: dict[str, Provider]) -> None:
    for provider in providers.values():
        with suppress(Exception):
            await provider.close()


async def _stop_meter(meter: Meter, task: asyncio.Task[None], publisher: EventPublisher) -> None:
    with suppress(TimeoutError):
        await asyncio.wait_for(_wait_idle(meter, publisher), timeout=10)
    meter.stop()
    with suppress(Exception):
        await task


async def _wait_idle(meter: Meter, publisher: EventPublisher) -> None:
    # The meter is idle once a fetch came back empty after the publisher's last event.
    target = publisher.published
    while True:
        meter.idle.clear()
        await meter.idle.wait()
        if publisher.published <= target:
            return
        target = publisher.published
