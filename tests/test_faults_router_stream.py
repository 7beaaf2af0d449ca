"""A router SIGKILLed mid-stream: the stream had checkpointed what it delivered through the
event path, so once its hold expires the meter bills the last checkpoint (once), instead of
nothing. A stream that ends normally is billed its final event, never its checkpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

from apifast.settings import Settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fault_tools import InProcessMeter, RouterProcess, funded_key, wait_in_ledger
from tests.harness import models_toml, stack_settings

CREDIT = Decimal("5.00")


def _settings(database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
              clickhouse_database: str, fake: FakeOpenAI, tmp_path: Path) -> Settings:  # fmt: skip
    models = tmp_path / "models.toml"
    models.write_text(models_toml(fake.url))
    return stack_settings(
        database_url=database_factory("router_stream"), nats_url=nats_url,
        clickhouse_url=clickhouse_url, clickhouse_database=clickhouse_database,
        data_dir=tmp_path / "data", models_file=models,
        reservation_ttl_s=3, reservation_sweep_s=0.2, stream_checkpoint_s=0.2,
    )  # fmt: skip


async def _new_key(settings: Settings) -> tuple[str, int]:
    return await funded_key(settings, CREDIT)


async def _fetch(settings: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _read_chunks(lines: AsyncIterator[str], wanted: int) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = []
    async for line in lines:
        if line.startswith("data: {"):
            chunk = orjson.loads(line[6:])
            chunks.append(chunk)
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if content and sum(1 for c in chunks if c["choices"] and
                               c["choices"][0]["delta"].get("content")) >= wanted:  # fmt: skip
                return chunks
    return chunks


async def test_router_killed_mid_stream_bills_its_last_checkpoint(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
    clickhouse_database: str, fake_openai: FakeOpenAI, tmp_path: Path,
) -> None:  # fmt: skip
    settings = _settings(database_factory, nats_url, clickhouse_url, clickhouse_database,
                         fake_openai, tmp_path)  # fmt: skip
    key, key_id = await _new_key(settings)
    router = RouterProcess(settings, tmp_path / "router")
    router.start()
    try:
        await router.wait_ready()
        async with InProcessMeter(settings) as meter:
            body = {
                "model": "fast-chat", "stream": True,
                # Half a second before each word: the stream outlives several checkpoints.
                "messages": [{"role": "user", "content": "tell me [[slow:0.5]]"}],
            }  # fmt: skip
            headers = {"Authorization": f"Bearer {key}"}
            async with (
                httpx.AsyncClient(base_url=router.base_url, timeout=30) as client,
                client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r,
            ):
                assert r.status_code == 200
                # Held here: a dropped line iterator would be closed, and with it the
                # connection (a client disconnect, billed by the living router).
                lines = r.aiter_lines()
                chunks = await _read_chunks(lines, wanted=3)
                generation_id = chunks[0]["id"]
                await asyncio.sleep(0.5)  # a checkpoint after the third word
                await router.kill()
                assert not await _fetch(settings, "SELECT 1 FROM ledger WHERE kind = 'usage'")
                checkpoints = await _fetch(settings, "SELECT checkpoint FROM stream_checkpoints")
                assert len(checkpoints) == 1 and checkpoints[0]["checkpoint"] >= 2
            # The hold expires (nobody keeps it alive), and the meter bills the checkpoint.
            await wait_in_ledger(settings.database_url, [generation_id], timeout=60)
            debits = await _fetch(
                settings,
                "SELECT amount_usd FROM ledger WHERE kind = 'usage' AND ref = $1",
                generation_id,
            )
            assert len(debits) == 1
            billed = -debits[0]["amount_usd"]
            assert billed > 0
            rows = await meter.store.query(
                "SELECT outcome, output_tokens, cost_usd FROM usage_events "
                "WHERE generation_id = {gid:String}",
                {"gid": generation_id},
            )
            assert len(rows) == 1 and rows[0]["outcome"] == "router_lost"
            assert rows[0]["output_tokens"] >= 3  # at least the words the client had seen
            assert Decimal(str(rows[0]["cost_usd"])) == billed
            key_row = (await _fetch(settings, "SELECT * FROM api_keys WHERE id = $1", key_id))[0]
            assert key_row["balance_usd"] == CREDIT - billed
            assert key_row["reserved_usd"] == 0
            assert not await _fetch(settings, "SELECT 1 FROM reservations")
            assert not await _fetch(settings, "SELECT 1 FROM stream_checkpoints")
    finally:
        await router.kill()


async def test_a_stream_that_ends_is_billed_once_by_its_final_event(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
    clickhouse_database: str, fake_openai: FakeOpenAI, tmp_path: Path,
) -> None:  # fmt: skip
    settings = _settings(database_factory, nats_url, clickhouse_url, clickhouse_database,
                         fake_openai, tmp_path)  # fmt: skip
    key, _ = await _new_key(settings)
    router = RouterProcess(settings, tmp_path / "router")
    router.start()
    try:
        await router.wait_ready()
        async with InProcessMeter(settings):
            body = {
                "model": "fast-chat", "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "tell me [[slow:0.3]]"}],
            }  # fmt: skip
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=router.base_url, timeout=30) as client:
                r = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200
            chunks = [orjson.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
            generation_id, cost = chunks[-1]["id"], Decimal(str(chunks[-1]["usage"]["cost"]))
            await wait_in_ledger(settings.database_url, [generation_id], timeout=60)
            debits = await _fetch(settings, "SELECT amount_usd FROM ledger WHERE kind = 'usage'")
            assert [-d["amount_usd"] for d in debits] == [cost]  # the final event's cost
            # Its checkpoints were published (one per 0.2 s of a ~2 s stream) and are gone.
            assert not await _fetch(settings, "SELECT 1 FROM stream_checkpoints")
    finally:
        await router.kill()
