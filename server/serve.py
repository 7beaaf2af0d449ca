"""Running an app on uvicorn the way ApiFast is served: uvloop, httptools, no access log."""

from __future__ import annotations

import sys

from apifast.settings import Settings


def run_uvicorn(app: object, settings: Settings, **options: object) -> None:
    import signal

    import uvicorn

    # uvicorn re-raises SIGTERM after its graceful shutdown; turning it into SystemExit lets
    # the callers' `finally` blocks (embedded engines, spools) run instead of dying there.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if settings.log_format == "json":
        # uvicorn's own lines then go through the root logger's JSON handler too.
        options = {"log_config": None, **options}
    uvicorn.run(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        # Access logs would write client IPs; IPs are never persisted.
        access_log=False,
        # Behind a trusted proxy the client address comes from X-Forwarded-For; it is used
        # in memory for per-IP limits and never stored or sent upstream.
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
        log_level=settings.log_level.lower(),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        # SIGTERM: stop accepting (the listener closes), let requests in flight finish for up
        # to the drain timeout, cut the rest (billed for what they delivered), then the
        # lifespan's shutdown flushes the usage publisher (server/app.py).
        timeout_graceful_shutdown=settings.drain_timeout_s,
        **options,  # type: ignore[arg-type]
    )
