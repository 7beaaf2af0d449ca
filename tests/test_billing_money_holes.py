"""The money holes found by probing (issue 13): an upstream that over-reports usage, negative
usage, non-text input the byte bound cannot cover, deeply nested JSON, and holds left behind
by unexpected errors. Each case: the key never goes below zero, the request is metered once,
and no hold outlives the request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest

from apifast import hookimpl
from apifast.keys import hash_key
from apifast.providers import ChatRequest, ChatResponse, Provider
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import SECRET, Stack, models_toml, running_stack

BODY = {"model": "fast-chat", "messages": [{"role": "user", "content": "hello"}]}
EXTRA = """
[providers.exploding]
type = "exploding"

[[models]]
id = "explodes"
input_usd_per_mtok = "0.50"
output_usd_per_mtok = "1.50"
routes = [ { provider = "exploding", model = "boom" } ]

[[models]]
id = "listens"
input_usd_per_mtok = "0.50"
output_usd_per_mtok = "1.50"
audio_input_tokens = 3000
image_input_tokens = 100000
routes = [ { provider = "local", model = "upstream-model-a" } ]
"""


class ExplodingProvider(Provider):
    """A provider whose request serialisation fails on what the client sent (a bug, not an
    upstream error): the router must answer 500 and give the hold back at once."""

    type = "exploding"

    async def chat(self, request: ChatRequest) -> ChatResponse:
        raise RecursionError("maximum recursion depth exceeded while encoding")


class ExplodingPlugin:
    @hookimpl
    def register_provider_types(self, register: Any) -> None:
        register("exploding", ExplodingProvider)


@pytest.fixture
async def holes_stack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> AsyncIterator[Stack]:
    settings = stack_settings_factory(models_toml(fake_openai.url, EXTRA))
    async with running_stack(settings, extra_plugins=(ExplodingPlugin(),)) as running:
        yield running


async def _key_row(stack: Stack, key: str) -> Any:
    return await stack.pool.fetchrow(
        "SELECT id, balance_usd, reserved_usd FROM api_keys WHERE key_hash = $1",
        hash_key(SECRET.encode(), key),
    )


async def _holds(stack: Stack, key: str) -> int:
    row = await _key_row(stack, key)
    return int(
        await stack.pool.fetchval("SELECT count(*) FROM reservations WHERE key_id = $1", row["id"])
    )


async def test_over_reporting_upstream_cannot_take_a_key_below_zero(
    holes_stack: Stack, fake_openai: FakeOpenAI
) -> None:
    stack = holes_stack
    key = await stack.create_key("0.01")
    # A million tokens each way: $2.00 at this price, against a balance of one cent.
    fake_openai.usage_override = {
        "prompt_tokens": 1_000_000, "completion_tokens": 1_000_000, "total_tokens": 2_000_000,
    }  # fmt: skip
    ids, charged = [], Decimal(0)
    async with stack.client(key) as c:
        for _ in range(3):
            r = await c.post("/v1/chat/completions", json=BODY)
            if r.status_code == 402:
                break
            assert r.status_code == 200, r.text
            cost = Decimal(str(r.json()["usage"]["cost"]))
            assert cost >= 0
            ids.append(r.json()["id"])
            charged += cost
    assert ids, "the first request must be served"
    await stack.wait_metered(ids)
    row = await _key_row(stack, key)
    assert row["balance_usd"] >= 0
    assert row["balance_usd"] == Decimal("0.01") - charged  # charged what was shown
    assert row["reserved_usd"] == 0 and await _holds(stack, key) == 0
    overages = await stack.pool.fetch(
        "SELECT generation_id, overage_usd FROM usage_overages WHERE key_id = $1", row["id"]
    )
    assert {o["generation_id"] for o in overages} == set(ids)
    assert all(o["overage_usd"] > 0 for o in overages)
    # The overage is recorded in the event too, and the ClickHouse row shows the capped cost.
    rows = await stack.state.clickhouse.query(
        "SELECT sum(cost_usd) AS total FROM usage_events WHERE generation_id IN {ids:Array(String)}",
        {"ids": ids},
    )
    assert Decimal(str(rows[0]["total"])) == charged


@pytest.mark.parametrize("stream", [False, True])
async def test_negative_usage_is_not_believed(
    holes_stack: Stack, fake_openai: FakeOpenAI, stream: bool
) -> None:
    stack = holes_stack
    key = await stack.create_key("1.00")
    fake_openai.usage_override = {
        "prompt_tokens": -5000, "completion_tokens": -3, "total_tokens": -5003,
    }  # fmt: skip
    body: dict[str, Any] = {**BODY}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with stack.client(key) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        import orjson

        chunks = [
            orjson.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")
        ]
        usage = chunks[-1]["usage"]
        generation_id = chunks[-1]["id"]
    else:
        usage = r.json()["usage"]
        generation_id = r.json()["id"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0  # the estimate
    assert Decimal(str(usage["cost"])) > 0
    await stack.wait_metered([generation_id])
    row = await _key_row(stack, key)
    assert row["balance_usd"] == Decimal("1.00") - Decimal(str(usage["cost"]))
    assert row["reserved_usd"] == 0 and await _holds(stack, key) == 0


async def test_deep_json_is_refused_before_any_hold(holes_stack: Stack) -> None:
    stack = holes_stack
    key = await stack.create_key("1.00")
    deep: Any = "x"
    for _ in range(300):
        deep = {"a": deep}
    body = {**BODY, "response_format": {"type": "json_schema", "json_schema": deep}}
    async with stack.client(key) as c:
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_json" and "nested deeper" in error["message"]
        # Embeddings read bodies the same way.
        r = await c.post("/v1/embeddings", json={"model": "embed-small", "input": [deep]})
        assert r.status_code == 400, r.text
        # Wide but shallow JSON (many brackets, little depth) is served.
        wide = {**BODY, "tools": [{"type": "function", "function": {"name": f"f{i}"}}
                                 for i in range(200)]}  # fmt: skip
        r = await c.post("/v1/chat/completions", json=wide)
        assert r.status_code == 200, r.text
    assert await _holds(stack, key) <= 1  # only the served one, until metered


async def test_unexpected_error_releases_the_hold_at_once(holes_stack: Stack) -> None:
    stack = holes_stack
    key = await stack.create_key("1.00")
    async with stack.client(key) as c:
        r = await c.post("/v1/chat/completions", json={**BODY, "model": "explodes"})
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "api_error"
        assert "recursion" not in r.text.lower()
        r = await c.post("/v1/chat/completions", json={**BODY, "model": "explodes", "stream": True})
        assert r.status_code == 500
    row = await _key_row(stack, key)
    assert row["reserved_usd"] == 0 and await _holds(stack, key) == 0
    assert row["balance_usd"] == Decimal("1.00")


async def test_media_parts_raise_the_hold_or_are_refused(holes_stack: Stack) -> None:
    stack = holes_stack
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    key = await stack.create_key("0.02")
    async with stack.client(key) as c:
        # fast-chat declares no audio bound: refused before any hold.
        r = await c.post("/v1/chat/completions", json={
            "model": "fast-chat", "messages": [{"role": "user", "content": [audio]}]})  # fmt: skip
        assert r.status_code == 400, r.text
        assert "audio" in r.json()["error"]["message"]
        # 'listens' bounds an image at 100,000 tokens ($0.05): more than this key holds, so
        # the request is refused rather than served on a hold that could not cover it.
        r = await c.post("/v1/chat/completions", json={
            "model": "listens", "messages": [{"role": "user", "content": [image]}]})  # fmt: skip
        assert r.status_code == 402, r.text
        # Audio on a model that declares a bound is served.
        r = await c.post("/v1/chat/completions", json={
            "model": "listens", "messages": [{"role": "user", "content": [audio]}]})  # fmt: skip
        assert r.status_code == 200, r.text


async def test_one_output_bound_goes_upstream_whatever_the_client_sets(
    holes_stack: Stack, fake_openai: FakeOpenAI
) -> None:
    # The hold covers the bound the router sends; a second field with the client's own value
    # beside it (unchecked before) would let an upstream that reads that one generate
    # beyond the hold, and OpenAI refuses the two together.
    stack = holes_stack
    key = await stack.create_key("1.00")
    ids = []
    async with stack.client(key) as c:
        for asked in ({"max_completion_tokens": 3, "max_tokens": 5_000_000},
                      {"max_completion_tokens": 10**6, "max_tokens": 3},
                      {"max_completion_tokens": None, "max_tokens": 3}):  # fmt: skip
            r = await c.post("/v1/chat/completions", json={**BODY, **asked})
            assert r.status_code == 200, r.text
            sent = {k: v for k, v in fake_openai.requests[-1].items() if k.startswith("max_")}
            assert sent == {"max_completion_tokens": 3}, asked
            assert r.json()["usage"]["completion_tokens"] == 3
            ids.append(r.json()["id"])
        calls = len(fake_openai.requests)
        for bad in ("lots", -1, 10**12, True):
            r = await c.post(
                "/v1/chat/completions",
                json={**BODY, "max_completion_tokens": 3, "max_tokens": bad},
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "max_tokens"
        assert len(fake_openai.requests) == calls  # refused before any upstream call
    await stack.wait_metered(ids)
    assert await _holds(stack, key) == 0


CLAUDE_DOCS = """
[providers.claude]
type = "anthropic"
base_url = "{url}"
api_key = "sk-ant-test-key"

