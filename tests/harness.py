"""Runs a whole ApiFast (router + meter) on real Postgres, NATS and chdb inside the test's
event loop, served by uvicorn on an ephemeral 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import socket
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvicorn

from apifast.key_admin import insert_key
from apifast.server.app import create_app
from apifast.server.migrations import migrate_database
from apifast.settings import Settings

SECRET = "test-secret-key-0123456789abcdefghijklmnopqrstuvwxyz"


def unique_name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(5)}"


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free to listen on, for a server started later (a child process). Taken below
    the kernel's ephemeral range: a port the kernel handed out (bind to 0) can be taken in
    the meantime as the source port of any outgoing connection, and the server then fails
    to bind (seen in CI)."""
    top = min(_ephemeral_floor(), 65536) - 1
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(20000, top) if top > 20000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


def models_toml(upstream_url: str, extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        [providers.local]
        type = "openai"
        base_url = "{upstream_url}"
        api_key_env = "LOCAL_UPSTREAM_KEY"

        [[models]]
        id = "fast-chat"
        input_usd_per_mtok = "0.50"
        output_usd_per_mtok = "1.50"
        routes = [ {{ provider = "local", model = "upstream-model-a" }} ]

        [[models]]
        id = "embed-small"
        type = "embeddings"
        input_usd_per_mtok = "0.02"
        routes = [ {{ provider = "local", model = "upstream-embed" }} ]
        """
    ) + textwrap.dedent(extra)


@dataclass
class Stack:
    settings: Settings
    base_url: str
    app: Any
    server: uvicorn.Server
    task: asyncio.Task[None]

    @property
    def state(self) -> Any:
        return self.app.state.apifast

    @property
    def pool(self) -> asyncpg.Pool:
        return self.state.pool

    async def create_key(self, credit: str = "5.00") -> str:
        async with self.pool.acquire() as conn, conn.transaction():
            key, _, _ = await insert_key(conn, SECRET.encode(), Decimal(credit))
        return key

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30)

    async def wait_until(self, read: Any, expected: Any, timeout: float = 20) -> None:
        """Poll the coroutine function `read` until it returns `expected`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (value := await read()) != expected:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"waited for {expected!r}, last saw {value!r}")
            await asyncio.sleep(0.05)

    async def wait_metered(self, generation_ids: list[str], timeout: float = 20) -> None:
        """Wait until every id is in the Postgres ledger and then in ClickHouse: the meter
        debits first and writes the analytics after (metering/consumer.py)."""
        deadline = asyncio.get_running_loop().time() + timeout
        wanted = len(set(generation_ids))
        clickhouse = self.state.clickhouse
        while True:
            n = await self.pool.fetchval(
                "SELECT count(*) FROM ledger WHERE kind = 'usage' AND ref = ANY($1::text[])",
                generation_ids,
            )
            if n == wanted and clickhouse is not None:
                rows = await clickhouse.query(
                    "SELECT uniqExact(generation_id) AS n FROM usage_events"
                    " WHERE generation_id IN {ids:Array(String)}",
                    {"ids": generation_ids},
                )
                n = int(rows[0]["n"])
            if n == wanted:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"only {n} of {len(generation_ids)} events metered")
            await asyncio.sleep(0.05)


def stack_settings(
    *, database_url: str, nats_url: str, clickhouse_url: str, data_dir: Path,
    models_file: Path | None, **overrides: Any,
) -> Settings:  # fmt: skip
    name = unique_name("af")
    values: dict[str, Any] = {
        "database_url": database_url,
        "nats_url": nats_url,
        "clickhouse_url": clickhouse_url,
        "clickhouse_database": name,
        "nats_stream": name.upper(),
        "nats_subject": f"{name}.usage",
        "meter_durable": f"{name}-meter",
        "meter_batch_wait_s": 0.1,
        "data_dir": data_dir,
        "models_file": models_file,
        "secret_key": SECRET,
        "host": "127.0.0.1",
        "port": free_port(),
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_stack(
    settings: Settings, *, run_meter: bool = True, extra_plugins: tuple[object, ...] = ()
) -> AsyncIterator[Stack]:
    await migrate_database(settings.database_url)
    app = create_app(settings, run_meter=run_meter, extra_plugins=extra_plugins)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=settings.port, log_level="warning", access_log=False,
        lifespan="on", loop="none",
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server stopped during start-up")
        await asyncio.sleep(0.02)
    stack = Stack(settings, f"http://127.0.0.1:{settings.port}", app, server, task)
    try:
        yield stack
    finally:
        server.should_exit = True
        await task
