"""What a probe with the official `openai` and `anthropic` SDKs against a running stack found:
embeddings refuse chat's `stream` by name, and check the model before the body as chat does;
/v1/messages refuses, on every route, the empty turns, empty text blocks, whitespace-only
turns and system prompts, whitespace-ended prefills and schema-less tools Anthropic's API
refuses (and takes whitespace text where it does); structured outputs (`output_config.format`, the SDK's `messages.parse`) reach the
upstream instead of being dropped; `POST /v1/responses/input_tokens` counts, as
`/v1/messages/count_tokens` does; and a streamed thinking block from a chat upstream carries
a string signature, as an unstreamed one does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import openai
import orjson
import pydantic
import pytest

from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import REPLY_JSON, FakeOpenAI
from tests.harness import Stack, models_toml, running_stack

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
HI: Any = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture
async def fake_claude() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def sstack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> AsyncIterator[Stack]:
    fake_claude.api_key = "sk-ant-test-key"
    settings = stack_settings_factory(
        models_toml(fake_openai.url, CLAUDE.format(url=fake_claude.url))
    )
    async with running_stack(settings) as running:
        yield running


def openai_sdk(stack: Stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0)


def anthropic_sdk(stack: Stack, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=key, base_url=stack.base_url, max_retries=0)


async def _nothing_held_or_sent(
    stack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> None:
    assert fake_openai.requests == [] and fake_claude.requests == []
    assert await stack.pool.fetchval("SELECT count(*) FROM reservations") == 0


# --- embeddings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"), [("stream", True), ("stream", False), ("stream_options", {})]
)
async def test_embeddings_refuse_stream_by_name(
    sstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, field: str, value: Any
) -> None:
    """OpenAI's embeddings API has no `stream`: refused as OpenAI refuses an unknown field,
    not sent on to an upstream that ignores it (an SSE client then gets JSON) or rejects it
    with a 400 that cannot name it."""
    key = await sstack.create_key("1.00")
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_sdk(sstack, key).embeddings.create(
            model="embed-small", input="hello", extra_body={field: value}
        )
    assert caught.value.code == "unknown_parameter" and caught.value.param == field
    assert f"'{field}'" in caught.value.message
    await _nothing_held_or_sent(sstack, fake_openai, fake_claude)


async def test_embeddings_pass_other_fields_on(sstack: Stack, fake_openai: FakeOpenAI) -> None:
    """Other fields go to the upstream as on chat: `dimensions` is one OpenAI has."""
    key = await sstack.create_key("1.00")
    done = await openai_sdk(sstack, key).embeddings.create(
        model="embed-small", input="hello", dimensions=3
    )
    assert len(done.data) == 1 and fake_openai.requests[-1]["dimensions"] == 3


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [("no-such-model", 404, "model_not_found"), ("fast-chat", 400, "wrong_model_type")],
)
async def test_embeddings_check_the_model_before_the_body_as_chat_does(
    sstack: Stack,
    fake_openai: FakeOpenAI,
    fake_claude: FakeAnthropic,
    model: str,
    status: int,
    code: str,
) -> None:
    """The order of checks is chat's: the model (404 unknown, 400 of the wrong kind) before
    the body's 400, so a bad body with a bad model gets the model's answer on both."""
    key = await sstack.create_key("1.00")
    chat_model = "embed-small" if model == "fast-chat" else model
    async with sstack.client(key) as c:
        embedded = await c.post("/v1/embeddings", json={"model": model, "input": []})
        chatted = await c.post("/v1/chat/completions", json={"model": chat_model, "messages": []})
        for r in (embedded, chatted):
            assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        # With the model right, the body's own 400, on both.
        embedded = await c.post("/v1/embeddings", json={"model": "embed-small", "input": []})
        chatted = await c.post("/v1/chat/completions", json={"model": "fast-chat", "messages": []})
    assert embedded.status_code == 400 and embedded.json()["error"]["param"] == "input"
    assert chatted.status_code == 400 and chatted.json()["error"]["param"] == "messages"
    await _nothing_held_or_sent(sstack, fake_openai, fake_claude)


# --- /v1/messages: what Anthropic's API refuses, refused on every route ----------------------


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
        ({"messages": [*HI, {"role": "assistant", "content": []}, *HI]}, "messages[1].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
         "messages[0].content[0].text"),
        ({"messages": [*HI, {"role": "assistant", "content": [
            {"type": "text", "text": ""},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}]},
         "messages[1].content[0].text"),
        ({"messages": [*HI, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "text", "text": ""}]}]}]},
         "messages[2].content[0].content[0].text"),
        ({"messages": [*HI, {"role": "assistant", "content": "The answer is "}]},
         "messages[1].content"),
        ({"messages": [*HI, {"role": "assistant", "content": [
            {"type": "text", "text": "Sure.\n"}]}]}, "messages[1].content[0].text"),
        ({"system": [{"type": "text", "text": ""}]}, "system[0].text"),
        # Whitespace alone, as Anthropic's API refuses it: a turn, its blocks, the system.
        ({"messages": [{"role": "user", "content": " \n"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\t"},
                                                    {"type": "text", "text": " "}]}]},
         "messages[0].content"),
        ({"messages": [*HI, {"role": "assistant", "content": [{"type": "text", "text": " "}]},
                       *HI]}, "messages[1].content"),
        ({"system": "  "}, "system"),
        ({"system": [{"type": "text", "text": "\n\n"}]}, "system"),
        ({"tools": [{"name": "get_weather", "description": "weather"}]},
         "tools[0].input_schema"),
        ({"tools": [{"type": "custom", "name": "get_weather", "input_schema": "none"}]},
         "tools[0].input_schema"),
    ],
)  # fmt: skip
async def test_messages_refuse_what_anthropic_refuses_before_the_hold(
    sstack: Stack,
    fake_openai: FakeOpenAI,
    fake_claude: FakeAnthropic,
    model: str,
    fields: dict[str, Any],
    field: str,
) -> None:
    """A translating route would send an empty turn, an empty text or a tool without
    parameters on to its upstream; a native one would get the upstream's 400, which cannot
    name the field, after a hold. Both answer as Anthropic's API does."""
    key = await sstack.create_key("1.00")
    body: dict[str, Any] = {"model": model, "max_tokens": 50, "messages": HI, **fields}
    with pytest.raises(anthropic.BadRequestError) as caught:
        await anthropic_sdk(sstack, key).messages.create(**body)
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(f"{field}:"), error
    await _nothing_held_or_sent(sstack, fake_openai, fake_claude)


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
async def test_messages_final_assistant_turn_may_be_empty(
    sstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, model: str
) -> None:
    """Anthropic's one exception (a prefill left empty), and a tool with its schema; a
    prefill with text (without trailing whitespace) passes too."""
    key = await sstack.create_key("1.00")
    tools: Any = [{"name": "get_weather", "input_schema": SCHEMA}]
    message = await anthropic_sdk(sstack, key).messages.create(
        model=model, max_tokens=50, tools=tools,
        messages=[*HI, {"role": "assistant", "content": ""}],
    )  # fmt: skip
    assert message.stop_reason == "end_turn" and message.content
    if model == "fast-chat":
        sent = fake_openai.requests[-1]
        assert sent["tools"][0]["function"]["parameters"] == SCHEMA
    else:
        last = fake_claude.last_request.body["messages"][-1]
        assert last == {"role": "assistant", "content": ""}
    prefill: Any = [{"type": "text", "text": "The answer is:"}]
    await anthropic_sdk(sstack, key).messages.create(
        model=model, max_tokens=50, messages=[*HI, {"role": "assistant", "content": prefill}]
    )


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
async def test_messages_take_whitespace_text_where_anthropic_does(
    sstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, model: str
) -> None:
    """Whitespace text is refused only alone: beside other text or a tool call, and as a
    tool_result's content, Anthropic's API takes it, and so does ApiFast."""
    key = await sstack.create_key("1.00")
    call: Any = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    messages: Any = [
        {"role": "user", "content": [{"type": "text", "text": " "},
                                     {"type": "text", "text": "weather?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "\n\n"}, call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": " "}]},
    ]  # fmt: skip
    tools: Any = [{"name": "get_weather", "input_schema": SCHEMA}]
    message = await anthropic_sdk(sstack, key).messages.create(
        model=model, max_tokens=50, tools=tools, messages=messages,
        system=[{"type": "text", "text": " "}, {"type": "text", "text": "Be brief."}],
    )  # fmt: skip
    assert message.content
    sent = fake_openai.requests if model == "fast-chat" else fake_claude.requests
    assert len(sent) == 1