[[models]]
id = "claude-plain"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "15.00"
routes = [ {{ provider = "claude", model = "claude-upstream-model" }} ]

[[models]]
id = "claude-docs"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "15.00"
file_input_tokens = 3000
routes = [ {{ provider = "claude", model = "claude-upstream-model" }} ]
"""
LONG_TEXT = "lorem ipsum " * 25_000  # 300 kB: up to 300k tokens, far more than its URL
TOOL_TURNS = [
    {"role": "user", "content": "look it up"},
    {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {}}]},
]  # fmt: skip


@pytest.fixture
async def docs_stack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> AsyncIterator[tuple[Stack, FakeAnthropic]]:
    async with FakeAnthropic() as fake:
        fake.api_key = "sk-ant-test-key"
        settings = stack_settings_factory(
            models_toml(fake_openai.url, CLAUDE_DOCS.format(url=fake.url))
        )
        async with running_stack(settings) as running:
            yield running, fake


@pytest.mark.parametrize(
    ("model", "messages", "billed_input"),
    [
        # A PDF by URL: the model's file bound covers it.
        ("claude-docs", [{"role": "user", "content": [
            {"type": "document", "source": {"type": "url", "url": "https://docs.invalid/a.pdf"}},
            {"type": "text", "text": "summarise"}]}], 2_900),
        # A text document: its bytes bound it, whatever the file bound.
        ("claude-docs", [{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                            "data": LONG_TEXT}},
            {"type": "text", "text": "summarise"}]}], 60_000),
        # Search results in a tool result: their text, by its bytes.
        ("claude-plain", [*TOOL_TURNS, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                {"type": "search_result", "title": "t", "source": "https://s.invalid",
                 "content": [{"type": "text", "text": LONG_TEXT}]}]}]}], 60_000),
    ],
)  # fmt: skip
async def test_blocks_passed_through_to_a_native_route_are_held_for(
    docs_stack: tuple[Stack, FakeAnthropic],
    model: str,
    messages: list[dict[str, Any]],
    billed_input: int,
) -> None:
    # Anthropic bills a document or a search result as input; before, the hold left them
    # out (they are not in the chat translation), so an upstream count like this one was
    # an overage the operator paid: a 300 kB document held as a 20-token prompt.
    stack, fake = docs_stack
    key = await stack.create_key("5.00")
    fake.usage_override = {"input_tokens": billed_input, "output_tokens": 5}
    body = {"model": model, "max_tokens": 10, "messages": messages}
    async with stack.client(key) as c:
        r = await c.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    generation_id = r.json()["id"].removeprefix("msg_")
    await stack.wait_metered([generation_id])
    row = await _key_row(stack, key)
    cost = (Decimal(billed_input) * 3 + 5 * 15) / 1_000_000
    assert Decimal("5.00") - row["balance_usd"] == cost  # the whole cost, within the hold
    assert await stack.pool.fetchval("SELECT count(*) FROM usage_overages") == 0
    assert row["reserved_usd"] == 0 and await _holds(stack, key) == 0


async def test_a_document_on_a_model_without_a_file_bound_is_refused_before_the_hold(
    docs_stack: tuple[Stack, FakeAnthropic],
) -> None:
    stack, fake = docs_stack
    key = await stack.create_key("5.00")
    document = {"type": "document", "source": {"type": "url", "url": "https://d.invalid/a.pdf"}}
    body = {"model": "claude-plain", "max_tokens": 10,
            "messages": [{"role": "user", "content": [document]}]}  # fmt: skip
    async with stack.client(key) as c:
        r = await c.post("/v1/messages", json=body)
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "does not take file input" in error["error"]["message"]
    assert fake.requests == [] and await _holds(stack, key) == 0
