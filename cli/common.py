"""What the CLI's commands share: logging set-up, required settings and the database."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from apifast.settings import Settings


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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
