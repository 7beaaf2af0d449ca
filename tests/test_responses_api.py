"""POST /v1/responses with the official `openai` SDK, unmodified (`client.responses.create`),
against a running stack: an OpenAI-shaped upstream and an Anthropic-shaped one, streaming and
not, a function-call round trip, an image, the stateless refusals, and billing exact once
metered."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest

from apifast.keys import hash_key
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import REPLY, FakeOpenAI
from tests.harness import SECRET, Stack, models_toml, running_stack
from tests.test_messages_api import CLAUDE

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()
CLAUDE_TEXT = "Hello from the fake Claude."
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
BOTH = pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])


@pytest.fixture
async def fake_claude() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def rstack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> AsyncIterator[Stack]:
    fake_claude.api_key = "sk-ant-test-key"
    settings = stack_settings_factory(
        models_toml(fake_openai.url, CLAUDE.format(url=fake_claude.url))
    )
    async with running_stack(settings) as running:
        yield running


def sdk(stack: Stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0)


async def _balance(stack: Stack, key: str) -> Decimal:
    return Decimal(
        await stack.pool.fetchval(
            "SELECT balance_usd FROM api_keys WHERE key_hash = $1", hash_key(SECRET.encode(), key)
        )
    )


def _generation(response_id: str) -> str:
    assert response_id.startswith("resp_gen-")
    return response_id[len("resp_") :]


def _cost(usage: Any) -> Decimal:
    return Decimal(str(usage.model_extra["cost"]))


@BOTH
async def test_response_non_stream_billed_exactly(rstack: Stack, model: str) -> None:
    key = await rstack.create_key("1.00")
    response = await sdk(rstack, key).responses.create(
        model=model, instructions="Be brief.", input="hello", max_output_tokens=100,
        store=True, user="caller-123", metadata={"who": "me"},
    )  # fmt: skip
    assert response.object == "response" and response.status == "completed"
    assert response.model == model and response.store is False
    assert response.output_text in (REPLY, CLAUDE_TEXT)
    assert response.usage is not None
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    cost = _cost(usage)
    assert cost > 0
    await rstack.wait_metered([_generation(response.id)])
    assert await _balance(rstack, key) == Decimal("1.00") - cost
    rows = await rstack.state.clickhouse.query(
        "SELECT api FROM usage_events WHERE generation_id = {g:String}",
        {"g": _generation(response.id)},
    )
    assert [r["api"] for r in rows] == ["responses"]


@BOTH
async def test_response_stream(rstack: Stack, model: str) -> None:
    key = await rstack.create_key("1.00")
    async with sdk(rstack, key).responses.stream(
        model=model, input=[{"role": "user", "content": "hello"}], max_output_tokens=100
    ) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) in (REPLY, CLAUDE_TEXT)
    assert final.output_text == "".join(deltas)
    assert final.status == "completed" and final.model == model
    assert final.usage is not None and final.usage.output_tokens > 0
    cost = _cost(final.usage)
    await rstack.wait_metered([_generation(final.id)])
    assert await _balance(rstack, key) == Decimal("1.00") - cost


async def test_stream_events_typed_and_numbered(rstack: Stack) -> None:
    key = await rstack.create_key("1.00")
    body = {"model": "fast-chat", "input": "hi", "stream": True}
    async with httpx.AsyncClient(base_url=rstack.base_url, timeout=30) as c:
        r = await c.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200
    events = [orjson.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert kinds[:4] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
    ]  # fmt: skip
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == [
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert events[-1]["response"]["usage"]["total_tokens"] > 0
    assert "upstream-model" not in r.text and "chatcmpl" not in r.text and "fp_" not in r.text


@BOTH
@pytest.mark.parametrize("stream", [False, True])
async def test_function_call_round_trip(
    rstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, model: str, stream: bool
) -> None:
    key = await rstack.create_key("1.00")
    client = sdk(rstack, key)
    fake_openai.behaviour = "tools"
    fake_claude.behaviour = "tool_use"
    try:
        if stream:
            async with client.responses.stream(
                model=model,
                input="weather in Paris?",
                tools=TOOLS,  # type: ignore[arg-type]
            ) as events:
                kinds = [e.type async for e in events]
                first = await events.get_final_response()
            assert "response.function_call_arguments.delta" in kinds
            assert "response.function_call_arguments.done" in kinds
        else:
            first = await client.responses.create(
                model=model,
                input="weather in Paris?",
                tools=TOOLS,  # type: ignore[arg-type]
            )
    finally:
        fake_openai.behaviour = "ok"
        fake_claude.behaviour = None
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather"
    assert orjson.loads(call.arguments)["city"] == "Paris"
    assert call.call_id
    second = await client.responses.create(
        model=model, tools=TOOLS,  # type: ignore[arg-type]
        input=[
            {"role": "user", "content": "weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name,
             "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )  # fmt: skip
    assert second.status == "completed" and second.output_text
    if model == "fast-chat":
        sent = fake_openai.requests[-1]
        assert sent["tools"][0]["function"]["name"] == "get_weather"
        assert sent["messages"][1]["tool_calls"][0]["id"] == call.call_id
        assert sent["messages"][2] == {
            "role": "tool", "tool_call_id": call.call_id, "content": "sunny"
        }  # fmt: skip
        assert "user" not in sent and "metadata" not in sent and "store" not in sent
    else:
        sent = fake_claude.last_request.body
        result = sent["messages"][-1]["content"][0]
        assert result["type"] == "tool_result" and result["tool_use_id"] == call.call_id


@BOTH
async def test_image_input(
    rstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, model: str
) -> None:
    key = await rstack.create_key("1.00")
    response = await sdk(rstack, key).responses.create(
        model=model,
        input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"},
            {"type": "input_text", "text": "what is this?"},
        ]}],
    )  # fmt: skip
    assert response.status == "completed"
    if model == "fast-chat":
        part = fake_openai.requests[-1]["messages"][0]["content"][0]
        assert part == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    else:
        block = fake_claude.last_request.body["messages"][0]["content"][0]
        assert block["type"] == "image" and block["source"]["data"] == PNG


async def test_stateless_refusals_and_errors(rstack: Stack) -> None:
    key = await rstack.create_key("1.00")
    client = sdk(rstack, key)
    for extra, field in (
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"conversation": "conv_123"}, "conversation"),
        ({"background": True}, "background"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(model="fast-chat", input="hi", **extra)  # type: ignore[call-overload]
        error = caught.value.body
        assert isinstance(error, dict) and error["param"] == field
        assert "stores" in error["message"] or "stored" in error["message"]
    for tool in ("web_search", "file_search", "code_interpreter", "computer_use_preview"):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(
                model="fast-chat",
                input="hi",
                tools=[{"type": tool}],  # type: ignore[list-item]
            )
        assert isinstance(caught.value.body, dict) and tool in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.retrieve("resp_gen-0123")
    assert isinstance(missing.value.body, dict)
    assert "never stores" in missing.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="no-such-model", input="hi")
    with pytest.raises(openai.AuthenticationError):
        await sdk(rstack, "af-not-a-key").responses.create(model="fast-chat", input="hi")
    poor = await rstack.create_key("0.00")
    with pytest.raises(openai.APIStatusError) as caught_poor:
        await sdk(rstack, poor).responses.create(model="fast-chat", input="hi")
    assert caught_poor.value.status_code == 402
    async with httpx.AsyncClient(base_url=rstack.base_url, timeout=30) as c:
        auth = {"Authorization": f"Bearer {key}"}
        r = await c.post("/v1/responses", headers=auth, json={"model": "fast-chat"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        r = await c.post("/v1/responses", headers=auth, content=b"{not json")
        assert r.status_code == 400 and "error" in r.json()
    assert await _balance(rstack, key) == Decimal("1.00")  # refusals cost nothing


async def test_incomplete_at_max_output_tokens(rstack: Stack) -> None:
    key = await rstack.create_key("1.00")
    response = await sdk(rstack, key).responses.create(
        model="fast-chat", input="hello", max_output_tokens=2
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 2


async def test_json_schema_and_reasoning_reach_the_upstream(
    rstack: Stack, fake_openai: FakeOpenAI
) -> None:
    key = await rstack.create_key("1.00")
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    await sdk(rstack, key).responses.create(
        model="fast-chat", input="hi", reasoning={"effort": "low"},
        text={"format": {"type": "json_schema", "name": "thing", "schema": schema}},
    )  # fmt: skip
    sent = fake_openai.requests[-1]
    assert sent["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema}
    }  # fmt: skip
    assert sent["reasoning_effort"] == "low"
