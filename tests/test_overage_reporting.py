"""Upstream overages are visible to the operator (issue 13): the Prometheus counters the
meter exports (`apifast_upstream_overages_total`, `apifast_upstream_overage_usd_total`, by
public model) and the "Upstream overages" count on the admin overview, both equal to what
`usage_overages` recorded, and counted once even when the meter sees an event again."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import generate_latest

from apifast.keys import key_prefix
from apifast.metering.consumer import Meter
from apifast.metering.event import UsageEvent
from apifast.metrics import Metrics
from apifast.money import format_usd
from apifast.providers import Usage
from tests.admin_support import AdminClient, set_admin_password
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import Stack, free_port, models_toml, running_stack

BODY = {"model": "fast-chat", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
async def ostack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> AsyncIterator[Stack]:
    settings = stack_settings_factory(
        models_toml(fake_openai.url), metrics_listen=f"127.0.0.1:{free_port()}"
    )
    async with running_stack(settings) as running:
        await set_admin_password(running)
        yield running


def _sample(text: str, name: str, model: str) -> float | None:
    found = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


async def _scrape(stack: Stack) -> str:
    async with httpx.AsyncClient(timeout=10) as m:
        return (await m.get(f"http://{stack.settings.metrics_listen}/metrics")).text


async def test_overages_are_counted_in_metrics_and_on_the_admin_overview(
    ostack: Stack, fake_openai: FakeOpenAI
) -> None:
    stack = ostack
    key = await stack.create_key("1.00")
    # A million tokens each way ($2.00 at this price) against holds of a few cents or less.
    fake_openai.usage_override = {
        "prompt_tokens": 1_000_000, "completion_tokens": 1_000_000, "total_tokens": 2_000_000,
    }  # fmt: skip
    ids = []
    async with stack.client(key) as c:
        for _ in range(2):
            r = await c.post("/v1/chat/completions", json=BODY)
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
    fake_openai.usage_override = None
    async with stack.client(key) as c:  # an honest one: no overage
        honest = await c.post("/v1/chat/completions", json=BODY)
    await stack.wait_metered([*ids, honest.json()["id"]])
    recorded = await stack.pool.fetch("SELECT generation_id, overage_usd FROM usage_overages")
    assert {r["generation_id"] for r in recorded} == set(ids)
    total = sum((r["overage_usd"] for r in recorded), Decimal(0))
    assert total > 0

    text = await _scrape(stack)
    assert _sample(text, "apifast_upstream_overages_total", "fast-chat") == 2.0
    assert _sample(text, "apifast_upstream_overage_usd_total", "fast-chat") == pytest.approx(
        float(total)
    )

    async with AdminClient(stack) as admin:
        await admin.login()
        page = await admin.get("/admin/", params={"range": "7d"})
    assert page.status_code == 200
    shown = re.search(r'id="stat-overages">([^<]*)<', page.text)
    assert shown is not None
    assert shown.group(1).strip() == f"2 (${format_usd(total)})"


async def test_an_overage_seen_again_is_not_counted_again(ostack: Stack) -> None:
    stack = ostack
    key = await stack.create_key("1.00")
    key_id, key_hash = await stack.pool.fetchrow(
        "SELECT id, key_hash FROM api_keys WHERE prefix = $1", key_prefix(key)
    )
    event = UsageEvent(
        generation_id="gen-overage-once", key_hash=bytes(key_hash), key_id=key_id,
        model="fast-chat", endpoint="chat", stream=False, reserved_usd=Decimal("0.01"),
        usage=Usage(input_tokens=1_000_000, output_tokens=0), cost_usd=Decimal("0.50"),
        started_at=time.time(),
    )  # fmt: skip
    metrics = Metrics()
    meter = Meter.from_settings(stack.settings, stack.pool, stack.state.clickhouse)
    meter.metrics = metrics
    for _ in range(2):  # delivered, then redelivered (its ack was lost)
        await meter.process([orjson.loads(event.to_bytes())])
    text = generate_latest(metrics.registry).decode()
    assert _sample(text, "apifast_upstream_overages_total", "fast-chat") == 1.0
    assert _sample(text, "apifast_upstream_overage_usd_total", "fast-chat") == 0.49
    assert meter.overages == 1
    balance = await stack.pool.fetchval("SELECT balance_usd FROM api_keys WHERE id = $1", key_id)
    assert balance == Decimal("0.99")  # the hold, once; the rest is the operator's