# --- /v1/messages: structured outputs (output_config.format) ----------------------------------


class Weather(pydantic.BaseModel):
    city: str


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
@pytest.mark.parametrize("stream", [False, True])
async def test_messages_parse_gets_its_structured_output(
    sstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, model: str, stream: bool
) -> None:
    """The SDK's `messages.parse(output_format=...)` sends `output_config.format`: a native
    route gets it as sent, a translating one as chat's `response_format` json_schema. It was
    dropped, and the answer came back unconstrained, which the SDK cannot parse."""
    fake_claude.reply_text = REPLY_JSON
    key = await sstack.create_key("1.00")
    client = anthropic_sdk(sstack, key)
    ask: Any = [{"role": "user", "content": "weather? [[json]]"}]
    if stream:
        async with client.messages.stream(
            model=model, max_tokens=100, messages=ask, output_format=Weather
        ) as events:
            message = await events.get_final_message()
    else:
        message = await client.messages.parse(
            model=model, max_tokens=100, messages=ask, output_format=Weather
        )
    assert message.parsed_output == Weather(city="Paris")
    if model == "fast-chat":
        sent = fake_openai.requests[-1]["response_format"]
        assert sent["type"] == "json_schema"
        assert sent["json_schema"]["schema"]["properties"]["city"]["type"] == "string"
    else:
        sent = fake_claude.last_request.body["output_config"]["format"]
        assert sent["type"] == "json_schema" and "city" in sent["schema"]["properties"]


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ("json", "output_config"),
        ({"format": {"type": "text"}}, "output_config.format"),
        ({"format": {"type": "json_schema"}}, "output_config.format.schema"),
    ],
)
async def test_messages_malformed_output_config_is_named(
    sstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, config: Any, field: str
) -> None:
    key = await sstack.create_key("1.00")
    with pytest.raises(anthropic.BadRequestError) as caught:
        await anthropic_sdk(sstack, key).messages.create(
            model="claude-chat", max_tokens=50, messages=HI, output_config=config
        )
    error = caught.value.body
    assert isinstance(error, dict) and error["error"]["message"].startswith(f"{field}:")
    await _nothing_held_or_sent(sstack, fake_openai, fake_claude)


