"""Balance leases (router/leases.py) on real Postgres, NATS and ClickHouse: a busy key's
requests are held from the router's lease in memory, billed exactly, and the lease goes back
when idle; a disabled or hand-debited key stops being served from it at once; two router
processes share a key, one is SIGKILLed under load, and no money is spent twice."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from apifast.admin.balance_adjust import adjust_balance
from apifast.db import Queries
from apifast.key_admin import insert_key
from apifast.keys import hash_key
from apifast.server.migrations import migrate_database
from apifast.settings import Settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fault_tools import InProcessMeter, RouterProcess
from tests.harness import SECRET, Stack, models_toml, running_stack, stack_settings

BODY = {"model": "fast-chat", "max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]}
LEASES = "SELECT generation_id, amount_usd FROM reservations WHERE generation_id LIKE 'lease:%'"


@pytest.fixture
async def lstack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> AsyncIterator[Stack]:
    settings = stack_settings_factory(
        models_toml(fake_openai.url), lease_idle_s=0.5, lease_min_rps=8
    )
    async with running_stack(settings) as running:
        yield running


async def _row(pool: asyncpg.Pool, key: str) -> Any:
    return await pool.fetchrow(
        "SELECT id, balance_usd, reserved_usd FROM api_keys WHERE key_hash = $1",
        hash_key(SECRET.encode(), key),
    )


async def _until_leased(stack: Stack, c: httpx.AsyncClient) -> list[str]:
    """Requests until the key is busy enough to get a lease; their generation ids."""
    ids = []
    for _ in range(200):
        r = await c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
        if await stack.pool.fetch(LEASES):
            return ids
    raise AssertionError("no lease was taken")


async def test_a_busy_key_is_held_from_its_lease_and_billed_exactly(lstack: Stack) -> None:
    key = await lstack.create_key("20.00")
    async with lstack.client(key) as c:
        ids = await _until_leased(lstack, c)
        [(lease_id, leased)] = await lstack.pool.fetch(LEASES)
        assert Decimal(0) < leased <= Decimal("20.00") / 4  # at most lease_share of it
        slow = {**BODY, "stream": True,
                "messages": [{"role": "user", "content": "hi [[slow:0.1]]"}]}  # fmt: skip
        async with (
            c.stream("POST", "/v1/chat/completions", json=slow) as s1,
            c.stream("POST", "/v1/chat/completions", json=slow) as s2,
        ):
            assert s1.status_code == s2.status_code == 200
            # Two requests in flight, no hold of their own: the lease's row holds them.
            rows = await lstack.pool.fetch("SELECT generation_id FROM reservations")
            assert [r["generation_id"] for r in rows] == [lease_id]
            for s in (s1, s2):
                async for _ in s.aiter_bytes():
                    pass
        more = await asyncio.gather(*(c.post("/v1/chat/completions", json=BODY) for _ in range(30)))
    assert {r.status_code for r in more} == {200}
    ids += [r.json()["id"] for r in more]
    await lstack.wait_metered(ids)
    debits = await lstack.pool.fetch(
        "SELECT ref, amount_usd FROM ledger WHERE kind = 'usage' AND ref <> ALL($1::text[])", ids
    )
    charged = -sum(
        r["amount_usd"]
        for r in await lstack.pool.fetch("SELECT amount_usd FROM ledger WHERE kind = 'usage'")
    )
    costs = sum(Decimal(str(r.json()["usage"]["cost"])) for r in more)
    assert charged >= costs > 0
    row = await _row(lstack.pool, key)
    assert row["balance_usd"] == Decimal("20.00") - charged  # exactly what was debited
    assert len(debits) == 2  # the two streams, nothing else
    # Idle: the lease goes back, and once the meter has debited its requests, its row too.
    held = lambda: _held(lstack.pool, key)  # noqa: E731
    await lstack.wait_until(held, (Decimal(0), 0))


async def _held(pool: asyncpg.Pool, key: str) -> tuple[Decimal, int]:
    row = await _row(pool, key)
    rows = await pool.fetchval("SELECT count(*) FROM reservations WHERE key_id = $1", row["id"])
    return row["reserved_usd"], rows


async def test_a_disabled_key_is_refused_at_once_despite_its_lease(lstack: Stack) -> None:
    key = await lstack.create_key("20.00")
    async with lstack.client(key) as c:
        await _until_leased(lstack, c)
        row = await _row(lstack.pool, key)
        await lstack.pool.execute(
            Queries("apifast.admin").admin_key_set_disabled, row["id"], True
        )  # fmt: skip
        # NOTIFY retires the lease; the next request goes to Postgres, which refuses it.
        leases = lstack.state.leases
        await lstack.wait_until(lambda: _no_live_lease(leases), True, timeout=5)
        r = await c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "key_disabled"
    await lstack.wait_until(lambda: _held(lstack.pool, key), (Decimal(0), 0))


async def _no_live_lease(leases: Any) -> bool:
    return not leases._live


async def test_a_debit_by_hand_takes_the_lease_back_and_the_rest_is_spent_exactly(
    lstack: Stack,
) -> None:
    key = await lstack.create_key("20.00")
    async with lstack.client(key) as c:
        ids = await _until_leased(lstack, c)
        await lstack.wait_metered(ids)
        row = await _row(lstack.pool, key)
        # An operator takes back all but a few requests' worth, less than the lease holds:
        # the debit is refused and the lease asked back (it must not be served from any
        # longer); tried again once it is back, the debit goes through.
        leased = row["reserved_usd"]  # nothing is in flight: all of it is the lease
        assert leased > 0
        left = min(Decimal("0.002"), leased / 2)
        debit = left - row["balance_usd"]
        refused = await adjust_balance(lstack.pool, row["id"], "admin_debit", "t-1", debit, "t")
        assert refused is not None and not refused.done and refused.leased > 0
        assert refused.balance == row["balance_usd"]  # untouched
        await lstack.wait_until(lambda: _no_live_lease(lstack.state.leases), True, timeout=5)
        await lstack.wait_until(lambda: _held(lstack.pool, key), (Decimal(0), 0))
        done = await adjust_balance(lstack.pool, row["id"], "admin_debit", "t-2", debit, "t")
        assert done is not None and done.done and done.balance == left
        served: list[httpx.Response] = []
        for _ in range(400):
            r = await c.post("/v1/chat/completions", json=BODY)
            if r.status_code == 402:
                break
            assert r.status_code == 200, r.text
            served.append(r)
        else:
            raise AssertionError("the balance never ran out")
    assert served  # the few requests the rest paid for
    await lstack.wait_metered([r.json()["id"] for r in served])
    row = await _row(lstack.pool, key)
    spent = sum(Decimal(str(r.json()["usage"]["cost"])) for r in served)
    assert row["balance_usd"] == left - spent >= 0
    await lstack.wait_until(lambda: _held(lstack.pool, key), (Decimal(0), 0))


# --- two router processes ---------------------------------------------------------------


def _two_router_settings(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
    clickhouse_database: str, fake: FakeOpenAI, tmp_path: Path,
) -> Settings:  # fmt: skip
    models = tmp_path / "models.toml"
    models.write_text(models_toml(fake.url))
    return stack_settings(
        database_url=database_factory("leases"), nats_url=nats_url,
        clickhouse_url=clickhouse_url, clickhouse_database=clickhouse_database,
        data_dir=tmp_path / "data", models_file=models,
        reservation_sweep_s=0.2, lease_ttl_s=3,
    )  # fmt: skip


async def _load(base_url: str, key: str, served: list[dict[str, Any]]) -> None:
    """One client: requests until the money is gone (402) or the router is (killed)."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as c:
        while True:
            try:
                r = await c.post("/v1/chat/completions", json=BODY)
            except httpx.TransportError:
                return
            if r.status_code == 402:
                return
            if r.status_code == 429:  # held by the other router's lease or requests
                await asyncio.sleep(0.1)
                continue
            assert r.status_code == 200, r.text
            served.append(r.json())


