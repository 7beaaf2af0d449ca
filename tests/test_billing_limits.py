"""Limits: per-key requests and tokens per minute (from the key's row), per-IP limits for the
unauthenticated endpoints, body and header sizes. Every refusal is in OpenAI's error shape,
429s carry Retry-After, and a refused request holds no money."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from apifast.ip_limits import IpRateLimiter
from apifast.keys import hash_key
from apifast.router.limits import KeyRateLimiter
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import SECRET, Stack, models_toml, running_stack

BODY = {"model": "fast-chat", "messages": [{"role": "user", "content": "hello"}]}


def _openai_error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    return error


def _retry_after(r: Any) -> int:
    seconds = int(r.headers["retry-after"])
    assert 1 <= seconds <= 60
    return seconds


@pytest.fixture
async def limited_stack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> AsyncIterator[Stack]:
    settings = stack_settings_factory(
        models_toml(fake_openai.url), max_body_bytes=2048, recover_rate_limit=2,
        rate_limit_window_s=60,
    )  # fmt: skip
    async with running_stack(settings) as running:
        yield running


async def _set_limits(stack: Stack, key: str, rpm: int | None, tpm: int | None) -> None:
    await stack.pool.execute(
        "UPDATE api_keys SET rpm_limit = $2, tpm_limit = $3 WHERE key_hash = $1",
        hash_key(SECRET.encode(), key), rpm, tpm,
    )  # fmt: skip


async def test_requests_per_minute_per_key(limited_stack: Stack) -> None:
    stack = limited_stack
    key, other = await stack.create_key("1.00"), await stack.create_key("1.00")
    await _set_limits(stack, key, rpm=3, tpm=None)
    served = []
    async with stack.client(key) as c:
        for _ in range(3):
            r = await c.post("/v1/chat/completions", json=BODY)
            assert r.status_code == 200, r.text
            served.append(r.json()["id"])
        r = await c.post("/v1/chat/completions", json=BODY)
        error = _openai_error(r, 429, "rate_limit_exceeded")
        assert error["type"] == "rate_limit_error"
        _retry_after(r)
        # The limit is the key's: another key is not affected.
        r = await c.post("/v1/chat/completions", json=BODY,
                         headers={"Authorization": f"Bearer {other}"})  # fmt: skip
        assert r.status_code == 200
        served.append(r.json()["id"])
    await stack.wait_metered(served)
    # The refused request left no hold behind.
    assert await stack.pool.fetchval("SELECT count(*) FROM reservations") == 0
    assert await stack.pool.fetchval("SELECT sum(reserved_usd) FROM api_keys") == 0


async def test_tokens_per_minute_per_key(limited_stack: Stack) -> None:
    stack = limited_stack
    key = await stack.create_key("1.00")
    await _set_limits(stack, key, rpm=None, tpm=25)
    used, refused = 0, None
    async with stack.client(key) as c:
        for _ in range(10):
            r = await c.post("/v1/chat/completions", json=BODY)
            if r.status_code != 200:
                refused = r
                break
            used += r.json()["usage"]["total_tokens"]
    assert refused is not None
    _openai_error(refused, 429, "rate_limit_exceeded")
    _retry_after(refused)
    assert used >= 25  # refused only once the window held the limit


async def test_embedding_tokens_count_toward_tpm(limited_stack: Stack) -> None:
    # Embeddings go through the same finish step as chat, so their tokens fill the window.
    stack = limited_stack
    key = await stack.create_key("1.00")
    await _set_limits(stack, key, rpm=None, tpm=25)
    used, refused = 0, None
    body = {"model": "embed-small", "input": "some words to embed"}
    async with stack.client(key) as c:
        for _ in range(20):
            r = await c.post("/v1/embeddings", json=body)
            if r.status_code != 200:
                refused = r
                break
            used += r.json()["usage"]["total_tokens"]
        assert refused is not None, "embedding tokens never reached the tpm limit"
        _openai_error(refused, 429, "rate_limit_exceeded")
        _retry_after(refused)
        assert used >= 25
        # The window is shared: a chat request is refused too.
        r = await c.post("/v1/chat/completions", json=BODY)
        _openai_error(r, 429, "rate_limit_exceeded")


def test_key_rate_limiter_windows() -> None:
    limiter = KeyRateLimiter()
    assert limiter.check_request(1, 2, now=0.0) == 0
    assert limiter.check_request(1, 2, now=1.0) == 0
    assert limiter.check_request(1, 2, now=2.0) == pytest.approx(58.0)
    assert limiter.check_request(1, 2, now=60.5) == 0  # the first left the window
    limiter.record_tokens(7, 30, now=0.0)
    limiter.record_tokens(7, 30, now=10.0)
    assert limiter.check_tokens(7, 100, now=11.0) == 0
    assert limiter.check_tokens(7, 50, now=11.0) == pytest.approx(49.0)  # once 30 leave
    assert limiter.check_tokens(7, 50, now=60.5) == 0
    assert limiter.check_request(2, None) == 0 and limiter.check_tokens(2, None) == 0
    # Idle keys are forgotten.
    limiter.check_request(3, 5, now=500.0)
    assert set(limiter._requests) == {3}


def test_ip_rate_limiter_keeps_no_ip_and_forgets_idle_clients() -> None:
    limiter = IpRateLimiter(2)  # per minute
    assert limiter.check("198.51.100.7", now=0.0) == 0
    assert limiter.check("198.51.100.7", now=1.0) == 0
    assert limiter.check("198.51.100.7", now=2.0) == pytest.approx(58.0)
    assert limiter.check("203.0.113.9", now=2.0) == 0
    assert limiter.check("198.51.100.7", now=60.01) == 0
    assert not any(b"198.51.100.7" in token for token in limiter._hits)
    limiter.check("192.0.2.1", now=1000.0)
    assert len(limiter._hits) == 1
    small = IpRateLimiter(1, max_entries=10)
    for i in range(100):
        small.check(f"10.0.0.{i}", now=float(i) / 1000)
    assert len(small._hits) <= 10


async def test_unauthenticated_endpoint_is_limited_per_ip(limited_stack: Stack) -> None:
    async with limited_stack.client() as c:
        statuses = []
        for _ in range(3):
            r = await c.post("/v1/recover", json={"email": "someone@example.com"})
            statuses.append(r.status_code)
    assert 429 not in statuses[:2], statuses
    _openai_error(r, 429, "rate_limit_exceeded")
    _retry_after(r)


async def test_body_too_large(limited_stack: Stack) -> None:
    stack = limited_stack
    key = await stack.create_key("1.00")
    big = {"model": "fast-chat", "messages": [{"role": "user", "content": "x" * 4096}]}
    async with stack.client(key) as c:
        _openai_error(await c.post("/v1/chat/completions", json=big), 413, "body_too_large")

        async def chunked() -> AsyncIterator[bytes]:
            yield b'{"model": "fast-chat", "messages": [{"role": "user", "content": "'
            for _ in range(8):
                yield b"y" * 512
            yield b'"}]}'

        r = await c.post("/v1/chat/completions", content=chunked(),
                         headers={"Content-Type": "application/json"})  # fmt: skip
        _openai_error(r, 413, "body_too_large")
        r = await c.post("/v1/embeddings", json={"model": "embed-small", "input": "z" * 4096})
        _openai_error(r, 413, "body_too_large")
    assert await stack.pool.fetchval("SELECT count(*) FROM reservations") == 0


async def test_headers_too_large(limited_stack: Stack) -> None:
    key = await limited_stack.create_key("1.00")
    async with limited_stack.client(key) as c:
        huge = {"X-Padding": "p" * (limited_stack.settings.max_header_bytes + 1)}
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            r = await c.request(method, path, json=BODY if method == "POST" else None,
                                headers=huge)  # fmt: skip
            _openai_error(r, 431, "headers_too_large")
        # Just under the limit is fine.
        ok = {"X-Padding": "p" * (limited_stack.settings.max_header_bytes // 2)}
        assert (await c.post("/v1/chat/completions", json=BODY, headers=ok)).status_code == 200
