"""Tools for the billing and fault tests: router and meter subprocesses, a private
nats-server that can be stopped and restarted, and the exactly-once audit that compares
what the stream, the Postgres ledger and ClickHouse hold."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
from nats.js.errors import NotFoundError

from apifast.embedded import EmbeddedNats, start_nats
from apifast.key_admin import insert_key
from apifast.metering.stream import nats_servers
from apifast.server.migrations import migrate_database
from apifast.settings import Settings
from tests.harness import SECRET, free_port

REPO = Path(__file__).resolve().parent.parent


# --- a private nats-server ----------------------------------------------------------------------


class OwnNats:
    """A nats-server of this test only, on a fixed port so it can be stopped and restarted
    with the same URL and store (never the shared one on 4222)."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = store_dir
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._server: EmbeddedNats | None = None

    async def start(self) -> None:
        self._server = await asyncio.to_thread(start_nats, self.store_dir, port=self.port)

    def kill(self) -> None:
        """Stop it abruptly (SIGKILL), as a crash or a network partition would."""
        if self._server is not None:
            self._server.process.kill()
            self._server.process.wait()
            self._server.close()
            self._server = None

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


class NatsCluster:
    """A 3-node nats-server cluster with JetStream (the same binary as `apifast dev`), on free
    127.0.0.1 ports; each node can be SIGKILLed and restarted with the same ports and store."""

    def __init__(self, root: Path, nodes: int = 3) -> None:
        self.root = root
        self.client_ports = [free_port() for _ in range(nodes)]
        self.route_ports = [free_port() for _ in range(nodes)]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * nodes
        # Every node's URL: clients fail over between them.
        self.url = ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def _config(self, n: int) -> Path:
        store = self.root / f"n{n}"
        store.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.route_ports)
        conf = store / "nats.conf"
        conf.write_text(textwrap.dedent(f"""
            server_name: n{n}
            listen: 127.0.0.1:{self.client_ports[n]}
            jetstream {{ store_dir: "{store / "js"}" }}
            cluster {{
              name: apifast-test
              listen: 127.0.0.1:{self.route_ports[n]}
              routes: [{routes}]
            }}
        """))  # fmt: skip
        return conf

    def start(self, n: int) -> None:
        from apifast.embedded.nats import nats_server_binary

        assert self.processes[n] is None or self.processes[n].poll() is not None  # type: ignore[union-attr]
        conf = self._config(n)
        with (self.root / f"n{n}.log").open("ab") as log:
            self.processes[n] = subprocess.Popen(
                [nats_server_binary(), "-c", str(conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip

    def start_all(self) -> None:
        for n in range(len(self.processes)):
            self.start(n)

    def kill(self, n: int) -> None:
        """SIGKILL one node (by its pid), as a crash would."""
        process = self.processes[n]
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    async def wait_stream_ready(self, stream: str, replicas: int) -> None:
        """Until the stream has a leader and `replicas` current copies (peers caught up)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while True:
            with contextlib.suppress(Exception):
                nc = await nats.connect(nats_servers(self.url), connect_timeout=2,
                                        max_reconnect_attempts=1)  # fmt: skip
                try:
                    info = await nc.jetstream(timeout=2).stream_info(stream)
                    cluster = info.cluster
                    if cluster is not None and cluster.leader:
                        current = [r for r in cluster.replicas or [] if r.current]
                        if 1 + len(current) >= replicas:
                            return
                finally:
                    await nc.close()
            if loop.time() > deadline:
                raise AssertionError(f"stream {stream} never had {replicas} current replicas")
            await asyncio.sleep(0.2)


# --- subprocesses ---------------------------------------------------------------------------------


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of an `apifast` subprocess configured like `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIFAST_")}
    values = {
        "DATABASE_URL": settings.database_url,
        "NATS_URL": settings.nats_url,
        "CLICKHOUSE_URL": settings.clickhouse_url,
        "CLICKHOUSE_DATABASE": settings.clickhouse_database,
        "NATS_STREAM": settings.nats_stream,
        "NATS_SUBJECT": settings.nats_subject,
        "METER_DURABLE": settings.meter_durable,
        "METER_BATCH_SIZE": str(settings.meter_batch_size),
        "METER_BATCH_WAIT_S": str(settings.meter_batch_wait_s),
        "DATA_DIR": str(settings.data_dir),
        "MODELS_FILE": str(settings.models_file or ""),
        "SECRET_KEY": SECRET,
        "HOST": "127.0.0.1",
        "PORT": str(settings.port),
        "SPOOL_MAX_EVENTS": str(settings.spool_max_events),
        "NATS_REPLICAS": str(settings.nats_replicas),
        "RESERVATION_TTL_S": str(settings.reservation_ttl_s),
        "RESERVATION_SWEEP_S": str(settings.reservation_sweep_s),
        "STREAM_CHECKPOINT_S": str(settings.stream_checkpoint_s),
        "LOG_LEVEL": "WARNING",
    }
    env.update({f"APIFAST_{k}": v for k, v in values.items()})
    env.update({f"APIFAST_{k}": v for k, v in extra.items()})
    env["PYTHONPATH"] = str(REPO)
    return env


class ApifastProcess:
    """`python -m apifast.cli <command>` in its own process group, logs to a file."""

    def __init__(self, command: str, env: dict[str, str], workdir: Path, name: str) -> None:
        self.command = command
        self.env = env
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "apifast.cli", self.command],
                cwd=self.workdir,  # no stray .env is read
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def signal(self, sig: int) -> int:
        """Send `sig` (to this pid only) and wait for the process to exit; its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        return await asyncio.to_thread(self.process.wait)

    async def stop(self) -> int:
        return await self.signal(signal.SIGTERM)

    async def kill(self) -> int:
        return await self.signal(signal.SIGKILL)


class RouterProcess(ApifastProcess):
    def __init__(
        self, settings: Settings, workdir: Path, name: str = "router", **extra: str
    ) -> None:
        port = free_port()
        # Routers never open chdb: it is single-process, and the meter has it.
        env = process_env(settings, PORT=str(port), CLICKHOUSE_URL="", **extra)
        super().__init__("serve", env, workdir, name)
        self.base_url = f"http://127.0.0.1:{port}"

    async def wait_ready(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as client:
            while True:
                if not self.alive():
                    raise RuntimeError(f"router exited during start-up:\n{self.log()}")
                try:
                    if (await client.get("/healthz")).status_code in (200, 503):
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)


class MeterProcess(ApifastProcess):
    """`apifast meter` on its own chdb path, or on `clickhouse_url` (a server) when given."""

    def __init__(
        self, settings: Settings, chdb_path: Path, workdir: Path, clickhouse_url: str = ""
    ) -> None:
        env = process_env(settings, CLICKHOUSE_URL=clickhouse_url or f"chdb://{chdb_path}")
        super().__init__("meter", env, workdir, "meter")
        self.chdb_path = chdb_path


class SharedClickHouse:
    """One ClickHouse that several meter processes share: the real chdb engine behind its HTTP
    interface, in a process of its own (tests/fakes/clickhouse_http.py), since there is no
    ClickHouse server here. `hold()` holds the inserts that arrive next (after their body is
    read) until `release()`, so a meter can be killed between its write and its ack."""

    def __init__(self, chdb_path: Path, workdir: Path) -> None:
        self.chdb_path, self.workdir = chdb_path, workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/?compress=false"
        self.process: subprocess.Popen[bytes] | None = None

    def _launch(self) -> subprocess.Popen[bytes]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "clickhouse-http.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "tests.fakes.clickhouse_http", str(self.chdb_path),
                 str(self.port)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip

    async def start(self) -> None:
        self.process = process = self._launch()
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                assert process.poll() is None, (self.workdir / "clickhouse-http.log").read_text()
                try:
                    if (await client.get(self.base + "/ping")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)

    async def _control(self, what: str) -> str:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.request("GET" if what == "held" else "POST", f"{self.base}/__{what}")
            r.raise_for_status()
            return r.text

    async def hold(self) -> None:
        await self._control("hold")

    async def release(self) -> None:
        await self._control("release")

    async def held(self) -> int:
        return int(await self._control("held"))

    def query(self, database: str, sql: str) -> list[tuple[Any, ...]]:
        import clickhouse_connect

        client = clickhouse_connect.get_client(dsn=self.url, database=database)
        try:
            return list(client.query(sql).result_rows)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def clickhouse_ids_in_subprocess(chdb_path: Path, database: str) -> list[str]:
    """Every generation id in `database`.usage_events of a chdb path, read by a separate
    process (a process may open only one chdb path)."""
    script = textwrap.dedent(
        f"""
        import json, clickhouse_connect
        c = clickhouse_connect.get_client(dsn={f"chdb://{chdb_path}"!r})
        rows = c.query("SELECT generation_id FROM {database}.usage_events").result_rows
        c.close()
        print(json.dumps([r[0] for r in rows]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=True, cwd=REPO, timeout=120
    )
    return list(json.loads(out.stdout.decode().strip().splitlines()[-1]))


# --- the exactly-once audit -------------------------------------------------------------------


async def stream_generation_ids(nats_url: str, stream: str) -> list[str]:
    """The generation id of every message in the stream (duplicates kept)."""
    nc = await nats.connect(nats_servers(nats_url), connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            return []
        ids = []
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    msg = await js.get_msg(stream, seq)
                except NotFoundError:
                    continue
                assert msg.data is not None
                ids.append(json.loads(msg.data)["generation_id"])
        return ids
    finally:
        await nc.close()


async def ledger_usage_ids(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT ref FROM ledger WHERE kind = 'usage'")
        return [r["ref"] for r in rows]
    finally:
        await conn.close()


@dataclass
class Audit:
    """Events lost and duplicated at each layer, against the requests that were served."""

    expected: int
    lost: dict[str, int] = field(default_factory=dict)
    duplicated: dict[str, int] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        counts = (*self.lost.values(), *self.duplicated.values(), *self.unexpected.values())
        return not any(counts)

    def __str__(self) -> str:
        return (
            f"expected={self.expected} lost={self.lost} duplicated={self.duplicated} "
            f"unexpected={self.unexpected}"
        )


def audit(expected: Iterable[str], layers: dict[str, Iterable[str]]) -> Audit:
    want = set(expected)
    result = Audit(expected=len(want))
    for name, ids in layers.items():
        counted = Counter(ids)
        result.lost[name] = len(want - counted.keys())
        result.duplicated[name] = sum(n - 1 for n in counted.values() if n > 1)
        result.unexpected[name] = len(counted.keys() - want)
    return result


async def key_row(database_url: str, key_id: int) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT balance_usd, reserved_usd, spent_usd, "
            "(SELECT count(*) FROM reservations r WHERE r.key_id = k.id) AS holds "
            "FROM api_keys k WHERE id = $1",
            key_id,
        )
        assert row is not None
        return dict(row)
    finally:
        await conn.close()


# --- a meter in the test process (it owns the session's chdb path) --------------------------------


class InProcessMeter:
    """The real `Meter` on this process's chdb path, for tests whose routers are
    subprocesses. `ids()` reads the ClickHouse rows it wrote."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool: asyncpg.Pool | None = None
        self.store: Any = None
        self.meter: Any = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> InProcessMeter:
        from apifast.db import create_pool
        from apifast.metering.clickhouse import ClickHouseStore
        from apifast.metering.consumer import Meter

        s = self.settings
        self.pool = await create_pool(s.database_url, min_size=1, max_size=4)
        self.store = ClickHouseStore(s.clickhouse_url, s.clickhouse_database)
        await self.store.start()
        self.meter = Meter.from_settings(s, self.pool, self.store)
        self._task = asyncio.create_task(self.meter.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.meter.stop()
        assert self._task is not None
        await self._task
        await self.store.close()
        assert self.pool is not None
        await self.pool.close()

    async def ids(self) -> list[str]:
        rows = await self.store.query("SELECT generation_id FROM usage_events", {})
        return [r["generation_id"] for r in rows]


async def wait_in_ledger(database_url: str, ids: Iterable[str], timeout: float = 120) -> None:
    """Wait until every id has its usage row in the ledger (the meter's last step)."""
    want = sorted(set(ids))
    conn = await asyncpg.connect(database_url)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            n = await conn.fetchval(
                "SELECT count(*) FROM ledger WHERE kind = 'usage' AND ref = ANY($1::text[])", want
            )
            if n == len(want):
                return
            if loop.time() > deadline:
                raise AssertionError(f"only {n} of {len(want)} events reached the ledger")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


# --- synthetic usage events, published straight to the stream ------------------------------------


def usage_events(
    key_hashes: list[bytes], count: int, seed: int = 7
) -> list[tuple[str, bytes, Decimal]]:
    """`count` well-formed usage events spread over the keys: (generation id, JSON, cost)."""
    import random
    import time

    from apifast.metering.event import UsageEvent
    from apifast.providers import Usage

    rng = random.Random(seed)
    out = []
    for i in range(count):
        cost = Decimal(rng.randint(1, 10**6)) / Decimal(10**9)
        event = UsageEvent(
            generation_id=f"gen-test-{seed}-{i:06d}",
            key_hash=key_hashes[i % len(key_hashes)],
            key_id=0,
            model="fast-chat",
            endpoint="chat",
            stream=bool(i % 2),
            reserved_usd=cost,
            usage=Usage(input_tokens=rng.randint(1, 500), output_tokens=rng.randint(1, 500)),
            cost_usd=cost,
            started_at=time.time(),
        )
        out.append((event.generation_id, event.to_bytes(), cost))
    return out


async def publish_events(settings: Settings, events: list[tuple[str, bytes, Decimal]]) -> None:
    from apifast.metering.stream import ensure_usage_stream

    nc = await nats.connect(nats_servers(settings.nats_url), connect_timeout=5)
    try:
        js = nc.jetstream(timeout=10)
        await ensure_usage_stream(
            js, settings.nats_stream, settings.nats_subject, settings.nats_replicas
        )
        for i in range(0, len(events), 200):
            await asyncio.gather(*(
                js.publish(settings.nats_subject, payload, headers={"Nats-Msg-Id": gid})
                for gid, payload, _ in events[i : i + 200]
            ))  # fmt: skip
    finally:
        await nc.close()


async def create_consumer(settings: Settings, ack_wait_s: float) -> None:
    """Create the meter's durable consumer up front, with a short ack wait, so a killed
    meter's unacked batch comes back in seconds rather than a minute."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from apifast.metering.stream import ensure_usage_stream

    nc = await nats.connect(nats_servers(settings.nats_url), connect_timeout=5)
    try:
        js = nc.jetstream()
        await ensure_usage_stream(
            js, settings.nats_stream, settings.nats_subject, settings.nats_replicas
        )
        await js.add_consumer(settings.nats_stream, ConsumerConfig(
            durable_name=settings.meter_durable, name=settings.meter_durable,
            filter_subject=settings.nats_subject, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=ack_wait_s,
            max_ack_pending=settings.meter_batch_size * 4,
        ))  # fmt: skip
    finally:
        await nc.close()


async def consumer_state(settings: Settings) -> dict[str, int]:
    """How far the meter's consumer got: acked up to, pending, unacked, redelivered."""
    nc = await nats.connect(nats_servers(settings.nats_url), connect_timeout=5)
    try:
        info = await nc.jetstream().consumer_info(settings.nats_stream, settings.meter_durable)
        return {
            "ack_floor": info.ack_floor.stream_seq if info.ack_floor else 0,
            "num_pending": info.num_pending or 0,
            "num_ack_pending": info.num_ack_pending or 0,
            "num_redelivered": info.num_redelivered or 0,
        }
    finally:
        await nc.close()


async def funded_key(settings: Settings, credit: Decimal) -> tuple[str, int]:
    """Migrate the test's database and make a key holding `credit`: (the key, its id)."""
    await migrate_database(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            key, key_id, _ = await insert_key(conn, SECRET.encode(), credit)
        return key, key_id
    finally:
        await conn.close()
