"""The embedded engines of `apifast dev`: real PostgreSQL, nats-server with JetStream and chdb.

These always start their own engines in a temporary data dir, whatever URLs the environment
provides, because the embedded stack is what they test.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from apifast.embedded import (
    DEV_STATE_FILE,
    SECRET_KEY_FILE,
    EmbeddedError,
    embedded_stack,
    read_dev_state,
    resolve_dev_urls,
    start_nats,
)
from apifast.settings import Settings
from tests.services import StreamNames

REPO = Path(__file__).resolve().parent.parent


def blank_settings(data_dir: Path) -> Settings:
    """Settings with no service configured, whatever APIFAST_* says."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data_dir,
        database_url="",
        nats_url="",
        clickhouse_url="",
        secret_key="",
    )


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIFAST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_python(code: str, *, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def system_identifier(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        value: int = await conn.fetchval("SELECT system_identifier FROM pg_control_system()")
        return value
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="module")
def stack(stack_dir: Path) -> Iterator[Settings]:
    with embedded_stack(blank_settings(stack_dir)) as settings:
        yield settings


async def test_postgres_answers(stack: Settings) -> None:
    assert stack.database_url.startswith("postgresql://")
    conn = await asyncpg.connect(stack.database_url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_nats_jetstream_acks(stack: Settings) -> None:
    assert stack.nats_url.startswith("nats://127.0.0.1:")
    nc = await nats.connect(stack.nats_url, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        await js.add_stream(name="EMBEDDED_TEST", subjects=["embedded.test"])
        ack = await js.publish("embedded.test", b"{}")
        assert (ack.stream, ack.seq) == ("EMBEDDED_TEST", 1)
    finally:
        await nc.close()


def test_chdb_answers(stack: Settings, stack_dir: Path) -> None:
    assert stack.clickhouse_url == f"chdb://{(stack_dir / 'clickhouse').resolve()}"
    # In a child process: this one may already have another chdb path open (one per process).
    out = run_python(
        f"""
        import clickhouse_connect
        client = clickhouse_connect.get_client(dsn={stack.clickhouse_url!r})
        print(client.query("SELECT 40 + 2").result_rows[0][0])
        client.close()
        """,
        cwd=stack_dir,
    )
    assert out.strip() == "42"


def test_secret_key_is_persisted_privately(stack: Settings, stack_dir: Path) -> None:
    path = stack_dir / SECRET_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == stack.secret_key
    assert len(stack.secret_key) == 64


async def test_second_process_finds_the_same_postgres(stack: Settings, stack_dir: Path) -> None:
    state = read_dev_state(stack_dir)
    assert state is not None and state.pid == os.getpid()
    # What another CLI command does: plain Settings from its environment, then the dev state.
    out = run_python(
        f"""
        import asyncio, json
        import asyncpg
        from apifast.embedded import resolve_dev_urls
        from apifast.settings import Settings

        settings = resolve_dev_urls(Settings(_env_file=None, data_dir={str(stack_dir)!r}))

        async def main():
            conn = await asyncpg.connect(settings.database_url)
            sysid = await conn.fetchval("SELECT system_identifier FROM pg_control_system()")
            await conn.close()
            return sysid

        print(json.dumps({{
            "database_url": settings.database_url,
            "nats_url": settings.nats_url,
            "secret_key": settings.secret_key,
            "sysid": asyncio.run(main()),
        }}))
        """,
        cwd=REPO,
    )
    seen = json.loads(out)
    assert seen["database_url"] == stack.database_url
    assert seen["nats_url"] == stack.nats_url
    assert seen["secret_key"] == stack.secret_key
    assert seen["sysid"] == await system_identifier(stack.database_url)


def test_resolve_in_process_matches(stack: Settings, stack_dir: Path) -> None:
    resolved = resolve_dev_urls(blank_settings(stack_dir))
    assert resolved.database_url == stack.database_url
    assert resolved.secret_key == stack.secret_key


def test_second_dev_stack_is_refused(tmp_path: Path) -> None:
    # A live process of ours stands in for another `apifast dev`; it exits when stdin closes.
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE)  # fmt: skip
    try:
        state = {
            "pid": holder.pid,
            "start": "",
            "database_url": "postgresql://x@/y",
            "nats_url": "",
            "clickhouse_url": "",
            "started_at": "",
        }
        (tmp_path / DEV_STATE_FILE).write_text(json.dumps(state))
        assert resolve_dev_urls(blank_settings(tmp_path)).database_url == "postgresql://x@/y"
        with pytest.raises(EmbeddedError, match="already running"):
            with embedded_stack(blank_settings(tmp_path), services=()):
                pass
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    # Its owner is gone now: the stale file is ignored.
    assert read_dev_state(tmp_path) is None
    assert resolve_dev_urls(blank_settings(tmp_path)).database_url == ""


async def test_data_survives_a_restart(tmp_path: Path) -> None:
    settings = blank_settings(tmp_path)
    with embedded_stack(settings, services={"postgres"}, write_state=False) as running:
        conn = await asyncpg.connect(running.database_url)
        await conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")
        await conn.close()
    # Stopped: no postmaster left behind.
    assert not (tmp_path / "postgres" / "postmaster.pid").exists()
    with embedded_stack(settings, services={"postgres"}, write_state=False) as running:
        conn = await asyncpg.connect(running.database_url)
        assert await conn.fetchval("SELECT n FROM kept") == 7
        await conn.close()


def test_nats_server_is_stopped_on_close(tmp_path: Path) -> None:
    server = start_nats(tmp_path / "nats")
    host, _, port = server.url.removeprefix("nats://").rpartition(":")
    server.close()
    assert server.process.returncode is not None
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=5).close()


# --- the service fixtures of tests/services.py (whichever source they picked) -------------------


async def test_fresh_database_is_new_and_empty(fresh_database: str, pg_server_url: str) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        name = await conn.fetchval("SELECT current_database()")
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
    finally:
        await conn.close()
    assert name.startswith("apifast_test_") and "test_embedded" in name
    assert tables == 0
    assert fresh_database != pg_server_url


async def test_database_factory_makes_distinct_databases(database_factory: Any) -> None:
    first, second = database_factory("one"), database_factory("two")
    assert first != second
    for url in (first, second):
        conn = await asyncpg.connect(url)
        await conn.close()


async def test_jetstream_names_are_usable(nats_url: str, jetstream_names: StreamNames) -> None:
    nc = await nats.connect(nats_url, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        await js.add_stream(name=jetstream_names.stream, subjects=[jetstream_names.subject])
        ack = await js.publish(jetstream_names.subject, b"{}")
        assert ack.stream == jetstream_names.stream
    finally:
        await nc.close()


def test_clickhouse_database_is_usable(clickhouse_url: str, clickhouse_database: str) -> None:
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=clickhouse_url, database=clickhouse_database)
    try:
        client.command("CREATE TABLE t (n UInt8) ENGINE = MergeTree ORDER BY n")
        client.insert("t", [[1], [2]], column_names=["n"])
        assert client.query("SELECT sum(n) FROM t").result_rows[0][0] == 3
    finally:
        client.close()