async def test_two_routers_share_a_key_and_one_is_killed_without_overspending(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
    clickhouse_database: str, fake_openai: FakeOpenAI, tmp_path: Path,
) -> None:  # fmt: skip
    settings = _two_router_settings(database_factory, nats_url, clickhouse_url,
                                    clickhouse_database, fake_openai, tmp_path)  # fmt: skip
    await migrate_database(settings.database_url)
    extra = {"LEASE_TTL_S": "3", "LEASE_IDLE_S": "0.5", "HOLD_WAIT_S": "0.5", "LEASE_MIN_RPS": "8"}
    a = RouterProcess(settings, tmp_path / "a", name="a", **extra)
    b = RouterProcess(settings, tmp_path / "b", name="b", **extra)
    a.start()
    b.start()
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        await a.wait_ready()
        await b.wait_ready()
        async with InProcessMeter(settings):
            async with pool.acquire() as conn, conn.transaction():
                probe, _, _ = await insert_key(conn, SECRET.encode(), Decimal("1.00"))
            async with httpx.AsyncClient(base_url=b.base_url, timeout=30) as c:
                r = await c.post("/v1/chat/completions", json=BODY,
                                 headers={"Authorization": f"Bearer {probe}"})  # fmt: skip
            cost = Decimal(str(r.json()["usage"]["cost"]))
            credit = cost * 2000
            async with pool.acquire() as conn, conn.transaction():
                key, key_id, _ = await insert_key(conn, SECRET.encode(), credit)
            by_a: list[dict[str, Any]] = []
            by_b: list[dict[str, Any]] = []
            clients = [asyncio.create_task(_load(a.base_url, key, by_a)) for _ in range(4)]
            clients += [asyncio.create_task(_load(b.base_url, key, by_b)) for _ in range(4)]
            while len(by_a) < 60 or not await pool.fetchval(
                "SELECT count(*) FROM reservations WHERE generation_id LIKE 'lease:%'"
            ):
                assert len(by_a) + len(by_b) < 1500, "no lease was taken"
                await asyncio.sleep(0.01)
            assert await a.signal(signal.SIGKILL) == -signal.SIGKILL
            await asyncio.gather(*clients)
            assert by_b  # the living router served until the money was gone
            # A's lease is released at its TTL; every event that reached NATS is debited.
            leased = "SELECT count(*) FROM reservations WHERE key_id = $1"
            for _ in range(600):
                if not await pool.fetchval(leased, key_id):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("holds were never released")
            # The balance was served, not refused early: the settled balance cannot pay one
            # more request (402 without waiting: nothing is held any more).
            async with httpx.AsyncClient(base_url=b.base_url, timeout=30) as c:
                last = await c.post("/v1/chat/completions", json=BODY,
                                    headers={"Authorization": f"Bearer {key}"})  # fmt: skip
            assert last.status_code == 402, last.text
            await asyncio.sleep(0.5)  # the meter's last batch
            row = await pool.fetchrow(
                "SELECT balance_usd, reserved_usd FROM api_keys WHERE id = $1", key_id
            )
            debits = await pool.fetch(
                "SELECT ref, amount_usd FROM ledger WHERE kind = 'usage' AND key_id = $1",
                key_id,
            )
    finally:
        await pool.close()
        await a.kill()
        await b.stop()
    charged = -sum(d["amount_usd"] for d in debits)
    assert row["reserved_usd"] == 0
    assert row["balance_usd"] == credit - charged >= 0  # never below zero, never twice
    assert len({d["ref"] for d in debits}) == len(debits)
    refs = {d["ref"] for d in debits}
    # Everything the living router served is billed, at the cost it told its client.
    assert all(g["id"] in refs for g in by_b)
    billed = {d["ref"]: -d["amount_usd"] for d in debits}
    assert all(billed[g["id"]] == Decimal(str(g["usage"]["cost"])) for g in by_b)
    # The dead router's responses are billed at most once each, nothing else was billed.
    assert refs <= {g["id"] for g in by_a + by_b}


