"""A parent's rpm and tpm limits (its own, else the defaults) are the total of the key and all
its sub-keys: its children count in its window, on the router and in Postgres (migration
0024), so making sub-keys never multiplies a key's limit. A child's own rpm_limit stays a
further cap on its share."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest

from apifast.keys import hash_key
from apifast.router.limits import KeyRateLimiter
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import SECRET, Stack, models_toml, running_stack

BODY = {"model": "fast-chat", "max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def sstack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> AsyncIterator[Stack]:
    settings = stack_settings_factory(models_toml(fake_openai.url))
    async with running_stack(settings) as running:
        yield running


@pytest.fixture
async def default_stack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> AsyncIterator[Stack]:
    settings = stack_settings_factory(models_toml(fake_openai.url), default_rpm_limit=2)
    async with running_stack(settings) as running:
        yield running


async def _limit(stack: Stack, key: str, rpm: int | None, tpm: int | None) -> int:
    key_id: int = await stack.pool.fetchval(
        "UPDATE api_keys SET rpm_limit = $2, tpm_limit = $3 WHERE key_hash = $1 RETURNING id",
        hash_key(SECRET.encode(), key), rpm, tpm,
    )  # fmt: skip
    return key_id


async def _children(stack: Stack, parent: str, n: int, **fields: Any) -> list[str]:
    keys = []
    async with stack.client(parent) as c:
        for _ in range(n):
            r = await c.post("/v1/keys", json=fields)
            assert r.status_code == 201, r.text
            keys.append(r.json()["key"])
    return keys


async def _ask(stack: Stack, key: str) -> httpx.Response:
    async with stack.client(key) as c:
        return await c.post("/v1/chat/completions", json=BODY)


def _refused(r: httpx.Response) -> bool:
    """A 429 in OpenAI's error shape with Retry-After; False for a 200."""
    if r.status_code == 200:
        return False
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] and error["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 61
    return True


async def _family_served(stack: Stack, parent: str, children: list[str]) -> list[bool]:
    """Two requests from each child, then two from the parent: which were served."""
    answers = [await _ask(stack, key) for key in children for _ in range(2)]
    answers += [await _ask(stack, parent) for _ in range(2)]
    return [not _refused(r) for r in answers]


async def test_a_parents_rpm_limit_is_the_total_of_its_children_and_itself(
    sstack: Stack,
) -> None:
    parent = await sstack.create_key("5.00")
    await _limit(sstack, parent, rpm=2, tpm=None)
    children = await _children(sstack, parent, 3)
    served = await _family_served(sstack, parent, children)
    # Before: each child had its own window of 2 (6 served, plus the parent's 2).
    assert served.count(True) == 2, served
    assert served[:2] == [True, True]  # the first child took the family's two


async def test_the_default_rpm_limit_is_the_total_of_a_family_without_its_own(
    default_stack: Stack,
) -> None:
    parent = await default_stack.create_key("5.00")
    children = await _children(default_stack, parent, 3)
    served = await _family_served(default_stack, parent, children)
    assert served.count(True) == 2, served


async def test_a_childs_own_lower_rpm_limit_still_caps_its_share(sstack: Stack) -> None:
    parent = await sstack.create_key("5.00")
    await _limit(sstack, parent, rpm=3, tpm=None)
    capped, free = await _children(sstack, parent, 1, rpm_limit=1) + await _children(
        sstack, parent, 1
    )
    assert [not _refused(await _ask(sstack, capped)) for _ in range(2)] == [True, False]
    # The family has 2 of its 3 left: the sibling takes them, and then the parent is full.
    assert [not _refused(await _ask(sstack, free)) for _ in range(3)] == [True, True, False]
    assert _refused(await _ask(sstack, parent))


async def test_a_parents_tpm_limit_counts_its_childrens_tokens(sstack: Stack) -> None:
    parent = await sstack.create_key("5.00")
    parent_id = await _limit(sstack, parent, rpm=None, tpm=10)
    first, second = await _children(sstack, parent, 2)
    r = await _ask(sstack, first)
    assert r.status_code == 200, r.text
    tokens = r.json()["usage"]["total_tokens"]
    assert tokens >= 10  # one answer fills the family's budget
    await sstack.wait_metered([r.json()["id"]])
    # The meter counted the child's tokens in its parent's window (Postgres, all routers).
    counted = await sstack.pool.fetchval(
        "SELECT sum(tokens) FROM key_rate_windows WHERE key_id = $1", parent_id
    )
    assert counted == tokens
    # Neither a sibling nor the parent is served while the family's tokens fill the window.
    assert _refused(await _ask(sstack, second))
    assert _refused(await _ask(sstack, parent))
    assert _refused(await _ask(sstack, first))


async def _reserve_all(pool: asyncpg.Pool, keys: list[str], default_rpm: int) -> list[str]:
    """The holds of `keys` in Postgres alone (no router's own window), in one transaction:
    one database minute for all of them."""
    async with pool.acquire() as conn, conn.transaction():
        statuses = []
        for key in keys:
            status: str = await conn.fetchval(
                "SELECT status FROM apifast_reserve($1, $2, 0.01, 0.01, 60, $3, 0, '', true)",
                hash_key(SECRET.encode(), key),
                f"gen-{uuid.uuid4().hex}",
                default_rpm,
            )
            statuses.append(status)
    return statuses


async def test_postgres_counts_children_in_their_parents_window(sstack: Stack) -> None:
    parent = await sstack.create_key("5.00")
    await _limit(sstack, parent, rpm=2, tpm=None)
    a, b, c = await _children(sstack, parent, 3)
    assert await _reserve_all(sstack.pool, [a, b, c, parent], 0) == [
        "ok", "ok", "rate_limited", "rate_limited",
    ]  # fmt: skip
    # The same with the default limit; a child's own cap is still its own.
    other = await sstack.create_key("5.00")
    d, e = await _children(sstack, other, 1, rpm_limit=1) + await _children(sstack, other, 1)
    assert await _reserve_all(sstack.pool, [d, d, e, other, e], 3) == [
        "ok", "rate_limited", "ok", "ok", "rate_limited",
    ]  # fmt: skip
    # A key without sub-keys counts only in its own window, as before.
    alone = await sstack.create_key("5.00")
    assert await _reserve_all(sstack.pool, [alone] * 3, 2) == ["ok", "ok", "rate_limited"]


def test_the_routers_own_window_counts_a_family_together() -> None:
    limiter = KeyRateLimiter()
    parent, child, sibling = 1, 2, 3
    assert limiter.check_sub_key_request(child, 2, parent, 2, now=0.0) == 0
    assert limiter.check_sub_key_request(sibling, 2, parent, 2, now=1.0) == 0
    # The family's window is full: the sibling waits for the first request to leave it,
    # and a refused request counts in neither window.
    assert limiter.check_sub_key_request(sibling, 2, parent, 2, now=2.0) == 58.0
    assert limiter.check_request(parent, 2, now=3.0) == 57.0
    assert limiter.check_sub_key_request(sibling, 2, parent, 2, now=60.5) == 0
    # A child's own lower limit caps its share while the family has room.
    assert limiter.check_sub_key_request(child, 1, parent, 5, now=200.0) == 0
    assert limiter.check_sub_key_request(child, 1, parent, 5, now=201.0) == 59.0
    assert limiter.check_request(parent, 5, now=202.0) == 0  # the refusal was not counted
    # A child's finished tokens count toward its parent's tpm window too.
    limiter.record_tokens(child, 30, now=203.0)
    assert limiter.check_tokens(parent, 30, now=204.0) == 59.0
    assert limiter.check_tokens(parent, 31, now=204.0) == 0


async def test_the_meter_counts_a_keys_tokens_once_and_a_childs_in_both_windows(
    sstack: Stack,
) -> None:
    alone = await sstack.create_key("5.00")
    await _limit(sstack, alone, rpm=None, tpm=100_000)
    parent = await sstack.create_key("5.00")
    await _limit(sstack, parent, rpm=None, tpm=100_000)
    (child,) = await _children(sstack, parent, 1, rpm_limit=50)
    answers = [await _ask(sstack, key) for key in (alone, child)]
    await sstack.wait_metered([r.json()["id"] for r in answers])
    windows = dict(
        await sstack.pool.fetch(
            "SELECT k.key_hash, sum(w.tokens) FROM key_rate_windows w "
            "JOIN api_keys k ON k.id = w.key_id GROUP BY k.key_hash"
        )
    )
    alone_tokens, child_tokens = (r.json()["usage"]["total_tokens"] for r in answers)
    assert windows[hash_key(SECRET.encode(), alone)] == alone_tokens
    assert windows[hash_key(SECRET.encode(), child)] == child_tokens
    assert windows[hash_key(SECRET.encode(), parent)] == child_tokens
