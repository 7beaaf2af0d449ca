"""The app each worker process of `apifast serve` runs when `APIFAST_WORKERS` > 1.

uvicorn spawns the workers as fresh interpreters: the parent's logging set-up is not theirs,
so without this their lines bypassed `APIFAST_LOG_FORMAT` and `APIFAST_LOG_LEVEL` (a JSON
log got bare text lines, and INFO was lost).
"""

from __future__ import annotations

from fastapi import FastAPI

from apifast.cli.common import configure_logging
from apifast.server.app import create_app
from apifast.settings import Settings


def create_worker_app() -> FastAPI:
    settings = Settings()
    configure_logging(settings)
    return create_app(settings)
