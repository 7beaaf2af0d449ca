"""The smaller holes of issue 13: X-Forwarded-For believed from any local process, recovery
answering 503 without SMTP, no timeout on reading a body, and webhook amounts with more
digits than a double holds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from apifast.orders.recover_api import ACCEPTED
from tests.fakes.nowpayments import sign_ipn
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fault_tools import RouterProcess
from tests.harness import Stack, models_toml, running_stack, stack_settings
from tests.payments_harness import PayEnv, payments_env_fixture

env = payments_env_fixture("small_holes")


async def _recover_statuses(base_url: str, forwarded_for: list[str]) -> list[int]:
    statuses = []
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        for ip in forwarded_for:
            r = await client.post(
                "/v1/recover", json={"email": "someone@example.com"},
                headers={"X-Forwarded-For": ip},
            )  # fmt: skip
            statuses.append(r.status_code)
    return statuses


@pytest.mark.parametrize("trusted", [False, True])
async def test_forwarded_for_is_believed_only_from_a_configured_proxy(
    database_factory: Callable[[str], str], nats_url: str, fake_openai: FakeOpenAI,
    tmp_path: Path, trusted: bool,
) -> None:  # fmt: skip
    models = tmp_path / "models.toml"
    models.write_text(models_toml(fake_openai.url))
    settings = stack_settings(
        database_url=database_factory("xff"), nats_url=nats_url, clickhouse_url="",
        data_dir=tmp_path / "data", models_file=models,
    )  # fmt: skip
    from apifast.server.migrations import migrate_database

    await migrate_database(settings.database_url)
    extra = {"RECOVER_RATE_LIMIT": "2"}
    if trusted:
        extra["FORWARDED_ALLOW_IPS"] = "127.0.0.1"  # as behind the nginx of deploy/
    router = RouterProcess(settings, tmp_path / "router", **extra)
    router.start()
    try:
        await router.wait_ready()
        statuses = await _recover_statuses(
            router.base_url, ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
        )
    finally:
        await router.kill()
    if trusted:
        assert statuses == [202, 202, 202]  # three clients, as the proxy says
    else:
        # The default trusts no proxy: a local process cannot pick its own address.
        assert statuses == [202, 202, 429]


async def test_recover_without_smtp_answers_as_usual(stack: Stack) -> None:
    assert not stack.settings.smtp_url
    async with stack.client() as c:
        r = await c.post("/v1/recover", json={"email": "nobody@example.com"})
    assert r.status_code == 202, r.text
    assert r.json() == ACCEPTED


@pytest.fixture
async def slow_body_stack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> Any:
    settings = stack_settings_factory(models_toml(fake_openai.url), body_read_timeout_s=0.5)
    async with running_stack(settings) as running:
        yield running


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
async def test_a_body_that_stalls_gets_408(slow_body_stack: Stack, path: str) -> None:
    stack = slow_body_stack
    key = await stack.create_key("1.00")
    port = stack.settings.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            'Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{"model": '.encode()
        )
        await writer.drain()  # then nothing more: the body stalls
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=20)
        assert head.startswith(b"HTTP/1.1 408"), head
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        error = orjson.loads(await reader.readexactly(length))["error"]
        assert error["code"] == "body_timeout" and set(error) == {
            "message",
            "type",
            "code",
            "param",
        }
    finally:
        writer.close()
    assert await stack.pool.fetchval("SELECT count(*) FROM reservations") == 0


async def test_webhook_amount_beyond_a_double_is_refused(env: PayEnv) -> None:
    order = await env.new_order("10.00")
    key, order_id = order["api_key"], order["order_id"]
    pid = env.np_payment_id(order_id)
    finished = env.np.pay(pid)
    paid = finished["actually_paid"]
    # The same value to 30 digits: a JS engine parses it to the same double, so the
    # processor's signature of the rounded body matches it too.
    long = f"{Decimal(paid):.30f}1"
    text = json.dumps({k: (f"@{k}@" if k == "actually_paid" else v) for k, v in finished.items()},
                      default=str)  # fmt: skip
    raw = text.replace('"@actually_paid@"', long).encode()
    signature = sign_ipn(env.np.ipn_secret, finished)
    assert await env.np.deliver(finished, raw=raw, signature=signature) == 400
    assert await env.balance(key) == 0
    # The body as the processor really sent it is credited.
    assert await env.np.deliver(finished) == 200
    assert await env.balance(key) == Decimal("10.00")
