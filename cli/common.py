"""What the CLI's commands share: logging set-up, required settings and the database."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson

from apifast.settings import Settings


def configure_logging(settings: Settings) -> None:
    if settings.log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
        return
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line. An exception is named by its type only: its text, or a
    traceback's, could carry request content."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return orjson.dumps(entry).decode()


@contextlib.contextmanager
def database_settings(settings: Settings) -> Iterator[Settings]:
    """Settings with a database: APIFAST_DATABASE_URL, else the running `apifast dev`'s,
    else the embedded PostgreSQL under the data dir, started for this command only."""
    from apifast.embedded import embedded_stack, resolve_dev_urls

    if not (settings.database_url and settings.secret_key):
        settings = resolve_dev_urls(settings)
    if settings.database_url:
        yield settings
        return
    with embedded_stack(settings, services={"postgres"}, write_state=False) as resolved:
        yield resolved


def require(settings: Settings, *names: str) -> None:
    missing = [f"APIFAST_{n.upper()}" for n in names if not getattr(settings, n)]
    if missing:
        raise SystemExit(f"apifast: set {', '.join(missing)} (or use `apifast dev`)")
