"""A client that drops a stream midway is billed the usage delivered: the documented
estimate when the upstream has not reported usage (never zero, never the whole hold), and
the hold is released. The upstream here is a real SSE server that streams a few chunks and
then waits on a gate the test controls, so "midway" is exact, not a matter of timing."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiohttp import web

from apifast.money import per_mtok
from tests.harness import Stack, models_toml, running_stack

IN_PRICE, OUT_PRICE = Decimal("0.50"), Decimal("1.50")


@dataclass
class GatedUpstream:
    """OpenAI's chat-completions SSE format: a role chunk, `before` content chunks, then it
    waits for `gate`; then the remaining chunks, a finish chunk, usage (unless `usage` is
    False) and [DONE]. `dropped` is set when the router has closed the connection."""

    words: list[str]
    before: int
    usage: bool = True
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> GatedUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def stop(self) -> None:
        self.gate.set()
        if self._runner:
            await self._runner.cleanup()

    def _pieces(self, limit: int | None) -> list[str]:
        words = self.words[:limit] if limit else self.words
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.bodies.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            c = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
                 "model": body["model"],
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
            return b"data: " + orjson.dumps(c) + b"\n\n"

        pieces = self._pieces(body.get("max_tokens"))
        try:
            await resp.write(chunk({"role": "assistant", "content": ""}))
            for piece in pieces[: self.before]:
                await resp.write(chunk({"content": piece}))
            await self.gate.wait()
            for piece in pieces[self.before :]:
                await resp.write(chunk({"content": piece}))
            await resp.write(chunk({}, "stop"))
            if self.usage:
                u = {"prompt_tokens": 11, "completion_tokens": len(pieces),
                     "total_tokens": 11 + len(pieces)}  # fmt: skip
                usage_chunk = {"id": "chatcmpl-up", "object": "chat.completion.chunk",
                               "created": 1, "model": body["model"], "choices": [], "usage": u}  # fmt: skip
                await resp.write(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            self.dropped.set()
            return resp
        if request.transport is None or request.transport.is_closing():
            self.dropped.set()
        return resp


@pytest.fixture
def gated_stack(
    stack_settings_factory: Callable[..., Any],
) -> Callable[[GatedUpstream], Any]:
    def make(upstream: GatedUpstream) -> Any:
        return running_stack(stack_settings_factory(models_toml(upstream.url)))

    return make


@pytest.fixture
async def upstream_factory() -> AsyncIterator[Callable[..., Any]]:
    made: list[GatedUpstream] = []

    async def make(**kwargs: Any) -> GatedUpstream:
        fake = await GatedUpstream(**kwargs).start()
        made.append(fake)
        return fake

    yield make
    for fake in made:
        await fake.stop()


def _documented_estimate(body_bytes: int, chars: int, pieces: int) -> tuple[int, int]:
    """docs/billing.md: input = ceil(request body bytes / 4); output = max(content pieces
    delivered, ceil(characters delivered / 4)), at most the max_tokens sent upstream."""
    return math.ceil(body_bytes / 4), max(pieces, math.ceil(chars / 4))


async def _ledger_cost(stack: Stack, generation_id: str) -> Decimal:
    amount = await stack.pool.fetchval(
        "SELECT amount_usd FROM ledger WHERE kind = 'usage' AND ref = $1", generation_id
    )
    return -Decimal(amount)


async def _holds(stack: Stack) -> tuple[Decimal, int]:
    reserved = await stack.pool.fetchval("SELECT sum(reserved_usd) FROM api_keys")
    holds = await stack.pool.fetchval("SELECT count(*) FROM reservations")
    return Decimal(reserved or 0), holds


async def test_disconnect_mid_stream_bills_the_delivered_estimate(
    gated_stack: Callable[[GatedUpstream], Any], upstream_factory: Callable[..., Any]
) -> None:
    upstream = await upstream_factory(
        words=["Streaming", "words", "arrive", "one", "by", "one", "until", "done"], before=3
    )
    async with gated_stack(upstream) as stack:
        key = await stack.create_key("1.00")
        raw = orjson.dumps({
            "model": "fast-chat", "stream": True, "max_tokens": 50,
            "messages": [{"role": "user", "content": "tell me a story about streams"}],
        })  # fmt: skip
        received, generation_id, hold = "", "", Decimal(0)
        async with stack.client(key) as client, client.stream(
            "POST", "/v1/chat/completions", content=raw,
            headers={"Content-Type": "application/json"},
        ) as resp:  # fmt: skip
            assert resp.status_code == 200
            pieces = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                generation_id = chunk["id"]
                content = chunk["choices"][0]["delta"].get("content")
                if content:
                    received += content
                    pieces += 1
                if pieces == 1 and not hold:
                    hold, _ = await _holds(stack)
                if pieces == upstream.before:
                    break  # the client goes away mid-stream
        # The router settles on the disconnect alone; the upstream is still waiting.
        await stack.wait_metered([generation_id])
        assert not upstream.gate.is_set()
        billed = await _ledger_cost(stack, generation_id)
        tokens_in, tokens_out = _documented_estimate(len(raw), len(received), pieces)
        expected = per_mtok(tokens_in, IN_PRICE) + per_mtok(tokens_out, OUT_PRICE)
        assert received == "Streaming words arrive"
        assert billed == expected
        assert 0 < billed < hold
        assert await _holds(stack) == (Decimal(0), 0)
        row = (await stack.state.clickhouse.query(
            "SELECT outcome, usage_estimated, input_tokens, output_tokens FROM usage_events "
            "WHERE generation_id = {g:String}", {"g": generation_id},
        ))[0]  # fmt: skip
        assert row == {"outcome": "client_disconnect", "usage_estimated": True,
                       "input_tokens": tokens_in, "output_tokens": tokens_out}  # fmt: skip
        # The router closed the upstream connection too.
        upstream.gate.set()
        await upstream.dropped.wait()


async def test_stream_without_usage_is_billed_within_its_hold(
    gated_stack: Callable[[GatedUpstream], Any], upstream_factory: Callable[..., Any]
) -> None:
    """Long words make chars/4 exceed max_tokens: the estimate is capped at the max_tokens
    the hold was sized for, so an estimate can never overspend a balance."""
    upstream = await upstream_factory(
        words=["Supercalifragilistic", "expialidociously", "antidisestablishment"],
        before=0, usage=False,
    )  # fmt: skip
    upstream.gate.set()
    async with gated_stack(upstream) as stack:
        key = await stack.create_key("1.00")
        async with stack.client(key) as client:
            r = await client.post("/v1/chat/completions", json={
                "model": "fast-chat", "stream": True, "max_tokens": 2,
                "messages": [{"role": "user", "content": "two long words"}],
            })  # fmt: skip
            assert r.status_code == 200
        generation_id = json.loads(r.text.split("\n")[0][6:])["id"]
        await stack.wait_metered([generation_id])
        row = (await stack.state.clickhouse.query(
            "SELECT output_tokens, usage_estimated, outcome FROM usage_events "
            "WHERE generation_id = {g:String}", {"g": generation_id},
        ))[0]  # fmt: skip
        assert row == {"output_tokens": 2, "usage_estimated": True, "outcome": "ok"}
        assert await _holds(stack) == (Decimal(0), 0)


async def test_disconnect_after_full_usage_bills_the_upstream_usage(
    gated_stack: Callable[[GatedUpstream], Any], upstream_factory: Callable[..., Any]
) -> None:
    """A stream read to its end is billed the upstream's reported usage, exactly."""
    upstream = await upstream_factory(words=["a", "b", "c"], before=3)
    upstream.gate.set()
    async with gated_stack(upstream) as stack:
        key = await stack.create_key("1.00")
        async with stack.client(key) as client:
            r = await client.post("/v1/chat/completions", json={
                "model": "fast-chat", "stream": True,
                "messages": [{"role": "user", "content": "abc"}],
            })  # fmt: skip
        generation_id = json.loads(r.text.split("\n")[0][6:])["id"]
        await stack.wait_metered([generation_id])
        assert await _ledger_cost(stack, generation_id) == per_mtok(11, IN_PRICE) + per_mtok(
            3, OUT_PRICE
        )
