"""What a conformance probe of the three protocols found, with the official SDKs against a
running stack: tool-call ids are ApiFast's own on every protocol and route (an upstream's
id tells which upstream answered), the status a usage event records is the one the client
saw (an Anthropic client's 529 / 429), chat's `service_tier` is honoured or refused by name,
never silently dropped, and a Responses stream adds a message item with no content before
its part, as OpenAI's does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from openai.types.responses.response_create_params import ResponseCreateParamsBase

from apifast.keys import hash_key
from apifast.router.call_ids import call_id
from apifast.router.responses_input import KNOWN_FIELDS
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
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
HI = [{"role": "user", "content": "hi"}]
ASK = "weather in Paris?"
UPSTREAM_CALL_ID = "call_upstream_1"  # the fake OpenAI upstream's; the fake Claude's: toolu_01...
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
CHAT_TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]
MESSAGES_TOOLS: Any = [{"name": "get_weather", "description": "weather", "input_schema": SCHEMA}]
RESPONSES_TOOLS: Any = [{"type": "function", "name": "get_weather", "parameters": SCHEMA}]


@pytest.fixture
async def fake_claude() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def cstack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> AsyncIterator[Stack]:
    fake_claude.api_key = "sk-ant-test-key"
    settings = stack_settings_factory(
        models_toml(fake_openai.url, CLAUDE.format(url=fake_claude.url))
    )
    async with running_stack(settings) as running:
        yield running


def _calling(fake_openai: FakeOpenAI, fake_claude: FakeAnthropic) -> None:
    """The next request to either upstream answers with a tool call."""
    fake_openai.behaviour = "tools"
    fake_claude.script = ["tool_use"]


def _answering(fake_openai: FakeOpenAI) -> None:
    fake_openai.behaviour = "ok"


def _generation(response_id: str) -> str:
    return "gen-" + response_id.split("gen-", 1)[1]


# --- tool-call ids -------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
@pytest.mark.parametrize("stream", [False, True])
async def test_chat_tool_call_ids_are_apifasts(
    cstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, model: str, stream: bool
) -> None:
    key = await cstack.create_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=cstack.base_url + "/v1", max_retries=0)
    ask: Any = [{"role": "user", "content": ASK}]
    _calling(fake_openai, fake_claude)
    if stream:
        async with client.chat.completions.stream(
            model=model, messages=ask, tools=CHAT_TOOLS, stream_options={"include_usage": True}
        ) as events:
            completion = await events.get_final_completion()
    else:
        completion = await client.chat.completions.create(
            model=model, messages=ask, tools=CHAT_TOOLS
        )
    _answering(fake_openai)
    calls = completion.choices[0].message.tool_calls
    assert calls and completion.choices[0].finish_reason == "tool_calls"
    call = calls[0]
    assert call.id == call_id("call_", completion.id, 0) != UPSTREAM_CALL_ID
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert orjson.loads(call.function.arguments)["city"] == "Paris"  # type: ignore[union-attr]
    # The client sends ApiFast's id back with the call and its result; the upstream takes it
    # (the fake Claude checks that every tool result answers a call of the turn before).
    second = await client.chat.completions.create(
        model=model, tools=CHAT_TOOLS,
        messages=[*ask, completion.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny"}],
    )  # fmt: skip
    assert second.choices[0].finish_reason == "stop"
    if model == "fast-chat":
        sent = fake_openai.requests[-1]["messages"]
        assert sent[1]["tool_calls"][0]["id"] == call.id == sent[2]["tool_call_id"]
    else:
        turns = fake_claude.last_request.body["messages"]
        assert turns[1]["content"][-1]["id"] == call.id == turns[2]["content"][0]["tool_use_id"]


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
@pytest.mark.parametrize("stream", [False, True])
async def test_messages_tool_use_ids_are_apifasts(
    cstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, model: str, stream: bool
) -> None:
    """On a translated route (the OpenAI upstream's `call_` id) and a native one (Anthropic's
    own `toolu_01...`, passed through untranslated otherwise) alike."""
    key = await cstack.create_key("1.00")
    client = anthropic.AsyncAnthropic(api_key=key, base_url=cstack.base_url, max_retries=0)
    ask: Any = [{"role": "user", "content": ASK}]
    _calling(fake_openai, fake_claude)
    if stream:
        async with client.messages.stream(
            model=model, max_tokens=200, tools=MESSAGES_TOOLS, messages=ask
        ) as events:
            kinds = [event.type async for event in events]
            message = await events.get_final_message()
        assert "input_json" in kinds  # the SDK's event for input_json_delta
    else:
        message = await client.messages.create(
            model=model, max_tokens=200, tools=MESSAGES_TOOLS, messages=ask
        )
    _answering(fake_openai)
    assert message.stop_reason == "tool_use"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert len(uses) == 1
    use = uses[0]
    assert use.id == call_id("toolu_", _generation(message.id), 0)
    assert use.name == "get_weather" and use.input["city"] == "Paris"  # type: ignore[index]
    second = await client.messages.create(
        model=model, max_tokens=200, tools=MESSAGES_TOOLS,
        messages=[*ask, {"role": "assistant", "content": [b.model_dump() for b in message.content]},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}],
    )  # fmt: skip
    assert second.stop_reason == "end_turn"


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
@pytest.mark.parametrize("stream", [False, True])
async def test_responses_call_ids_are_apifasts(
    cstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, model: str, stream: bool
) -> None:
    key = await cstack.create_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=cstack.base_url + "/v1", max_retries=0)
    _calling(fake_openai, fake_claude)
    if stream:
        async with client.responses.stream(
            model=model, input=ASK, tools=RESPONSES_TOOLS, max_output_tokens=200
        ) as events:
            response = await events.get_final_response()
    else:
        response = await client.responses.create(
            model=model, input=ASK, tools=RESPONSES_TOOLS, max_output_tokens=200
        )
    _answering(fake_openai)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.id is not None and call.id.startswith("fc_")
    assert call.call_id == "call_" + call.id.removeprefix("fc_")
    assert call.call_id.startswith("call_" + _generation(response.id).removeprefix("gen-"))
    second = await client.responses.create(
        model=model, tools=RESPONSES_TOOLS, max_output_tokens=200,
        input=[{"role": "user", "content": ASK},
               {"type": "function_call", "call_id": call.call_id, "name": call.name,
                "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )  # fmt: skip
    assert second.status == "completed" and second.output_text


async def test_no_upstream_call_id_on_the_wire(
    cstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> None:
    """The raw bytes, streamed and not, of every protocol carry no upstream call id."""
    key = await cstack.create_key("1.00")
    ask = [{"role": "user", "content": ASK}]
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {"messages": ask, "tools": CHAT_TOOLS}),
        ("/v1/messages", {"messages": ask, "tools": MESSAGES_TOOLS, "max_tokens": 100}),
        ("/v1/responses", {"input": ASK, "tools": RESPONSES_TOOLS}),
    ]
    async with cstack.client(key) as c:
        for path, body in requests:
            for model in ("fast-chat", "claude-chat"):
                for stream in (False, True):
                    _calling(fake_openai, fake_claude)
                    r = await c.post(path, json={**body, "model": model, "stream": stream})
                    assert r.status_code == 200, r.text
                    assert "get_weather" in r.text  # a call was answered
                    assert UPSTREAM_CALL_ID not in r.text and "toolu_01" not in r.text
    _answering(fake_openai)


# --- the status a usage event records --------------------------------------------------------


async def _statuses(stack: Stack, api: str, count: int) -> list[int]:
    """The statuses of the `count` usage events of `api`, once metered, in order."""
    clickhouse = stack.state.clickhouse

    async def read() -> int:
        rows = await clickhouse.query(
            "SELECT count() AS n FROM usage_events WHERE api = {api:String}", {"api": api}
        )
        return int(rows[0]["n"])

    await stack.wait_until(read, count)
    rows = await clickhouse.query(
        "SELECT status FROM usage_events WHERE api = {api:String}",
        {"api": api},
    )
    return sorted(int(row["status"]) for row in rows)


async def test_usage_event_records_the_status_the_client_saw(
    cstack: Stack, fake_openai: FakeOpenAI
) -> None:
    """Every route overloaded is 529 to an Anthropic client and rate-limited 429; the same
    failure is 502 to a chat client. The event (behind GET /v1/generation, the admin's
    status counts and the request metrics) says what the client got."""
    key = await cstack.create_key("1.00")
    anthropic_client = anthropic.AsyncAnthropic(
        api_key=key, base_url=cstack.base_url, max_retries=0
    )
    fake_openai.fail(503, times=1)
    with pytest.raises(anthropic.OverloadedError):
        await anthropic_client.messages.create(model="fast-chat", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    fake_openai.fail(429, times=1)
    with pytest.raises(anthropic.RateLimitError):
        await anthropic_client.messages.create(model="fast-chat", max_tokens=10, messages=HI)  # type: ignore[arg-type]
    fake_openai.fail(503, times=1)
    chat_client = openai.AsyncOpenAI(api_key=key, base_url=cstack.base_url + "/v1", max_retries=0)
    with pytest.raises(openai.InternalServerError) as chat_error:
        await chat_client.chat.completions.create(model="fast-chat", messages=HI)  # type: ignore[arg-type]
    assert chat_error.value.status_code == 502
    assert await _statuses(cstack, "messages", 2) == [429, 529]
    assert await _statuses(cstack, "chat", 1) == [502]


# --- chat's service_tier -----------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["auto", "default"])
async def test_chat_service_tier_at_the_catalog_price_is_accepted(
    cstack: Stack, fake_openai: FakeOpenAI, tier: str
) -> None:
    key = await cstack.create_key("1.00")
    async with cstack.client(key) as c:
        r = await c.post("/v1/chat/completions",
                         json={"model": "fast-chat", "messages": HI, "service_tier": tier})  # fmt: skip
    assert r.status_code == 200, r.text
    assert "service_tier" not in fake_openai.requests[-1]  # never sent: it is the default


@pytest.mark.parametrize("tier", ["flex", "priority", "scale"])
@pytest.mark.parametrize("stream", [False, True])
async def test_chat_service_tier_of_another_price_is_refused(
    cstack: Stack, fake_openai: FakeOpenAI, tier: str, stream: bool
) -> None:
    """Not dropped (the client would get, and pay for, something else than asked): a 400
    naming the field, before anything is held or sent upstream."""
    key = await cstack.create_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=cstack.base_url + "/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="fast-chat",
            messages=HI,
            service_tier=tier,
            stream=stream,  # type: ignore[arg-type, call-overload]
        )
    body: Any = caught.value.body
    assert body["code"] == "unsupported_parameter" and body["param"] == "service_tier"
    assert fake_openai.requests == []
    assert await cstack.pool.fetchval("SELECT count(*) FROM reservations") == 0
    balance = await cstack.pool.fetchval(
        "SELECT balance_usd FROM api_keys WHERE key_hash = $1", hash_key(SECRET.encode(), key)
    )
    assert Decimal(balance) == Decimal("1.00")


@pytest.mark.parametrize("tier", ["flex", "priority", "scale"])
async def test_responses_service_tier_of_another_price_is_refused_as_on_chat(
    cstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, tier: str
) -> None:
    key = await cstack.create_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=cstack.base_url + "/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="fast-chat", input="hi", service_tier=tier)  # type: ignore[arg-type]
    body: Any = caught.value.body
    assert body["code"] == "unsupported_parameter" and body["param"] == "service_tier"
    await _nothing_held_or_sent(cstack, fake_openai, fake_claude)


async def test_chat_service_tier_of_no_known_value_is_invalid(cstack: Stack) -> None:
    key = await cstack.create_key("1.00")
    async with cstack.client(key) as c:
        r = await c.post("/v1/chat/completions",
                         json={"model": "fast-chat", "messages": HI, "service_tier": 3})  # fmt: skip
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "service_tier"
    assert r.json()["error"]["code"] == "invalid_value"


# --- the Responses event stream --------------------------------------------------------------


def _sse(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
async def test_responses_message_item_is_added_before_its_part(cstack: Stack, model: str) -> None:
    """As OpenAI streams it: output_item.added with `content: []`, then
    content_part.added. The SDK's accumulator appends the added part to the added item, so
    an item that already held one showed two parts in the snapshot while streaming."""
    key = await cstack.create_key("1.00")
    body = {"model": model, "input": "hello", "stream": True}
    async with httpx.AsyncClient(base_url=cstack.base_url, timeout=30) as c:
        r = await c.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"})
    events = _sse(r.text)
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert added["item"]["type"] == "message" and added["item"]["content"] == []
    part = next(e for e in events if e["type"] == "response.content_part.added")
    assert part["content_index"] == 0 and part["part"]["type"] == "output_text"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    client = openai.AsyncOpenAI(api_key=key, base_url=cstack.base_url + "/v1", max_retries=0)
    async with client.responses.stream(model=model, input="hello") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text
    assert final.output_text and len(final.output[0].content) == 1  # type: ignore[union-attr]


# --- chat fields that identify the caller or cost beyond the catalog price -------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_prompt_cache_key_is_not_sent_upstream(
    cstack: Stack, fake_openai: FakeOpenAI, stream: bool
) -> None:
    """OpenAI documents prompt_cache_key as the replacement for `user`, and clients set it to
    a user or session id: not sent, as on a native Responses route; the request is served."""
    key = await cstack.create_key("1.00")
    body = {"model": "fast-chat", "messages": HI, "prompt_cache_key": "user-4711",
            "stream": stream}  # fmt: skip
    async with cstack.client(key) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert "Hello" in r.text
    assert "prompt_cache_key" not in fake_openai.requests[-1]
    assert "user-4711" not in str(fake_openai.requests[-1])


async def test_chat_web_search_options_are_refused(cstack: Stack, fake_openai: FakeOpenAI) -> None:
    """The upstream would run and bill searches beside the tokens (and be told where the
    caller is): a 400 naming the field, as the other protocols refuse web search tools."""
    key = await cstack.create_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=cstack.base_url + "/v1", max_retries=0)
    options: Any = {"user_location": {"type": "approximate", "approximate": {"city": "Paris"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="fast-chat",
            messages=HI,
            web_search_options=options,  # type: ignore[arg-type]
        )
    body: Any = caught.value.body
    assert body["param"] == "web_search_options" and body["code"] == "unsupported_parameter"
    assert fake_openai.requests == []
    assert await cstack.pool.fetchval("SELECT count(*) FROM reservations") == 0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
    ],
)
async def test_chat_audio_output_is_refused(
    cstack: Stack, fake_openai: FakeOpenAI, fields: dict[str, Any], param: str
) -> None:
    """Spoken answers are billed upstream at an audio rate the catalog price does not
    follow: a 400 naming the field, before anything is held or sent. Text only passes."""
    key = await cstack.create_key("1.00")
    async with cstack.client(key) as c:
        r = await c.post("/v1/chat/completions",
                         json={"model": "fast-chat", "messages": HI, **fields})  # fmt: skip
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["code"] == "unsupported_parameter"
        assert fake_openai.requests == []
        assert await cstack.pool.fetchval("SELECT count(*) FROM reservations") == 0
        text = await c.post(
            "/v1/chat/completions",
            json={"model": "fast-chat", "messages": HI, "modalities": ["text"]},
        )
        assert text.status_code == 200, text.text
        wrong = await c.post(
            "/v1/chat/completions",
            json={"model": "fast-chat", "messages": HI, "modalities": "audio"},
        )
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "modalities"


# --- bad input is a 400 naming the field, before anything is held or sent ---------------------


async def _nothing_held_or_sent(
    stack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> None:
    assert fake_openai.requests == [] and fake_openai.responses_requests == []
    assert fake_claude.requests == []
    assert await stack.pool.fetchval("SELECT count(*) FROM reservations") == 0


@pytest.mark.parametrize(
    ("field", "instead"),
    [("max_tokens", "max_output_tokens"), ("messages", "input"), ("banana", None)],
)
@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
async def test_responses_refuse_an_unknown_parameter(
    cstack: Stack,
    fake_openai: FakeOpenAI,
    fake_claude: FakeAnthropic,
    model: str,
    field: str,
    instead: str | None,
) -> None:
    """As OpenAI answers it (400 unknown_parameter). Ignored, a chat-ism like `max_tokens`
    left the answer bounded only by the model's maximum, and billed so."""
    key = await cstack.create_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=cstack.base_url + "/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model=model, input="hi", extra_body={field: 10})
    body: Any = caught.value.body
    assert body["code"] == "unknown_parameter" and body["param"] == field
    assert f"'{field}'" in body["message"]
    if instead:
        assert instead in body["message"]
    await _nothing_held_or_sent(cstack, fake_openai, fake_claude)


