"""`apifast serve` on SIGTERM: it stops accepting at once, lets the streams in flight finish
(up to APIFAST_DRAIN_TIMEOUT_S), flushes the usage publisher and exits 0. A stream that
outlives the drain timeout is cut, and billed for what it had delivered. Each event reaches
the stream once and is debited once.

The upstream's stream is held by the fake's gate (an event the test sets), not by sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

from apifast.settings import Settings
from tests.fakes.openai_upstream import REPLY, FakeOpenAI
from tests.fault_tools import (
    InProcessMeter,
    RouterProcess,
    funded_key,
    key_row,
    stream_generation_ids,
    wait_in_ledger,
)
from tests.harness import models_toml, stack_settings

CREDIT = Decimal("5.00")
BODY = {
    "model": "fast-chat", "stream": True, "stream_options": {"include_usage": True},
    "messages": [{"role": "user", "content": "tell me [[gated]]"}],
}  # fmt: skip


def _settings(database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
              clickhouse_database: str, fake: FakeOpenAI, tmp_path: Path) -> Settings:  # fmt: skip
    models = tmp_path / "models.toml"
    models.write_text(models_toml(fake.url))
    return stack_settings(
        database_url=database_factory("drain"), nats_url=nats_url,
        clickhouse_url=clickhouse_url, clickhouse_database=clickhouse_database,
        data_dir=tmp_path / "data", models_file=models,
        stream_checkpoint_s=0,  # the final event only: one message per request in the stream
    )  # fmt: skip


async def _new_key(settings: Settings) -> tuple[str, int]:
    return await funded_key(settings, CREDIT)


async def _debits(settings: Settings) -> list[Decimal]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT amount_usd FROM ledger WHERE kind = 'usage'")
        return [-r["amount_usd"] for r in rows]
    finally:
        await conn.close()


async def _words(lines: AsyncIterator[str], wanted: int, chunks: list[dict[str, Any]]) -> None:
    """Read chunks into `chunks` until `wanted` of them carried content."""
    async for line in lines:
        if line.startswith("data: {"):
            chunks.append(orjson.loads(line[6:]))
            if len(_content(chunks)) >= wanted:
                return


def _content(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["delta"]["content"] for c in chunks
            if c["choices"] and c["choices"][0]["delta"].get("content")]  # fmt: skip


async def _until_refused(port: int) -> None:
    """Wait until the router's listener is closed: a new connection is refused."""
    for _ in range(400):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        await asyncio.sleep(0.05)
    raise AssertionError("the router still accepts connections after SIGTERM")


async def _exit_code(router: RouterProcess) -> int:
    assert router.process is not None
    return await asyncio.wait_for(asyncio.to_thread(router.process.wait), timeout=120)


async def test_sigterm_lets_the_stream_finish_refuses_new_connections_and_bills_it_once(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
    clickhouse_database: str, fake_openai: FakeOpenAI, tmp_path: Path,
) -> None:  # fmt: skip
    settings = _settings(database_factory, nats_url, clickhouse_url, clickhouse_database,
                         fake_openai, tmp_path)  # fmt: skip
    key, key_id = await _new_key(settings)
    router = RouterProcess(settings, tmp_path / "router", DRAIN_TIMEOUT_S="120")
    router.start()
    port = int(router.base_url.rsplit(":", 1)[1])
    try:
        await router.wait_ready()
        headers = {"Authorization": f"Bearer {key}"}
        chunks: list[dict[str, Any]] = []
        async with (
            httpx.AsyncClient(base_url=router.base_url, timeout=60) as client,
            client.stream("POST", "/v1/chat/completions", json=BODY, headers=headers) as r,
        ):
            assert r.status_code == 200
            lines = r.aiter_lines()
            await _words(lines, fake_openai.gate_after, chunks)  # the stream is in flight
            router.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            await _until_refused(port)
            assert router.alive()  # still serving the stream
            fake_openai.gate.set()
            rest = [line async for line in lines]
        assert "data: [DONE]" in rest
        chunks += [orjson.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert "".join(_content(chunks)) == REPLY  # every word arrived
        assert await _exit_code(router) == 0
        log = router.log()
        assert "graceful shutdown exceeded" not in log, log  # nothing was cut
        generation_id, cost = chunks[-1]["id"], Decimal(str(chunks[-1]["usage"]["cost"]))
        # The publisher flushed the final event before the exit: once in the stream.
        assert await stream_generation_ids(nats_url, settings.nats_stream) == [generation_id]
        async with InProcessMeter(settings):
            await wait_in_ledger(settings.database_url, [generation_id], timeout=60)
        assert await _debits(settings) == [cost]
        row = await key_row(settings.database_url, key_id)
        assert row["balance_usd"] == CREDIT - cost and row["reserved_usd"] == 0
        assert row["holds"] == 0
    finally:
        fake_openai.gate.set()
        await router.kill()


async def test_a_stream_that_outlives_the_drain_timeout_is_cut_and_billed_for_what_it_sent(
    database_factory: Callable[[str], str], nats_url: str, clickhouse_url: str,
    clickhouse_database: str, fake_openai: FakeOpenAI, tmp_path: Path,
) -> None:  # fmt: skip
    settings = _settings(database_factory, nats_url, clickhouse_url, clickhouse_database,
                         fake_openai, tmp_path)  # fmt: skip
    key, key_id = await _new_key(settings)
    router = RouterProcess(settings, tmp_path / "router", DRAIN_TIMEOUT_S="1")
    router.start()
    try:
        await router.wait_ready()
        headers = {"Authorization": f"Bearer {key}"}
        chunks: list[dict[str, Any]] = []
        cut = False
        async with (
            httpx.AsyncClient(base_url=router.base_url, timeout=60) as client,
            client.stream("POST", "/v1/chat/completions", json=BODY, headers=headers) as r,
        ):
            assert r.status_code == 200
            lines = r.aiter_lines()
            await _words(lines, fake_openai.gate_after, chunks)
            router.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            # The gate stays shut: the upstream never finishes, the drain timeout cuts it.
            try:
                rest = [line async for line in lines]
            except httpx.RemoteProtocolError:
                cut, rest = True, []
        assert cut or "data: [DONE]" not in rest  # the client saw the stream end unfinished
        assert await _exit_code(router) == 0
        assert "graceful shutdown exceeded" in router.log()  # uvicorn cut it
        delivered = _content(chunks)
        assert len(delivered) == fake_openai.gate_after
        generation_id = chunks[0]["id"]
        assert await stream_generation_ids(nats_url, settings.nats_stream) == [generation_id]
        async with InProcessMeter(settings) as meter:
            await wait_in_ledger(settings.database_url, [generation_id], timeout=60)
            rows = await meter.store.query(
                "SELECT outcome, output_tokens, usage_estimated, cost_usd FROM usage_events "
                "WHERE generation_id = {gid:String}",
                {"gid": generation_id},
            )
        debits = await _debits(settings)
        assert len(debits) == 1 and debits[0] > 0
        assert len(rows) == 1 and rows[0]["outcome"] == "client_disconnect"
        assert rows[0]["usage_estimated"]  # the upstream had not reported usage yet
        assert rows[0]["output_tokens"] >= len(delivered)  # at least what the client received
        assert Decimal(str(rows[0]["cost_usd"])) == debits[0]
        row = await key_row(settings.database_url, key_id)
        assert row["balance_usd"] == CREDIT - debits[0] and row["reserved_usd"] == 0
        assert row["holds"] == 0
    finally:
        fake_openai.gate.set()
        await router.kill()