# --- POST /v1/responses/input_tokens ---------------------------------------------------------


async def test_responses_input_tokens_are_counted_free(
    sstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> None:
    """The SDK's `responses.input_tokens.count` (OpenAI's POST /v1/responses/input_tokens)
    got a 405: the path matched only `GET /v1/responses/{id}`."""
    key = await sstack.create_key("1.00")
    client = openai_sdk(sstack, key)
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": SCHEMA}]
    counted = await client.responses.input_tokens.count(
        model="claude-chat", input="how many tokens is this?", instructions="Be brief.",
        tools=tools,
    )  # fmt: skip
    # The Anthropic route's own count, of the prompt as that route gets it.
    sent = fake_claude.last_request
    assert sent.path == "/v1/messages/count_tokens" and sent.body["system"] == "Be brief."
    assert sent.body["tools"][0]["name"] == "get_weather"
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == 1000 + len(orjson.dumps(sent.body["messages"])) // 4
    # An OpenAI-shaped route: ApiFast's estimate, the body's bytes / 4.
    body = orjson.dumps({"model": "fast-chat", "input": "how many tokens is this?"})
    async with sstack.client(key) as c:
        r = await c.post("/v1/responses/input_tokens", content=body)
    assert r.status_code == 200
    assert r.json() == {"object": "response.input_tokens", "input_tokens": -(-len(body) // 4)}
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_tokens.count(model="no-such-model", input="hi")
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.input_tokens.count(model="fast-chat", input="hi",
                                                  extra_body={"max_tokens": 5})  # fmt: skip
    assert caught.value.code == "unknown_parameter"
    with pytest.raises(openai.AuthenticationError):
        await openai_sdk(sstack, "af-not-a-key").responses.input_tokens.count(
            model="fast-chat", input="hi"
        )
    # Never metered: nothing held, nothing asked of the OpenAI-shaped upstream.
    assert fake_openai.requests == []
    assert await sstack.pool.fetchval("SELECT count(*) FROM reservations") == 0
    assert await sstack.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'") == 0


# --- /v1/messages: a chat upstream's reasoning, as thinking blocks ----------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_translated_thinking_block_has_a_string_signature(
    sstack: Stack, fake_openai: FakeOpenAI, stream: bool
) -> None:
    """A chat upstream's `reasoning_content` is a thinking block with signature "" (there is
    none to give), streamed or not: the streamed block started without one, and the SDK's
    accumulated message had `signature=None` in a field its types say is a string."""
    fake_openai.vendor_fields = {"reasoning_content": "Thinking."}  # on every message/delta
    key = await sstack.create_key("1.00")
    client = anthropic_sdk(sstack, key)
    if stream:
        async with client.messages.stream(model="fast-chat", max_tokens=50, messages=HI) as events:
            message = await events.get_final_message()
    else:
        message = await client.messages.create(model="fast-chat", max_tokens=50, messages=HI)
    thinking = [block for block in message.content if block.type == "thinking"]
    assert thinking and all(block.signature == "" for block in thinking)
    assert thinking[0].thinking.startswith("Thinking.")
