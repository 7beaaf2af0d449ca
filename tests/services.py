"""Service fixtures for the tests: PostgreSQL, NATS JetStream and ClickHouse.

Enable them in tests/conftest.py with

    pytest_plugins = ["tests.services"]

Where each service comes from (first match wins):

1. An explicit URL: APIFAST_TEST_DATABASE_URL / APIFAST_TEST_NATS_URL, else APIFAST_DATABASE_URL /
   APIFAST_NATS_URL. CI (.ci/run) points these at the local Postgres and NATS.
2. testcontainers, when a Docker daemon answers within two seconds (postgres:16-alpine,
   nats:2-alpine with -js). Set APIFAST_TEST_NO_DOCKER=1 to skip this step.
3. The embedded engines of `apifast.embedded`: PostgreSQL under .apifast/test (kept between
   runs, so start-up is quick; shared with concurrent test sessions, the last one stops it) and
   a nats-server with a throw-away store.

ClickHouse is chdb (in-process) unless APIFAST_TEST_CLICKHOUSE_URL gives an http:// server.

chdb limits, measured with chdb-core 26.9 and clickhouse-connect 1.12: a process can have only one
chdb path open ("EmbeddedServer already initialized with path ..."). Any number of clients may
share that path, and a different path can be opened only once every client is closed. Hence one
session-wide chdb path (`clickhouse_url`) and a fresh ClickHouse *database* per test
(`clickhouse_database`): code under test must take the database name as a parameter, and tests
must close their clients. To exercise a different chdb path, use a subprocess.

Fixtures (all synchronous, so sync and async tests can use them):

    pg_server_url        session   URL of the server's maintenance database, as a superuser
    database_factory     session   make(label) -> URL of a new empty database, dropped at the end
    fresh_database       module    URL of a new empty database for this test module
    nats_url             session   nats:// URL of a JetStream-enabled server
    jetstream_names      function  StreamNames unique to the test; its stream is deleted after
    clickhouse_url       session   chdb:///... (or the http:// URL from the environment)
    clickhouse_database  function  name of a new empty ClickHouse database, dropped after
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import secrets
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

T = TypeVar("T")

_REPO = Path(__file__).resolve().parent.parent
_POSTGRES_IMAGE = "postgres:16-alpine"
_NATS_IMAGE = "nats:2-alpine"

__all__ = [
    "StreamNames",
    "clickhouse_database",
    "clickhouse_url",
    "database_factory",
    "database_url",
    "fresh_database",
    "jetstream_names",
    "nats_url",
    "pg_server_url",
    "run_async",
    "unique_name",
]


# --- helpers -----------------------------------------------------------------------------------


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on a private loop in another thread.

    Keeps set-up code off pytest-asyncio's session loop, which may not be running (sync fixtures)
    or must not be disturbed by asyncio.run().
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def unique_name(prefix: str = "t") -> str:
    """`prefix` plus random hex: a valid Postgres/ClickHouse identifier and JetStream token."""
    return f"{prefix}_{secrets.token_hex(6)}"


def database_url(server_url: str, database: str) -> str:
    """`server_url` pointing at `database` instead (host, credentials and options kept)."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


def _env(*names: str) -> str:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return ""


@pytest.fixture(scope="session")
def _docker_available() -> bool:
    if os.environ.get("APIFAST_TEST_NO_DOCKER"):
        return False
    try:
        import docker

        client = docker.from_env(timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception:  # no SDK, no daemon, no permission: all mean "no Docker"
        return False
    return True


# --- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server_url(_docker_available: bool) -> Iterator[str]:
    explicit = _env("APIFAST_TEST_DATABASE_URL", "APIFAST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    if _docker_available:
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # older testcontainers layout
            from testcontainers.postgres import PostgresContainer  # type: ignore[no-redef]
        with PostgresContainer(_POSTGRES_IMAGE, driver=None) as container:
            yield container.get_connection_url()
        return
    from apifast.embedded import start_postgres

    data_dir = Path(os.environ.get("APIFAST_TEST_DATA_DIR") or _REPO / ".apifast" / "test")
    # Not durable: test data is disposable and fsync is most of the cost.
    with start_postgres(data_dir, durable=False) as server:
        yield server.dsn


async def _create_database(server_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(server_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_url)
    try:
        # FORCE: a pool a test forgot to close must not keep the database alive.
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _label(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[-24:] or "t"


@pytest.fixture(scope="session")
def database_factory(pg_server_url: str) -> Iterator[Callable[[str], str]]:
    """make(label) -> URL of a new, empty database; every one is dropped at session end."""
    made: list[str] = []

    def make(label: str = "t") -> str:
        name = unique_name(f"apifast_test_{_label(label)}")
        run_async(_create_database(pg_server_url, name))
        made.append(name)
        return database_url(pg_server_url, name)

    yield make
    for name in made:
        run_async(_drop_database(pg_server_url, name))


@pytest.fixture(scope="module")
def fresh_database(pg_server_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a new, empty database for this test module; dropped when the module is done."""
    name = unique_name(f"apifast_test_{_label(request.module.__name__)}")
    run_async(_create_database(pg_server_url, name))
    try:
        yield database_url(pg_server_url, name)
    finally:
        run_async(_drop_database(pg_server_url, name))


# --- NATS --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nats_url(_docker_available: bool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    explicit = _env("APIFAST_TEST_NATS_URL", "APIFAST_NATS_URL")
    if explicit:
        yield explicit
        return
    if _docker_available:
        from testcontainers.community.nats import NatsContainer

        with NatsContainer(_NATS_IMAGE, jetstream=True) as container:
            yield container.nats_uri()
        return
    from apifast.embedded import start_nats

    with start_nats(tmp_path_factory.mktemp("nats")) as server:
        yield server.url


@dataclass(frozen=True)
class StreamNames:
    """JetStream names private to one test; `subject` is the only subject of `stream`."""

    stream: str
    subject: str
    durable: str


async def _delete_stream(url: str, stream: str) -> None:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        try:
            await nc.jetstream().delete_stream(stream)
        except NotFoundError:
            pass
    finally:
        await nc.close()


@pytest.fixture
def jetstream_names(nats_url: str) -> Iterator[StreamNames]:
    token = secrets.token_hex(6)
    names = StreamNames(
        stream=f"APIFAST_TEST_{token.upper()}",
        subject=f"apifast.test.{token}",
        durable=f"apifast-test-{token}",
    )
    yield names
    run_async(_delete_stream(nats_url, names.stream))


# --- ClickHouse --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def clickhouse_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    explicit = _env("APIFAST_TEST_CLICKHOUSE_URL")
    if explicit:
        return explicit
    return f"chdb://{tmp_path_factory.mktemp('clickhouse').as_posix()}"


def _clickhouse_command(url: str, sql: str) -> None:
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=url)
    try:
        client.command(sql)
    finally:
        client.close()  # chdb: an open client pins this process to the path


@pytest.fixture
def clickhouse_database(clickhouse_url: str) -> Iterator[str]:
    name = unique_name("apifast_test")
    _clickhouse_command(clickhouse_url, f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        _clickhouse_command(clickhouse_url, f"DROP DATABASE IF EXISTS {name} SYNC")
