"""ApiFast as production runs it, for the benchmark: `apifast serve` (uvicorn with uvloop and
httptools, access log off) in its own process, on a fresh Postgres database and its own
JetStream stream, with one funded key. Everything is removed again on stop."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx

from apifast.key_admin import create_key
from apifast.server.migrations import migrate_database
from bench.children import cpu_seconds
from bench.nginx_upstream import NginxUpstream, free_port

CHAT_MODEL = "bench-chat"
STREAM_MODEL = "bench-stream"
CREDIT = Decimal("1000000.00")


def models_toml(upstream: NginxUpstream) -> str:
    # Two providers on one nginx: the streaming model's base URL serves the SSE body.
    return f"""
[providers.nginx]
type = "openai"
base_url = "{upstream.base_url}"

[providers.nginx_sse]
type = "openai"
base_url = "{upstream.stream_base_url}"

[[models]]
id = "{CHAT_MODEL}"
input_usd_per_mtok = "0.50"
output_usd_per_mtok = "1.50"
routes = [ {{ provider = "nginx", model = "upstream-model" }} ]

[[models]]
id = "{STREAM_MODEL}"
input_usd_per_mtok = "0.50"
output_usd_per_mtok = "1.50"
routes = [ {{ provider = "nginx_sse", model = "upstream-model" }} ]
"""


def _dsn_with_db(dsn: str, database: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{database}"


def apifast_command() -> list[str]:
    script = Path(sys.executable).with_name("apifast")
    if script.exists():
        return [str(script)]
    found = shutil.which("apifast")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from apifast.cli import main; sys.exit(main())"]


class ApiFastServer:
    def __init__(self, workdir: Path, upstream: NginxUpstream, admin_dsn: str, nats_url: str):
        tag = f"{os.getpid()}_{secrets.token_hex(3)}"
        self.workdir = workdir
        self.upstream = upstream
        self.admin_dsn = admin_dsn
        self.database = f"apifast_bench_{tag}"
        self.dsn = _dsn_with_db(admin_dsn, self.database)
        self.nats_url = nats_url
        self.stream = f"APIFAST_BENCH_{tag}".upper()
        self.subject = f"apifast_bench_{tag}.usage"
        self.port = free_port()
        self.secret = secrets.token_urlsafe(48)
        self.key = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "apifast.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _prepare_database(self) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await conn.close()
        await migrate_database(self.dsn)
        self.key, _ = await create_key(self.dsn, self.secret.encode(), CREDIT)

    def env(self) -> dict[str, str]:
        models = self.workdir / "models.toml"
        models.write_text(models_toml(self.upstream))
        env = {k: v for k, v in os.environ.items() if not k.startswith("APIFAST_")}
        env.update(
            APIFAST_DATABASE_URL=self.dsn,
            APIFAST_NATS_URL=self.nats_url,
            APIFAST_NATS_STREAM=self.stream,
            APIFAST_NATS_SUBJECT=self.subject,
            APIFAST_MODELS_FILE=str(models),
            APIFAST_SECRET_KEY=self.secret,
            APIFAST_HOST="127.0.0.1",
            APIFAST_PORT=str(self.port),
            APIFAST_DATA_DIR=str(self.workdir / "data"),
            APIFAST_LOG_LEVEL="WARNING",
        )
        # Serve this checkout's code, even packages added after `pip install -e .`.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        return env

    async def start(self) -> ApiFastServer:
        await self._prepare_database()
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - a fork, once, before measuring
            [*apifast_command(), "serve"],
            env=self.env(),
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=1) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError("apifast serve exited: " + self.log_path.read_text()[-2000:])
                try:
                    r = await client.get(self.base_url + "/healthz")
                    if r.status_code == 200 and r.json().get("nats") == "ok":
                        return self
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"apifast serve did not become healthy; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        return cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        await self._drop_stream()
        await self._drop_database()

    async def _drop_stream(self) -> None:
        import nats

        try:
            nc = await nats.connect(self.nats_url, connect_timeout=2, max_reconnect_attempts=0)
        except Exception:
            return
        try:
            await nc.jetstream().delete_stream(self.stream)
        except Exception:
            pass
        finally:
            await nc.close()

    async def _drop_database(self) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        finally:
            await conn.close()