async def test_a_stream_served_from_a_lease_is_billed_its_checkpoint_when_its_router_dies(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
    clickhouse_database: str, fake_openai: FakeOpenAI, tmp_path: Path,
) -> None:  # fmt: skip
    settings = _two_router_settings(database_factory, nats_url, clickhouse_url,
                                    clickhouse_database, fake_openai, tmp_path)  # fmt: skip
    await migrate_database(settings.database_url)
    # Two holds within a tick open the lease, which a loaded machine still reaches.
    router = RouterProcess(settings, tmp_path / "r", name="r", LEASE_TTL_S="3",
                           STREAM_CHECKPOINT_S="0.2", LEASE_MIN_RPS="2")  # fmt: skip
    router.start()
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        await router.wait_ready()
        async with InProcessMeter(settings):
            async with pool.acquire() as conn, conn.transaction():
                key, key_id, _ = await insert_key(conn, SECRET.encode(), Decimal("20.00"))
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=router.base_url, headers=headers,
                                         timeout=30) as c:  # fmt: skip
                warm = []
                while not await pool.fetch(LEASES):
                    assert len(warm) < 200, "no lease was taken"
                    r = await c.post("/v1/chat/completions", json=BODY)
                    warm.append(r.json()["id"])
                slow = {**BODY, "stream": True,
                        "messages": [{"role": "user", "content": "hi [[slow:0.4]]"}]}  # fmt: skip
                async with c.stream("POST", "/v1/chat/completions", json=slow) as s:
                    lines = s.aiter_lines()
                    first = ""
                    async for line in lines:
                        if line.startswith("data: {"):
                            first = line
                            break
                    generation_id = orjson.loads(first[6:])["id"]
                    # Some words later (counted, not timed), then past a checkpoint.
                    words = 0
                    async for line in lines:
                        words += line.startswith("data: {")
                        if words == 2:
                            break
                    await asyncio.sleep(0.5)
                    assert await router.kill() == -signal.SIGKILL
            # No hold of its own: the lease's row holds it, and expires; then the meter
            # bills the stream's last checkpoint, once, out of the lease.
            for _ in range(2400):  # a generous bound for a loaded machine
                billed = await pool.fetchval(
                    "SELECT -amount_usd FROM ledger WHERE kind = 'usage' AND ref = $1",
                    generation_id,
                )
                if billed is not None and not await pool.fetchval(
                    "SELECT count(*) FROM reservations WHERE key_id = $1", key_id
                ):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the stream was never billed, or its lease never released")
            row = await pool.fetchrow(
                "SELECT balance_usd, reserved_usd FROM api_keys WHERE id = $1", key_id
            )
            charged = -await pool.fetchval(
                "SELECT sum(amount_usd) FROM ledger WHERE kind = 'usage' AND key_id = $1", key_id
            )
    finally:
        await pool.close()
        await router.kill()
    assert billed > 0
    assert row["reserved_usd"] == 0
    assert row["balance_usd"] == Decimal("20.00") - charged
