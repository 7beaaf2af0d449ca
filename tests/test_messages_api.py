"""POST /v1/messages with the official `anthropic` SDK, unmodified, against a running stack:
an OpenAI-shaped upstream and an Anthropic-shaped one, streaming and not, a tool round trip,
an image, Anthropic-shaped errors, and billing exact once metered."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from apifast.keys import hash_key
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import REPLY, FakeOpenAI
from tests.harness import SECRET, Stack, models_toml, running_stack

CLAUDE = """
[providers.claude]
type = "anthropic"
base_url = "{url}"
api_key = "sk-ant-test-key"

[[models]]
id = "claude-chat"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "15.00"
routes = [ {{ provider = "claude", model = "claude-upstream-model" }} ]
"""
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()


@pytest.fixture
async def fake_claude() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def mstack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> AsyncIterator[Stack]:
    fake_claude.api_key = "sk-ant-test-key"
    settings = stack_settings_factory(
        models_toml(fake_openai.url, CLAUDE.format(url=fake_claude.url))
    )
    async with running_stack(settings) as running:
        yield running


def sdk(stack: Stack, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=key, base_url=stack.base_url, max_retries=0)


async def _balance(stack: Stack, key: str) -> Decimal:
    return Decimal(
        await stack.pool.fetchval(
            "SELECT balance_usd FROM api_keys WHERE key_hash = $1", hash_key(SECRET.encode(), key)
        )
    )


def _cost(usage: Any) -> Decimal:
    return Decimal(str(usage.model_extra["cost"]))


def _generation(message_id: str) -> str:
    assert message_id.startswith("msg_gen-")
    return message_id[len("msg_") :]


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
async def test_message_non_stream_billed_exactly(mstack: Stack, model: str) -> None:
    key = await mstack.create_key("1.00")
    client = sdk(mstack, key)
    message = await client.messages.create(
        model=model, max_tokens=100, system="Be brief.",
        messages=[{"role": "user", "content": "hello"}], metadata={"user_id": "caller-123"},
    )  # fmt: skip
    assert message.type == "message" and message.role == "assistant"
    assert message.model == model
    assert message.stop_reason == "end_turn"
    text = "".join(b.text for b in message.content if b.type == "text")
    assert text in (REPLY, "Hello from the fake Claude.")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    cost = _cost(message.usage)
    assert cost > 0
    await mstack.wait_metered([_generation(message.id)])
    assert await _balance(mstack, key) == Decimal("1.00") - cost
    rows = await mstack.state.clickhouse.query(
        "SELECT api FROM usage_events WHERE generation_id = {g:String}",
        {"g": _generation(message.id)},
    )
    assert [r["api"] for r in rows] == ["messages"]


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
async def test_message_stream(mstack: Stack, model: str) -> None:
    key = await mstack.create_key("1.00")
    client = sdk(mstack, key)
    async with client.messages.stream(
        model=model, max_tokens=100, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text in (REPLY, "Hello from the fake Claude.")
    assert final.stop_reason == "end_turn" and final.model == model
    assert final.usage.output_tokens > 0
    # The SDK's accumulator keeps only the usage fields it knows, so `cost` (sent in
    # message_delta) is checked against the price of the tokens it reports.
    prices = {"fast-chat": ("0.50", "1.50"), "claude-chat": ("3.00", "15.00")}[model]
    usage = final.usage
    cost = (
        (usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens)
        * Decimal(prices[0])
        + usage.output_tokens * Decimal(prices[1])
    ) / 1_000_000
    await mstack.wait_metered([_generation(final.id)])
    assert await _balance(mstack, key) == Decimal("1.00") - cost


async def test_stream_events_in_anthropic_order(mstack: Stack) -> None:
    key = await mstack.create_key("1.00")
    body = {"model": "fast-chat", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    async with httpx.AsyncClient(base_url=mstack.base_url, timeout=30) as c:
        r = await c.post("/v1/messages", json=body, headers={"x-api-key": key})
    assert r.status_code == 200
    kinds = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "upstream-model" not in r.text and "chatcmpl" not in r.text and "fp_" not in r.text


async def test_tool_use_round_trip(mstack: Stack, fake_openai: FakeOpenAI) -> None:
    key = await mstack.create_key("1.00")
    client = sdk(mstack, key)
    tools = [
        {
            "name": "get_weather",
            "description": "Weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    fake_openai.behaviour = "tools"  # for this call only: the next one answers in text
    first = await client.messages.create(
        model="fast-chat", max_tokens=100, tools=tools,
        messages=[{"role": "user", "content": "weather in Paris?"}],
    )  # fmt: skip
    fake_openai.behaviour = "ok"
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    second = await client.messages.create(
        model="fast-chat", max_tokens=100, tools=tools,
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "sunny"},
                {"type": "text", "text": "thanks"},
            ]},
        ],
    )  # fmt: skip
    assert second.stop_reason == "end_turn"
    sent = fake_openai.requests[-1]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.id
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    assert "user" not in sent and "metadata" not in sent


async def test_image_input_reaches_the_upstream(mstack: Stack, fake_openai: FakeOpenAI) -> None:
    key = await mstack.create_key("1.00")
    message = await sdk(mstack, key).messages.create(
        model="fast-chat", max_tokens=50,
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "text", "text": "what is this?"},
        ]}],
    )  # fmt: skip
    assert message.stop_reason == "end_turn"
    part = fake_openai.requests[-1]["messages"][0]["content"][0]
    assert part == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}


async def test_errors_in_anthropic_shape(mstack: Stack) -> None:
    key = await mstack.create_key("0.00")
    rich = await mstack.create_key("1.00")
    with pytest.raises(anthropic.AuthenticationError):
        await sdk(mstack, "af-not-a-key").messages.create(
            model="fast-chat", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(anthropic.NotFoundError):
        await sdk(mstack, rich).messages.create(
            model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(anthropic.APIStatusError) as caught:
        await sdk(mstack, key).messages.create(
            model="fast-chat", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 402
    async with httpx.AsyncClient(base_url=mstack.base_url, timeout=30) as c:
        r = await c.post(
            "/v1/messages",
            headers={"Authorization": f"Bearer {rich}"},
            json={"model": "fast-chat", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 400
        body = orjson.loads(r.content)
        assert body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in body["error"]["message"]
        r = await c.post("/v1/messages", headers={"x-api-key": rich}, content=b"{not json")
        assert r.status_code == 400 and r.json()["type"] == "error"
    assert await _balance(mstack, rich) == Decimal("1.00")


async def test_count_tokens_is_free(mstack: Stack, fake_claude: FakeAnthropic) -> None:
    key = await mstack.create_key("1.00")
    client = sdk(mstack, key)
    messages: Any = [{"role": "user", "content": "how many tokens is this?"}]
    counted = await client.messages.count_tokens(
        model="claude-chat", system="Be brief.", messages=messages
    )
    # The Anthropic route's own count, asked without max_tokens, as Anthropic requires.
    sent = fake_claude.last_request
    assert sent.path == "/v1/messages/count_tokens" and "max_tokens" not in sent.body
    assert sent.body["model"] == "claude-upstream-model"
    assert counted.input_tokens == 1000 + len(orjson.dumps(sent.body["messages"])) // 4
    # An OpenAI-shaped route has no count endpoint: ApiFast's estimate, bytes / 4.
    body = {"model": "fast-chat", "messages": messages}
    async with httpx.AsyncClient(base_url=mstack.base_url, timeout=30) as c:
        r = await c.post(
            "/v1/messages/count_tokens", content=orjson.dumps(body), headers={"x-api-key": key}
        )
        assert r.status_code == 200
        assert r.json() == {"input_tokens": -(-len(orjson.dumps(body)) // 4)}
        r = await c.post(
            "/v1/messages/count_tokens", json=body, headers={"x-api-key": "af-not-a-key"}
        )
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = await c.post(
            "/v1/messages/count_tokens",
            json={**body, "model": "no-such-model"},
            headers={"x-api-key": key},
        )
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    # Never metered: no hold, no event, nothing spent.
    assert await _balance(mstack, key) == Decimal("1.00")
    assert await mstack.pool.fetchval("SELECT count(*) FROM reservations") == 0


async def test_count_tokens_on_a_native_route_counts_the_body_as_sent(
    mstack: Stack, fake_claude: FakeAnthropic
) -> None:
    """On an Anthropic route the count is of the client's own body, as `/v1/messages` would
    pass it through: thinking, cache_control and tool definitions count; metadata (it
    identifies the caller) and the sampling fields count_tokens refuses are left out."""
    key = await mstack.create_key("1.00")
    system: Any = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    tools: Any = [{"name": "get_weather", "description": "Weather for a city.",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]  # fmt: skip
    body = {
        "model": "claude-chat", "max_tokens": 64, "system": system, "tools": tools,
        "thinking": {"type": "enabled", "budget_tokens": 1024}, "top_k": 5,
        "metadata": {"user_id": "caller-42"},
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "how many tokens?", "cache_control": {"type": "ephemeral"}},
        ]}],
    }  # fmt: skip
    async with httpx.AsyncClient(base_url=mstack.base_url, timeout=30) as c:
        r = await c.post("/v1/messages/count_tokens", json=body, headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    sent = fake_claude.last_request
    assert sent.path == "/v1/messages/count_tokens"
    assert sent.body == {
        "model": "claude-upstream-model", "system": system, "tools": tools,
        "thinking": body["thinking"], "messages": body["messages"],
    }  # fmt: skip
    assert r.json() == {"input_tokens": 1000 + len(orjson.dumps(body["messages"])) // 4}
    assert await mstack.pool.fetchval("SELECT count(*) FROM reservations") == 0


async def test_models_in_anthropic_shape_when_asked(mstack: Stack) -> None:
    key = await mstack.create_key("1.00")
    client = sdk(mstack, key)
    page = await client.models.list(limit=2)
    ids = [m.id for m in page.data]
    assert ids == ["claude-chat", "embed-small"] and page.has_more
    assert page.first_id == "claude-chat" and page.last_id == "embed-small"
    everything = [m.id async for m in client.models.list(limit=2)]  # the SDK pages on
    assert everything == ["claude-chat", "embed-small", "fast-chat"]
    model = await client.models.retrieve("fast-chat")
    assert model.type == "model" and model.display_name == "fast-chat"
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("no-such-model")
    async with httpx.AsyncClient(base_url=mstack.base_url, timeout=30) as c:
        plain = (await c.get("/v1/models")).json()  # no anthropic-version: OpenAI's shape
    assert plain["object"] == "list" and plain["data"][0]["object"] == "model"


async def test_pings_on_a_long_silence(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> None:
    settings = stack_settings_factory(models_toml(fake_openai.url), stream_ping_s=0.1)
    async with running_stack(settings) as stack:
        key = await stack.create_key("1.00")
        fake_openai.behaviour = "slow:0.35"  # the upstream pauses between words
        body = {"model": "fast-chat", "max_tokens": 3, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as c:
            r = await c.post("/v1/messages", json=body, headers={"x-api-key": key})
        fake_openai.behaviour = "ok"
        kinds = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
        assert kinds[0] == "message_start" and "ping" in kinds
        assert kinds[-2:] == ["message_delta", "message_stop"]
        text = "".join(
            orjson.loads(line[6:])["delta"].get("text", "")
            for line in r.text.splitlines()
            if line.startswith("data: ") and '"content_block_delta"' in line
        )
        assert text == " ".join(REPLY.split(" ")[:3])
        # The SDK reads through the pings too.
        fake_openai.behaviour = "slow:0.25"
        async with sdk(stack, key).messages.stream(
            model="fast-chat", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            final = await stream.get_final_message()
        fake_openai.behaviour = "ok"
        assert final.stop_reason == "max_tokens"


@pytest.mark.parametrize("stream", [False, True])
async def test_native_pass_through_keeps_cache_control_and_thinking(
    mstack: Stack, fake_claude: FakeAnthropic, stream: bool
) -> None:
    """On an Anthropic route the Messages request passes through untranslated: block-level
    cache_control and extended thinking (with its signature) survive, billing stays exact."""
    key = await mstack.create_key("1.00")
    client = sdk(mstack, key)
    system: Any = [{"type": "text", "text": "A long shared prefix.",
                    "cache_control": {"type": "ephemeral"}}]  # fmt: skip
    fake_claude.behaviour = "cache"
    request: Any = {
        "model": "claude-chat", "max_tokens": 2048, "system": system,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "think, then answer"}],
        "metadata": {"user_id": "caller-123"},
    }  # fmt: skip
    try:
        if stream:
            async with client.messages.stream(**request) as events:
                message = await events.get_final_message()
        else:
            message = await client.messages.create(**request)
    finally:
        fake_claude.behaviour = None
    sent = fake_claude.last_request.body
    assert sent["system"] == system and sent["thinking"] == request["thinking"]
    assert sent["model"] == "claude-upstream-model" and "metadata" not in sent
    thinking = next(b for b in message.content if b.type == "thinking")
    assert thinking.signature == "c2lnbmF0dXJl"
    assert message.id.startswith("msg_gen-") and message.model == "claude-chat"
    assert message.usage.cache_read_input_tokens == fake_claude.cache_read_tokens
    usage = message.usage
    cost = (
        (usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens)
        * Decimal("3.00")
        + usage.output_tokens * Decimal("15.00")
    ) / 1_000_000
    await mstack.wait_metered([_generation(message.id)])
    assert await _balance(mstack, key) == Decimal("1.00") - cost


async def test_server_tools_refused_on_every_route(mstack: Stack) -> None:
    key = await mstack.create_key("1.00")
    with pytest.raises(anthropic.BadRequestError) as caught:
        await sdk(mstack, key).messages.create(
            model="claude-chat", max_tokens=10, messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "web_search_20250305", "name": "web_search"}],  # type: ignore[list-item]
        )  # fmt: skip
    assert "web_search" in str(caught.value)


async def test_native_stream_relays_only_documented_events_and_fields(
    mstack: Stack, fake_claude: FakeAnthropic
) -> None:
    """An event of a type the relay does not know, and fields it does not know on the block
    events, are dropped (as Anthropic asks clients to): they could name the upstream."""
    key = await mstack.create_key("1.00")
    fake_claude.extra_events = [
        {"type": "upstream_debug", "model": "claude-upstream-model", "region": "us-east-1"}
    ]
    fake_claude.extra_block_fields = {"model": "claude-upstream-model"}
    async with httpx.AsyncClient(base_url=mstack.base_url, timeout=30) as c:
        r = await c.post(
            "/v1/messages", headers={"x-api-key": key},
            json={"model": "claude-chat", "max_tokens": 50, "stream": True,
                  "messages": [{"role": "user", "content": "hi"}]},
        )  # fmt: skip
    assert r.status_code == 200
    assert "claude-upstream-model" not in r.text and "us-east-1" not in r.text
    events = [orjson.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert set(kinds[1:-2]) == {"content_block_start", "content_block_delta", "content_block_stop"}
    assert "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta") == (
        fake_claude.reply_text
    )
    # The official SDK reads the same stream.
    async with sdk(mstack, key).messages.stream(
        model="claude-chat", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == fake_claude.reply_text
