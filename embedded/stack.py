"""The embedded stack: start the engines whose URL setting is empty, for `apifast dev`, the
other CLI commands and the tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Collection, Iterator
from typing import Any, Literal

from apifast.embedded.clickhouse import clickhouse_url_for
from apifast.embedded.devstate import (
    DEV_STATE_FILE,
    clear_dev_state,
    ensure_secret_key,
    read_dev_state,
    write_dev_state,
)
from apifast.embedded.nats import start_nats
from apifast.embedded.postgres import start_postgres
from apifast.embedded.processes import EmbeddedError, ensure_data_dir
from apifast.settings import Settings

Service = Literal["postgres", "nats", "clickhouse"]
ALL_SERVICES: frozenset[Service] = frozenset({"postgres", "nats", "clickhouse"})


# --- the stack ---------------------------------------------------------------------------------


@contextlib.contextmanager
def embedded_stack(
    settings: Settings,
    *,
    services: Collection[Service] = ALL_SERVICES,
    write_state: bool = True,
    nats_port: int | None = None,
    durable: bool = True,
) -> Iterator[Settings]:
    """Start the engines among `services` whose URL setting is empty; yield completed Settings.

    The yielded copy has `database_url`, `nats_url`, `clickhouse_url` (for the requested
    services), `secret_key` and an absolute `data_dir` filled in. On exit, whatever was started
    here is stopped (PostgreSQL only if no other process still holds it). With `write_state`,
    <data_dir>/dev.json announces the URLs to other CLI commands for as long as we run; it is
    refused while another live `apifast dev` owns the data dir.
    """
    data_dir = ensure_data_dir(settings.data_dir)
    if write_state:
        other = read_dev_state(data_dir)
        if other is not None and other.pid != os.getpid():
            raise EmbeddedError(
                f"apifast dev is already running on {data_dir} (pid {other.pid}); "
                f"stop it, or remove {data_dir / DEV_STATE_FILE} if that is wrong"
            )
    update: dict[str, Any] = {"data_dir": data_dir}
    with contextlib.ExitStack() as stack:
        if "nats" in services and not settings.nats_url:
            nats = stack.enter_context(start_nats(data_dir / "nats", port=nats_port))
            update["nats_url"] = nats.url
        if "postgres" in services and not settings.database_url:
            pg = stack.enter_context(start_postgres(data_dir, durable=durable))
            update["database_url"] = pg.dsn
        if "clickhouse" in services and not settings.clickhouse_url:
            (data_dir / "clickhouse").mkdir(exist_ok=True)
            update["clickhouse_url"] = clickhouse_url_for(data_dir)
        if not settings.secret_key:
            update["secret_key"] = ensure_secret_key(data_dir)
        resolved = settings.model_copy(update=update)
        if write_state:
            write_dev_state(data_dir, resolved)
            stack.callback(clear_dev_state, data_dir)
        yield resolved


@contextlib.asynccontextmanager
async def async_embedded_stack(
    settings: Settings,
    *,
    services: Collection[Service] = ALL_SERVICES,
    write_state: bool = True,
    nats_port: int | None = None,
    durable: bool = True,
) -> AsyncIterator[Settings]:
    """`embedded_stack` for async code.

    Start-up and shut-down block the loop for a moment on purpose: running them on this thread
    (the main one, normally) ties nats-server's life to ours, see `exit_with_parent_hook`.
    """
    with embedded_stack(
        settings, services=services, write_state=write_state, nats_port=nats_port, durable=durable
    ) as resolved:
        yield resolved
