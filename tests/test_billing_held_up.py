"""Serving what the balance pays for: holds settle to the exact cost as soon as a response
ends, a request refused only because of holds in flight waits for them (then gets 429 with
Retry-After, not 402), and 402 comes only when the settled balance cannot pay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest

from apifast.keys import hash_key
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import SECRET, Stack, models_toml, running_stack

BODY = {"model": "fast-chat", "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def hstack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> AsyncIterator[Stack]:
    settings = stack_settings_factory(models_toml(fake_openai.url), hold_wait_s=10)
    async with running_stack(settings) as running:
        yield running


async def _row(stack: Stack, key: str) -> Any:
    return await stack.pool.fetchrow(
        "SELECT id, balance_usd, reserved_usd FROM api_keys WHERE key_hash = $1",
        hash_key(SECRET.encode(), key),
    )


async def _exact_cost(stack: Stack) -> Decimal:
    probe = await stack.create_key("1.00")
    async with stack.client(probe) as c:
        r = await c.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 200
    return Decimal(str(r.json()["usage"]["cost"]))


async def test_eighty_requests_for_a_balance_that_pays_for_ten(hstack: Stack) -> None:
    cost = await _exact_cost(hstack)
    # Each hold's upper bound (400 output tokens) is far above the cost, and above the
    # whole balance: without settling, one request in flight would block all the others.
    key = await hstack.create_key(str(cost * 10))
    async with hstack.client(key) as c:
        answers = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=BODY) for _ in range(80))
        )
    statuses = [r.status_code for r in answers]
    served = [r for r in answers if r.status_code == 200]
    assert len(served) >= 9, statuses
    assert set(statuses) <= {200, 402}, statuses  # nothing left held up at the end
    refused = [r for r in answers if r.status_code == 402]
    assert all(r.json()["error"]["code"] == "insufficient_balance" for r in refused)
    ids = [r.json()["id"] for r in served]
    await hstack.wait_metered(ids)
    row = await _row(hstack, key)
    charged = sum(Decimal(str(r.json()["usage"]["cost"])) for r in served)
    assert row["balance_usd"] == cost * 10 - charged >= 0  # never below zero
    assert row["reserved_usd"] == 0
    assert await hstack.pool.fetchval(
        "SELECT count(*) FROM reservations WHERE key_id = $1", row["id"]
    ) == 0  # fmt: skip


async def test_hold_settles_to_the_exact_cost_when_the_response_ends(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> None:
    # Without the meter, only the router's settle can shrink the hold.
    settings = stack_settings_factory(models_toml(fake_openai.url))
    async with running_stack(settings, run_meter=False) as stack:
        cost = await _exact_cost(stack)
        # A hold that takes most of the balance is settled early; a small one waits for the
        # meter (see SETTLE_EARLY_SHARE).
        key = await stack.create_key(str(cost * 3))
        async with stack.client(key) as c:
            r = await c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200
        assert Decimal(str(r.json()["usage"]["cost"])) == cost
        held = lambda: stack.pool.fetchval(  # noqa: E731
            "SELECT amount_usd FROM reservations WHERE generation_id = $1", r.json()["id"]
        )
        await stack.wait_until(held, cost)
        assert (await _row(stack, key))["reserved_usd"] == cost
        assert (await _row(stack, key))["balance_usd"] == cost * 3  # the meter debits


async def test_held_up_balance_waits_then_429_then_served(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> None:
    settings = stack_settings_factory(models_toml(fake_openai.url), hold_wait_s=0.3)
    async with running_stack(settings) as stack:
        cost = await _exact_cost(stack)
        key = await stack.create_key(str(cost * 3))
        slow = {**BODY, "stream": True,
                "messages": [{"role": "user", "content": "hi [[slow:0.3]]"}]}  # fmt: skip
        async with (
            stack.client(key) as c,
            c.stream("POST", "/v1/chat/completions", json=slow) as first,
        ):
            # The first request's hold (its whole bound) holds the entire balance.
            assert first.status_code == 200
            second = await c.post("/v1/chat/completions", json=BODY)
            assert second.status_code == 429, second.text
            assert second.json()["error"]["code"] == "balance_in_flight"
            assert int(second.headers["Retry-After"]) >= 1
            async for _ in first.aiter_bytes():
                pass
        async with stack.client(key) as c:
            third = await c.post("/v1/chat/completions", json=BODY)
        assert third.status_code == 200  # the first one settled: the balance pays again
        poor = await stack.create_key("0.00")
        async with stack.client(poor) as c:
            gone = await c.post("/v1/chat/completions", json=BODY)
        assert gone.status_code == 402  # no money at all: no wait, 402 at once
        assert gone.json()["error"]["code"] == "insufficient_balance"