def test_responses_take_every_field_of_the_sdk() -> None:
    """Each request field the openai SDK knows is a known field: refused for a reason of its
    own where ApiFast cannot honour it, never as unknown."""
    assert set(ResponseCreateParamsBase.__annotations__) <= KNOWN_FIELDS


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
@pytest.mark.parametrize(
    ("content", "field"),
    [
        ([{"type": "text", "text": 5}], "messages[0].content[0].text"),
        ([{"type": "text"}], "messages[0].content[0].text"),
        ([{"type": "tool_result", "content": "sunny"}], "messages[0].content[0].tool_use_id"),
    ],
)
async def test_messages_malformed_blocks_are_named(
    cstack: Stack,
    fake_openai: FakeOpenAI,
    fake_claude: FakeAnthropic,
    model: str,
    content: Any,
    field: str,
) -> None:
    """On a native route too: the upstream's 400 (or a 502, from one that chokes on it)
    cannot name the field, and a translating route turned a number into text."""
    key = await cstack.create_key("1.00")
    body = {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": content}]}
    async with httpx.AsyncClient(base_url=cstack.base_url, timeout=30) as c:
        r = await c.post("/v1/messages", json=body, headers={"x-api-key": key})
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(f"{field}:")
    await _nothing_held_or_sent(cstack, fake_openai, fake_claude)


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
@pytest.mark.parametrize(
    ("block", "field"),
    [
        ({"type": "tool_use", "name": "get_weather", "input": {}}, "id"),
        ({"type": "tool_use", "id": "toolu_1", "input": {}}, "name"),
        ({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": "x"}, "input"),
    ],
)
async def test_messages_malformed_tool_use_is_named(
    cstack: Stack, model: str, block: dict[str, Any], field: str
) -> None:
    key = await cstack.create_key("1.00")
    messages = [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": [block]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ]  # fmt: skip
    body = {"model": model, "max_tokens": 10, "messages": messages, "tools": MESSAGES_TOOLS}
    async with httpx.AsyncClient(base_url=cstack.base_url, timeout=30) as c:
        r = await c.post("/v1/messages", json=body, headers={"x-api-key": key})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(f"messages[1].content[0].{field}:")


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_item_cut_by_the_bound_is_incomplete(cstack: Stack, stream: bool) -> None:
    """A response stopped by max_output_tokens is incomplete, and so is the item it cut
    short, as OpenAI marks them (the SDK's status for each is in_progress, completed or
    incomplete)."""
    key = await cstack.create_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=cstack.base_url + "/v1", max_retries=0)
    if stream:
        # The SDK's get_final_response() wants response.completed, which OpenAI does not
        # send for an incomplete response either: the terminal event has it.
        async with client.responses.stream(
            model="fast-chat", input="hello", max_output_tokens=2
        ) as events:
            seen = [e async for e in events]
        done = [e.item for e in seen if e.type == "response.output_item.done"]
        assert [item.status for item in done] == ["incomplete"]  # type: ignore[union-attr]
        assert seen[-1].type == "response.incomplete"
        response = seen[-1].response
    else:
        response = await client.responses.create(
            model="fast-chat", input="hello", max_output_tokens=2
        )
    assert response.status == "incomplete"
    assert [item.status for item in response.output] == ["incomplete"]  # type: ignore[union-attr]


async def test_responses_item_cut_by_a_failed_stream_is_incomplete(cstack: Stack) -> None:
    key = await cstack.create_key("1.00")
    body = {"model": "fast-chat", "input": "[[broken]] hello", "stream": True}
    async with httpx.AsyncClient(base_url=cstack.base_url, timeout=30) as c:
        r = await c.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"})
    events = _sse(r.text)
    assert events[-1]["type"] == "response.failed"
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [item["status"] for item in done] == ["incomplete"]
    assert [item["status"] for item in events[-1]["response"]["output"]] == ["incomplete"]
    assert done[0]["content"][0]["text"]  # what was delivered before the failure
