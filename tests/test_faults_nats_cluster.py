"""A 3-node NATS cluster, for real: the usage stream has 3 replicas; under load one node is
SIGKILLed (the other two keep quorum: nothing changes for clients), then a second (no quorum:
the routers spool, and refuse paid requests with 503 once the spool is full), then both come
back. The exactly-once audit of stream, ledger and ClickHouse finds 0 lost and 0 doubled.

Routers are real `apifast serve` processes given all three node URLs; the meter runs in the
test process (it owns the session's chdb path)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from apifast.metering.stream import ensure_usage_stream, nats_servers
from apifast.settings import Settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fault_tools import (
    InProcessMeter,
    NatsCluster,
    RouterProcess,
    audit,
    funded_key,
    ledger_usage_ids,
    stream_generation_ids,
    wait_in_ledger,
)
from tests.harness import models_toml, stack_settings

SPOOL_MAX = 40  # small, so that the spool fills while there is no quorum


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "cluster")
    nodes.start_all()
    try:
        yield nodes
    finally:
        nodes.stop_all()


async def _new_key(settings: Settings) -> str:
    return (await funded_key(settings, Decimal("100.00")))[0]


async def _create_stream(settings: Settings) -> None:
    """Create the R3 stream once the cluster has a JetStream meta leader."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while True:
        try:
            nc = await nats.connect(nats_servers(settings.nats_url), connect_timeout=2)
            try:
                js = nc.jetstream(timeout=5)
                await ensure_usage_stream(js, settings.nats_stream, settings.nats_subject, 3)
                return
            finally:
                await nc.close()
        except Exception:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.5)


class Load:
    """Concurrent workers sending chat requests round-robin to the routers until stopped;
    keeps the generation ids served and the refusals (status, error code)."""

    def __init__(self, urls: list[str], key: str, workers: int = 8) -> None:
        self.urls, self.key, self.workers = urls, key, workers
        self.served: list[str] = []
        self.refused: list[tuple[int, str]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._progress = asyncio.Condition()

    async def _one(self, client: httpx.AsyncClient, i: int) -> None:
        body: dict[str, Any] = {
            "model": "fast-chat", "messages": [{"role": "user", "content": "hi"}],
            "stream": bool(i % 2),
        }  # fmt: skip
        r = await client.post(self.urls[i % len(self.urls)] + "/v1/chat/completions",
                              json=body, headers={"Authorization": f"Bearer {self.key}"})  # fmt: skip
        if r.status_code != 200:
            self.refused.append((r.status_code, r.json()["error"]["code"]))
            await asyncio.sleep(0.05)  # a refused client backs off a little
        elif body["stream"]:
            self.served.append(json.loads(r.text.split("\n")[0][6:])["id"])
        else:
            self.served.append(r.json()["id"])

    async def _worker(self, n: int, client: httpx.AsyncClient) -> None:
        i = n
        while not self._stop.is_set():
            await self._one(client, i)
            async with self._progress:
                self._progress.notify_all()
            i += self.workers

    async def __aenter__(self) -> Load:
        self._client = httpx.AsyncClient(timeout=60)
        self._tasks = [asyncio.create_task(self._worker(n, self._client))
                       for n in range(self.workers)]  # fmt: skip
        return self

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with self._progress:
            await asyncio.wait_for(self._progress.wait_for(predicate), timeout=180)

    async def until_served(self, count: int) -> None:
        await self.until(lambda: len(self.served) >= count)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._client.aclose()


def _spooled_lines(settings: Settings) -> int:
    return sum(p.read_bytes().count(b"\n")
               for p in (settings.data_dir / "spool").glob("spool-*.jsonl"))  # fmt: skip


async def _wait(predicate: Callable[[], Any], what: str, timeout: float = 180) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.1)


async def test_three_node_cluster_loses_two_nodes_and_nothing_is_lost_or_doubled(
    cluster: NatsCluster, database_factory: Callable[[str], str], clickhouse_url: str,
    clickhouse_database: str, fake_openai: FakeOpenAI, tmp_path: Path,
) -> None:  # fmt: skip
    models = tmp_path / "models.toml"
    models.write_text(models_toml(fake_openai.url))
    settings = stack_settings(
        database_url=database_factory("faults_cluster"), nats_url=cluster.url,
        clickhouse_url=clickhouse_url, clickhouse_database=clickhouse_database,
        data_dir=tmp_path / "data", models_file=models, nats_replicas=3,
        spool_max_events=SPOOL_MAX,
    )  # fmt: skip
    key = await _new_key(settings)
    await _create_stream(settings)
    await cluster.wait_stream_ready(settings.nats_stream, 3)
    routers = [RouterProcess(settings, tmp_path / f"r{n}", f"router{n}") for n in (1, 2)]
    for router in routers:
        router.start()
    try:
        await asyncio.gather(*(r.wait_ready() for r in routers))
        async with InProcessMeter(settings) as meter:
            async with Load([r.base_url for r in routers], key) as load:
                await load.until_served(50)
                # 1. One node down: two of three keep quorum; requests go on being served.
                cluster.kill(0)
                await load.until_served(len(load.served) + 150)
                # 2. A second node down: no quorum. Publishes fail, events spool, and once the
                # spool is full the routers refuse paid requests with 503.
                cluster.kill(1)
                await load.until(lambda: any(s == 503 for s, _ in load.refused))
                assert {code for _, code in load.refused} == {"metering_unavailable"}
                assert {s for s, _ in load.refused} == {503}
                # The first refusals may come while the events are still queued in memory,
                # waiting for their publish to time out; they reach the spool after that.

                async def spooled() -> bool:
                    return _spooled_lines(settings) > 0

                await _wait(spooled, "events in the spool")
                spooled_peak = _spooled_lines(settings)
                refused_while_down = len(load.refused)
                # 3. Both back: quorum again; the spool replays and service resumes.
                cluster.start(1)
                cluster.start(0)
                await cluster.wait_stream_ready(settings.nats_stream, 3)
                served = len(load.served)
                await load.until_served(served + 100)

            async def spool_empty() -> bool:
                return _spooled_lines(settings) == 0

            await _wait(spool_empty, "the spool to be replayed")
            for router in routers:
                assert await router.stop() == 0
            await wait_in_ledger(settings.database_url, load.served, timeout=180)
            report = audit(load.served, {
                "stream": await stream_generation_ids(settings.nats_url, settings.nats_stream),
                "ledger": await ledger_usage_ids(settings.database_url),
                "clickhouse": await meter.ids(),
            })  # fmt: skip
    finally:
        for router in routers:
            await router.stop()
    print(f"\nnats cluster: served={len(load.served)} spooled_peak={spooled_peak} "
          f"refused(503)={refused_while_down} audit: {report}")  # fmt: skip
    assert report.clean, str(report)
