"""NATS outages: events spool locally (fsynced, file-locked, shared by the routers of one
data dir), are replayed when NATS returns, a full spool refuses paid requests with 503,
shutdown drains to the spool, and a crashed router's spool is replayed by a later router.
Each run ends with the exactly-once audit: nothing lost, nothing doubled.

These tests run their own nats-server on a private port; the shared one is never touched.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from apifast.settings import Settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fault_tools import (
    Audit,
    InProcessMeter,
    OwnNats,
    RouterProcess,
    audit,
    funded_key,
    ledger_usage_ids,
    stream_generation_ids,
    wait_in_ledger,
)
from tests.harness import models_toml, stack_settings

BODY: dict[str, Any] = {
    "model": "fast-chat",
    "messages": [{"role": "user", "content": "hello under load"}],
}


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[OwnNats]:
    server = OwnNats(tmp_path / "nats")
    await server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_settings(
    database_factory: Callable[[str], str],
    own_nats: OwnNats,
    clickhouse_url: str,
    clickhouse_database: str,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        models = tmp_path / "models.toml"
        models.write_text(models_toml(fake_openai.url))
        return stack_settings(
            database_url=database_factory("faults_nats"), nats_url=own_nats.url,
            clickhouse_url=clickhouse_url, clickhouse_database=clickhouse_database,
            data_dir=tmp_path / "data", models_file=models, **overrides,
        )  # fmt: skip

    return make


async def _new_key(settings: Settings, credit: str = "100.00") -> str:
    return (await funded_key(settings, Decimal(credit)))[0]


async def _chat(client: httpx.AsyncClient, url: str, key: str, i: int) -> tuple[int, Any]:
    body = dict(BODY)
    if i % 2:
        body = {**BODY, "stream": True}
    r = await client.post(url + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    if r.status_code != 200:
        return r.status_code, r
    if body.get("stream"):
        return 200, json.loads(r.text.split("\n")[0][6:])["id"]
    return 200, r.json()["id"]


class Load:
    """Concurrent workers sending requests round-robin to the routers until stopped."""

    def __init__(self, urls: list[str], key: str, workers: int = 8) -> None:
        self.urls, self.key, self.workers = urls, key, workers
        self.served: list[str] = []
        self.other: list[int] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._progress = asyncio.Condition()

    async def _worker(self, n: int, client: httpx.AsyncClient) -> None:
        i = n
        while not self._stop.is_set():
            status, result = await _chat(client, self.urls[i % len(self.urls)], self.key, i)
            if status == 200:
                self.served.append(result)
            else:
                self.other.append(status)
            async with self._progress:
                self._progress.notify_all()
            i += self.workers

    async def __aenter__(self) -> Load:
        self._client = httpx.AsyncClient(timeout=60)
        self._tasks = [
            asyncio.create_task(self._worker(n, self._client)) for n in range(self.workers)
        ]
        return self

    async def until_served(self, count: int) -> None:
        async with self._progress:
            await self._progress.wait_for(lambda: len(self.served) >= count)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._client.aclose()


async def _health(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as c:
        return (await c.get(url + "/healthz")).json()


async def _wait(predicate: Callable[[], Any], what: str, timeout: float = 120) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.1)


def _spool_files(settings: Settings) -> list[Path]:
    return sorted((settings.data_dir / "spool").glob("spool-*.jsonl"))


def _spooled_lines(settings: Settings) -> int:
    return sum(p.read_bytes().count(b"\n") for p in _spool_files(settings))


async def _audit(settings: Settings, meter: InProcessMeter, served: list[str]) -> Audit:
    await wait_in_ledger(settings.database_url, served)
    report = audit(served, {
        "stream": await stream_generation_ids(settings.nats_url, settings.nats_stream),
        "ledger": await ledger_usage_ids(settings.database_url),
        "clickhouse": await meter.ids(),
    })  # fmt: skip
    return report


async def test_nats_killed_and_restarted_under_load(
    fault_settings: Callable[..., Settings], own_nats: OwnNats, tmp_path: Path
) -> None:
    settings = fault_settings()
    key = await _new_key(settings)
    # Two routers sharing one data dir, so one spool directory.
    routers = [RouterProcess(settings, tmp_path / f"r{n}", f"router{n}") for n in (1, 2)]
    for router in routers:
        router.start()
    try:
        await asyncio.gather(*(r.wait_ready() for r in routers))
        async with InProcessMeter(settings) as meter:
            async with Load([r.base_url for r in routers], key) as load:
                await load.until_served(40)
                own_nats.kill()
                served_before = len(load.served)
                # Requests keep being served while NATS is down; their events spool.
                await load.until_served(served_before + 150)

                async def both_spooled() -> bool:
                    return all([(await _health(r.base_url))["nats"] == "down" for r in routers])

                await _wait(both_spooled, "the routers to notice NATS is down")
                await load.until_served(len(load.served) + 50)
                spooled_peak = _spooled_lines(settings)
                assert spooled_peak > 0
                await own_nats.start()
                await load.until_served(len(load.served) + 50)
            assert set(load.other) == set(), load.other

            async def spool_empty() -> bool:
                return not _spool_files(settings)

            await _wait(spool_empty, "the spool to be replayed")
            for router in routers:
                assert await router.stop() == 0
            report = await _audit(settings, meter, load.served)
    finally:
        for router in routers:
            await router.stop()
    print(f"\nnats outage: served={len(load.served)} spooled_peak={spooled_peak} audit: {report}")
    assert report.clean, str(report)


async def test_full_spool_refuses_paid_requests_with_503(
    fault_settings: Callable[..., Settings], own_nats: OwnNats, tmp_path: Path
) -> None:
    settings = fault_settings(spool_max_events=12)
    key = await _new_key(settings)
    router = RouterProcess(settings, tmp_path / "r")
    router.start()
    served: list[str] = []
    try:
        await router.wait_ready()
        async with InProcessMeter(settings) as meter, httpx.AsyncClient(timeout=60) as client:
            status, gen = await _chat(client, router.base_url, key, 0)
            assert status == 200
            served.append(gen)
            # Request 0 must be metered before NATS dies, or it may sit acknowledged in the
            # stream, neither spooled nor counted, and the spool arithmetic below breaks.
            await wait_in_ledger(settings.database_url, served)
            own_nats.kill()
            refused = None
            for i in range(1, 200):
                status, result = await _chat(client, router.base_url, key, i)
                if status == 200:
                    served.append(result)
                    continue
                refused = result
                break
            assert refused is not None, "the spool never filled"
            assert refused.status_code == 503
            assert refused.headers["retry-after"]
            error = refused.json()["error"]
            assert set(error) == {"message", "type", "code", "param"}
            assert error["code"] == "metering_unavailable"
            # Nothing was held for the refused request: every hold is a served request
            # whose event waits in the spool (or was metered before NATS went away).
            conn = await asyncpg.connect(settings.database_url)
            try:
                holds = await conn.fetchval("SELECT count(*) FROM reservations")
                metered = await conn.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'")
            finally:
                await conn.close()
            assert holds + metered == len(served)

            async def all_spooled() -> bool:
                return _spooled_lines(settings) + metered == len(served)

            await _wait(all_spooled, "the served requests' events to reach the spool")
            assert _spooled_lines(settings) >= settings.spool_max_events - 1

            await own_nats.start()

            async def accepting() -> bool:
                return not _spool_files(settings)

            await _wait(accepting, "the spool to drain")
            status, gen = await _chat(client, router.base_url, key, 1000)
            assert status == 200
            served.append(gen)
            report = await _audit(settings, meter, served)
    finally:
        await router.stop()
    print(f"\nfull spool: served={len(served)} audit: {report}")
    assert report.clean, str(report)


async def test_shutdown_drains_and_a_crashed_routers_spool_is_replayed(
    fault_settings: Callable[..., Settings], own_nats: OwnNats, tmp_path: Path
) -> None:
    settings = fault_settings()
    key = await _new_key(settings)
    own_nats.kill()  # NATS is down for the whole life of the first two routers
    served: list[str] = []
    crashed = RouterProcess(settings, tmp_path / "crashed", "crashed")
    stopped = RouterProcess(settings, tmp_path / "stopped", "stopped")
    for router in (crashed, stopped):
        router.start()
    await asyncio.gather(crashed.wait_ready(), stopped.wait_ready())
    async with httpx.AsyncClient(timeout=60) as client:
        results = await asyncio.gather(*(
            _chat(client, (crashed, stopped)[i % 2].base_url, key, i) for i in range(60)
        ))  # fmt: skip
    assert all(status == 200 for status, _ in results)
    served = [gen for _, gen in results]

    async def crashed_spooled() -> bool:
        return (await _health(crashed.base_url))["spooled_events"] >= 30

    await _wait(crashed_spooled, "the crashed router's events to reach its spool")
    await crashed.kill()  # SIGKILL: no shutdown at all; its spool file stays, unlocked
    assert await stopped.stop() == 0  # SIGTERM: drains what it holds to the spool
    assert _spooled_lines(settings) == len(served)

    await own_nats.start()
    later = RouterProcess(settings, tmp_path / "later", "later")
    later.start()
    try:
        await later.wait_ready()
        async with InProcessMeter(settings) as meter:

            async def replayed() -> bool:
                return not _spool_files(settings)

            await _wait(replayed, "the later router to replay both spools")
            report = await _audit(settings, meter, served)
    finally:
        await later.stop()
    print(f"\nshutdown + crash: served={len(served)} audit: {report}")
    assert report.clean, str(report)


async def test_holds_of_spooled_events_are_kept_alive(
    fault_settings: Callable[..., Settings], own_nats: OwnNats, tmp_path: Path
) -> None:
    """NATS down for longer than the reservation TTL: the holds of the requests whose events
    wait in the spool must not be released as abandoned (the key could then spend the money
    twice). The router keeps them alive until the events are published."""
    from apifast.db import create_pool
    from apifast.metering.ledger import release_expired

    settings = fault_settings(reservation_ttl_s=4)
    key = await _new_key(settings)
    router = RouterProcess(settings, tmp_path / "r")
    router.start()
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        await router.wait_ready()
        own_nats.kill()
        async with httpx.AsyncClient(timeout=60) as client:
            served = [(await _chat(client, router.base_url, key, 2 * i))[1] for i in range(5)]

        async def spooled() -> bool:
            return (await _health(router.base_url))["spooled_events"] == len(served)

        await _wait(spooled, "the events to be spooled")
        # Past the TTL, the meter's housekeeping would release expired holds.
        await asyncio.sleep(settings.reservation_ttl_s * 1.5)
        await release_expired(pool)
        assert await pool.fetchval("SELECT count(*) FROM reservations") == len(served)

        await own_nats.start()
        async with InProcessMeter(settings) as meter:
            report = await _audit(settings, meter, served)
        assert report.clean, str(report)
        assert await pool.fetchval("SELECT count(*) FROM reservations") == 0
        assert await pool.fetchval("SELECT sum(reserved_usd) FROM api_keys") == 0
    finally:
        await pool.close()
        await router.stop()
