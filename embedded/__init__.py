"""Embedded engines for `apifast dev` and the tests: real PostgreSQL, nats-server and chdb.

Nothing is installed system-wide and no system service is used; everything lives under the
data dir (`Settings.data_dir`, default `./.apifast`):

    postgres/             PGDATA of the PostgreSQL 16 shipped in the `pgserver` wheel. It listens
                          on no TCP port, only on a Unix socket in this directory (or in a short
                          /tmp/apifast-pg-* directory when the path is too long for a socket).
    postgres.lock         flock that serialises start/stop between processes.
    postgres.users.json   the processes holding a handle; the last one to let go stops the server,
                          so `apifast keys create` can share the server of a running `apifast dev`.
    nats/                 JetStream store, ports file and log of the nats-server we start.
    clickhouse/           chdb data. chdb is in-process: one process may have it open at a time.
    secret_key            HMAC key for API-key hashes (mode 0600), generated once.
    dev.json              URLs and pid of the running `apifast dev`, for other CLI commands
                          (see `resolve_dev_urls`).

Run as root, PostgreSQL refuses to start, so initdb/pg_ctl run as an unprivileged system user
that owns PGDATA: the existing owner of PGDATA, else "pgserver" (the name the pgserver library
uses; created with useradd if missing), else "nobody". That user needs search (o+x) permission on
the ancestors of PGDATA and of the binaries; it is added where missing, and logged.
"""

if __name__ != "apifast.embedded":
    raise ImportError("import this package as apifast.embedded")

from apifast.embedded.clickhouse import clickhouse_url_for
from apifast.embedded.devstate import (
    DEV_STATE_FILE,
    SECRET_KEY_FILE,
    DevState,
    clear_dev_state,
    ensure_secret_key,
    read_dev_state,
    resolve_dev_urls,
    write_dev_state,
)
from apifast.embedded.nats import EmbeddedNats, nats_server_binary, start_nats
from apifast.embedded.postgres import EmbeddedPostgres, start_postgres
from apifast.embedded.processes import EmbeddedError, ProcessId
from apifast.embedded.stack import ALL_SERVICES, Service, async_embedded_stack, embedded_stack

__all__ = [
    "ALL_SERVICES",
    "DEV_STATE_FILE",
    "SECRET_KEY_FILE",
    "DevState",
    "EmbeddedError",
    "EmbeddedNats",
    "EmbeddedPostgres",
    "ProcessId",
    "Service",
    "async_embedded_stack",
    "clear_dev_state",
    "clickhouse_url_for",
    "embedded_stack",
    "ensure_secret_key",
    "nats_server_binary",
    "read_dev_state",
    "resolve_dev_urls",
    "start_nats",
    "start_postgres",
    "write_dev_state",
]
