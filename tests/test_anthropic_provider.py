"""The `anthropic` provider against a fake Anthropic API over real HTTP on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pluggy
import pytest

from apifast import hookspecs
from apifast.plugin_manager import provider_types
from apifast.plugins.providers import anthropic_messages
from apifast.plugins.providers.anthropic_messages import AnthropicProvider
from apifast.plugins.providers.sse import SseDecoder
from apifast.providers import (
    ChatRequest,
    PartialUsage,
    ProviderConfig,
    UnsupportedParameter,
    UpstreamError,
    UpstreamTimeout,
    Usage,
)
from tests.fakes.anthropic_upstream import API_KEY, FakeAnthropic

MODEL = "claude-sonnet-4-5-20250929"
SECRET_PROMPT = "my secret prompt 4711"


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as server:
        yield server


def make_provider(url: str, **overrides: Any) -> AnthropicProvider:
    config = ProviderConfig(name="claude", type="anthropic", base_url=url, api_key=API_KEY)
    for key, value in overrides.items():
        setattr(config, key, value)
    return AnthropicProvider(config)


@pytest.fixture
async def provider(fake: FakeAnthropic) -> AsyncIterator[AnthropicProvider]:
    p = make_provider(fake.url)
    await p.start()
    yield p
    await p.close()


def chat(text: str = "Hi", *, stream: bool = False, **fields: Any) -> ChatRequest:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    body.update(fields)
    return ChatRequest(body=body, model=MODEL, stream=stream)


async def collect(
    provider: AnthropicProvider, request: ChatRequest
) -> tuple[list[dict[str, Any]], list[Usage]]:
    chunks: list[dict[str, Any]] = []
    usages: list[Usage] = []
    async for item in provider.stream_chat(request):
        if isinstance(item, PartialUsage):
            continue  # the input reported early (test_stream_text)
        (usages if isinstance(item, Usage) else chunks).append(item)  # type: ignore[arg-type]
    return chunks, usages


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks]


def joined_content(chunks: list[dict[str, Any]]) -> str:
    return "".join(d.get("content") or "" for d in deltas(chunks))


def finish_reasons(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}


# --- plugin and plain chat -------------------------------------------------------------------


def test_plugin_registers_the_anthropic_type() -> None:
    pm = pluggy.PluginManager("apifast")
    pm.add_hookspecs(hookspecs)
    pm.register(anthropic_messages)
    assert provider_types(pm)["anthropic"] is AnthropicProvider
    assert AnthropicProvider.type == "anthropic"


async def test_chat_returns_an_openai_completion(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    response = await provider.chat(chat("Hello", user="buyer-42", max_tokens=100))
    body = response.body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": fake.reply_text,
        "refusal": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert response.usage == Usage(input_tokens=21, output_tokens=9)
    assert body["usage"] == {
        "prompt_tokens": 21,
        "completion_tokens": 9,
        "total_tokens": 30,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    # Upstream ids stay upstream.
    assert not body["id"].startswith("msg_")
    assert fake.last_request.body == {
        "model": MODEL,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hello"}],
    }


async def test_only_the_anthropic_headers_are_sent(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    await provider.chat(chat())
    async for _ in provider.stream_chat(chat(stream=True)):
        pass
    await provider.check()
    for recorded in fake.requests:
        headers = recorded.headers
        assert headers["x-api-key"] == API_KEY
        assert headers["anthropic-version"] == "2023-06-01"
        # aiohttp's own transport headers are all that may accompany ours.
        allowed = {"x-api-key", "anthropic-version", "content-type", "content-length", "host"}
        allowed |= {"accept", "accept-encoding"}
        assert set(headers) <= allowed, set(headers) - allowed
    assert "user" not in fake.requests[0].body


async def test_no_api_key_header_when_none_is_configured(fake: FakeAnthropic) -> None:
    p = make_provider(fake.url, api_key=None)
    try:
        with pytest.raises(UpstreamError) as caught:
            await p.chat(chat())
    finally:
        await p.close()
    assert "x-api-key" not in fake.last_request.headers
    assert caught.value.status == 401 and not caught.value.retryable


async def test_session_is_created_lazily_without_start(fake: FakeAnthropic) -> None:
    p = make_provider(fake.url)
    try:
        assert (await p.chat(chat())).usage.output_tokens == 9
    finally:
        await p.close()


async def test_default_max_tokens_comes_from_options(fake: FakeAnthropic) -> None:
    p = make_provider(fake.url, options={"default_max_tokens": 777})
    try:
        await p.chat(chat())
    finally:
        await p.close()
    assert fake.last_request.body["max_tokens"] == 777


# --- request translation -------------------------------------------------------------------


async def test_system_and_developer_messages_become_the_system_field(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
        {"role": "user", "content": "Again"},
    ]
    await provider.chat(ChatRequest(body={"model": MODEL, "messages": messages}, model=MODEL))
    sent = fake.last_request.body
    assert sent["system"] == "Be brief.\n\nUse French."
    # The two user turns around the hoisted developer message merge into one.
    assert sent["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "Again"}],
        }
    ]


async def test_cache_control_passes_through(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    ephemeral = {"type": "ephemeral"}
    messages = [
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "Long manual", "cache_control": ephemeral},
            ],
        },
        {"role": "user", "content": "Question", "cache_control": ephemeral},
    ]
    await provider.chat(ChatRequest(body={"model": MODEL, "messages": messages}, model=MODEL))
    sent = fake.last_request.body
    assert sent["system"] == [{"type": "text", "text": "Long manual", "cache_control": ephemeral}]
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "Question", "cache_control": ephemeral}
    ]


async def test_tool_conversation_is_translated(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    messages = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "toolu_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "toolu_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": [{"type": "text", "text": "noon"}]},
    ]
    body = {
        "model": MODEL,
        "messages": messages,
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "max_completion_tokens": 300,
        "temperature": 0.9,
        "top_p": 1,  # a no-op next to temperature: not sent (newer models refuse both)
        "stop": "END",
        "seed": 7,
        "stream_options": {"include_usage": True},
        "n": 1,
    }
    await provider.chat(ChatRequest(body=body, model=MODEL))
    assert fake.last_request.body == {
        "model": MODEL,
        "max_tokens": 300,
        "messages": [
            {"role": "user", "content": "Weather and time in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_a",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                    {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_a", "content": "sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_b",
                        "content": [{"type": "text", "text": "noon"}],
                    },
                ],
            },
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "Weather for a city",
                "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
            },
            {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
        ],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.9,
    }


@pytest.mark.parametrize(
    ("openai", "anthropic"),
    [("auto", {"type": "auto"}), ("required", {"type": "any"}), ("none", {"type": "none"})],
)
async def test_tool_choice_strings(
    fake: FakeAnthropic, provider: AnthropicProvider, openai: str, anthropic: dict[str, str]
) -> None:
    await provider.chat(chat(tools=[WEATHER_TOOL], tool_choice=openai))
    assert fake.last_request.body["tool_choice"] == anthropic


async def test_images_become_image_blocks(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    content = [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}},
    ]
    await provider.chat(
        ChatRequest(
            body={"model": MODEL, "messages": [{"role": "user", "content": content}]}, model=MODEL
        )
    )
    assert fake.last_request.body["messages"][0]["content"] == [
        {"type": "text", "text": "Compare"},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


async def test_json_schema_becomes_a_system_instruction(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    await provider.chat(chat(response_format=fmt))
    system = fake.last_request.body["system"]
    assert "JSON Schema" in system and orjson.dumps(schema).decode() in system


async def test_json_schema_natively_when_configured(fake: FakeAnthropic) -> None:
    p = make_provider(fake.url, options={"native_structured_outputs": True})
    schema = {"type": "object"}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    try:
        await p.chat(chat(response_format=fmt))
    finally:
        await p.close()
    sent = fake.last_request.body
    assert sent["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert "system" not in sent


async def test_reasoning_effort_enables_thinking(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    response = await provider.chat(
        chat(reasoning_effort="low", max_completion_tokens=4000, temperature=1)
    )
    sent = fake.last_request.body
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert "temperature" not in sent  # 1, the default: Anthropic takes none with thinking
    with pytest.raises(UnsupportedParameter) as caught:
        provider.check_request(chat(reasoning_effort="low", temperature=0.2))
    assert caught.value.param == "temperature"
    message = response.body["choices"][0]["message"]
    assert message["content"] == fake.reply_text
    assert message["reasoning_content"] == "Let me think."


async def test_n_greater_than_one_is_refused_without_a_request(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    with pytest.raises(UnsupportedParameter) as caught:
        await provider.chat(chat(n=2))
    assert caught.value.status == 400 and not caught.value.retryable
    assert caught.value.param == "n"
    assert fake.requests == []


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 3}, "n"),
        ({"temperature": 1.7}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 0.5, "top_p": 0.9}, "top_p"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ],
)
async def test_what_anthropic_cannot_express_is_refused_not_dropped(
    fake: FakeAnthropic, provider: AnthropicProvider, fields: dict[str, Any], param: str
) -> None:
    """Checked before the hold (check_request) and again before any request is sent."""
    request = chat(**fields)
    with pytest.raises(UnsupportedParameter) as before:
        provider.check_request(request)
    assert before.value.param == param
    with pytest.raises(UnsupportedParameter):
        await provider.chat(request)
    assert fake.requests == []


async def test_equivalents_are_sent_and_no_ops_accepted(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    for effort in ("minimal", "none"):  # their Anthropic equivalent: no thinking
        await provider.chat(chat(reasoning_effort=effort, temperature=0.3))
        sent = fake.last_request.body
        assert "thinking" not in sent and sent["temperature"] == 0.3
    await provider.chat(chat(reasoning_effort="xhigh", max_completion_tokens=40000))
    assert fake.last_request.body["thinking"] == {"type": "enabled", "budget_tokens": 32768}
    await provider.chat(
        chat(temperature=1, top_p=1, presence_penalty=0, frequency_penalty=0, logprobs=False,
             logit_bias={}, seed=3)
    )  # fmt: skip
    sent = fake.last_request.body
    assert sent["temperature"] == 1 and "top_p" not in sent and "seed" not in sent


# --- responses -----------------------------------------------------------------------------


async def test_tool_use_becomes_tool_calls(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.behaviour = "tool_use"
    response = await provider.chat(chat(tools=[WEATHER_TOOL, TIME_TOOL]))
    choice = response.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert all(c["type"] == "function" and c["id"].startswith("toolu_") for c in calls)
    assert orjson.loads(calls[0]["function"]["arguments"]) == fake.tool_input


@pytest.mark.parametrize(
    ("behaviour", "finish"), [("max_tokens", "length"), ("refusal", "content_filter")]
)
async def test_stop_reasons(provider: AnthropicProvider, behaviour: str, finish: str) -> None:
    response = await provider.chat(chat(f"[fake:{behaviour}] go"))
    assert response.body["choices"][0]["finish_reason"] == finish


async def test_cache_usage_is_mapped(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.behaviour = "cache"
    expected = Usage(
        input_tokens=21 + 1800 + 200, output_tokens=9, cached_tokens=1800, cache_write_tokens=200
    )
    response = await provider.chat(chat())
    assert response.usage == expected
    assert response.body["usage"]["prompt_tokens"] == 2021
    assert response.body["usage"]["prompt_tokens_details"] == {"cached_tokens": 1800}
    _, usages = await collect(provider, chat(stream=True))
    assert usages == [expected]


# --- streaming -----------------------------------------------------------------------------


async def test_stream_text(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    items = [item async for item in provider.stream_chat(chat(stream=True))]
    assert isinstance(items[-1], Usage) and items[-1] == Usage(input_tokens=21, output_tokens=9)
    assert sum(isinstance(i, Usage) for i in items) == 2
    # The input as message_start reported it, right after that event's chunk: a client gone
    # before the end is billed it (its output count, 1, is only a floor).
    assert items[1] == PartialUsage(input_tokens=21, output_tokens=1)
    chunks = [i for i in items if isinstance(i, dict)]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert deltas(chunks)[0] == {"role": "assistant", "content": ""}
    assert joined_content(chunks) == fake.reply_text
    assert len(chunks) > 3  # really incremental
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert fake.last_request.body["stream"] is True


async def test_stream_tool_call_deltas(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.behaviour = "tool_use"
    chunks, usages = await collect(provider, chat(stream=True, tools=[WEATHER_TOOL, TIME_TOOL]))
    assert len(usages) == 1
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas(chunks):
        for call in delta.get("tool_calls", ()):
            entry = calls.setdefault(call["index"], {"arguments": ""})
            if "id" in call:
                assert "id" not in entry  # the id comes once, first
                entry.update(id=call["id"], type=call["type"], name=call["function"]["name"])
            entry["arguments"] += call["function"].get("arguments", "")
    assert sorted(calls) == [0, 1]
    assert [calls[i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    assert all(c["type"] == "function" and c["id"].startswith("toolu_") for c in calls.values())
    assert all(orjson.loads(c["arguments"]) == fake.tool_input for c in calls.values())
    # Arguments really arrive in pieces.
    argument_deltas = [
        call for d in deltas(chunks) for call in d.get("tool_calls", ()) if "id" not in call
    ]
    assert len(argument_deltas) >= 4
    assert joined_content(chunks) == "Let me check."
    assert finish_reasons(chunks) == ["tool_calls"]


async def test_stream_survives_events_split_across_reads(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.fragment_size = 7
    chunks, usages = await collect(provider, chat(stream=True))
    assert joined_content(chunks) == fake.reply_text
    assert usages == [Usage(input_tokens=21, output_tokens=9)]


def test_sse_decoder_handles_any_split() -> None:
    stream = (
        b": comment\r\n"
        b'event: message_start\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
        b'event: ping\ndata: {"type": "ping"}\n\n'
    )
    decoder = SseDecoder()
    events = []
    for i in range(len(stream)):
        events.extend(decoder.feed(stream[i : i + 1]))
    assert events == [("message_start", b'{"a":\n1}'), ("ping", b'{"type": "ping"}')]


async def test_broken_stream_yields_what_arrived_then_raises(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.behaviour = "broken"
    items: list[Any] = []
    with pytest.raises(UpstreamError) as caught:
        async for item in provider.stream_chat(chat(SECRET_PROMPT, stream=True)):
            items.append(item)
    chunks = [i for i in items if isinstance(i, dict)]
    assert deltas(chunks)[0]["role"] == "assistant"
    assert joined_content(chunks)  # the deltas sent before the break
    assert joined_content(chunks) != fake.reply_text
    # Input usage from message_start is still reported before the error, as partial: the
    # output count never came.
    assert isinstance(items[-1], PartialUsage) and items[-1].input_tokens == 21
    assert all(isinstance(i, PartialUsage) for i in items if isinstance(i, Usage))
    assert caught.value.status is None and caught.value.retryable
    assert SECRET_PROMPT not in str(caught.value)


async def test_stream_error_event_raises_with_its_status(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.behaviour = "stream_error"
    items: list[Any] = []
    with pytest.raises(UpstreamError) as caught:
        async for item in provider.stream_chat(chat(stream=True)):
            items.append(item)
    assert caught.value.status == 529 and caught.value.retryable
    assert "overloaded_error" in str(caught.value)
    assert joined_content([i for i in items if isinstance(i, dict)])
    assert isinstance(items[-1], Usage)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type", "retryable"),
    [
        (429, "rate_limit_error", True),
        (500, "api_error", True),
        (529, "overloaded_error", True),
        (400, "invalid_request_error", False),
        (403, "permission_error", False),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_http_errors_map_to_upstream_error(
    fake: FakeAnthropic,
    provider: AnthropicProvider,
    status: int,
    error_type: str,
    retryable: bool,
    stream: bool,
) -> None:
    fake.behaviour = f"error_{status}"
    request = chat(SECRET_PROMPT, stream=stream)
    with pytest.raises(UpstreamError) as caught:
        if stream:
            await collect(provider, request)
        else:
            await provider.chat(request)
    error = caught.value
    assert error.status == status and error.retryable is retryable
    assert error_type in str(error)
    # Neither the prompt nor Anthropic's message text may reach the logs.
    assert SECRET_PROMPT not in str(error) and "exceeded" not in str(error)


async def test_wrong_key_is_not_retryable(fake: FakeAnthropic) -> None:
    p = make_provider(fake.url, api_key="sk-ant-wrong")
    try:
        with pytest.raises(UpstreamError) as caught:
            await p.chat(chat())
    finally:
        await p.close()
    assert caught.value.status == 401 and not caught.value.retryable
    assert "authentication_error" in str(caught.value)


async def test_truncated_body_is_a_retryable_error(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.behaviour = "broken"
    with pytest.raises(UpstreamError) as caught:
        await provider.chat(chat())
    assert caught.value.status is None and caught.value.retryable


async def test_read_timeout_raises_upstream_timeout(fake: FakeAnthropic) -> None:
    fake.behaviour = "slow"
    p = make_provider(fake.url, read_timeout_s=0.05)
    try:
        with pytest.raises(UpstreamTimeout):
            await p.chat(chat())
        with pytest.raises(UpstreamTimeout):
            await collect(p, chat(stream=True))
    finally:
        await p.close()


async def test_stalled_stream_times_out_after_partial_output(fake: FakeAnthropic) -> None:
    fake.behaviour = "stall"
    # Long enough for the first events to arrive on a busy machine, short for the stall.
    p = make_provider(fake.url, read_timeout_s=0.3)
    items: list[Any] = []
    try:
        with pytest.raises(UpstreamTimeout):
            async for item in p.stream_chat(chat(stream=True)):
                items.append(item)
    finally:
        await p.close()
    assert joined_content([i for i in items if isinstance(i, dict)])
    assert isinstance(items[-1], Usage) and items[-1].input_tokens == 21


async def test_fake_script_runs_in_order(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.script = ["error_529", "text"]
    with pytest.raises(UpstreamError):
        await provider.chat(chat())
    assert (await provider.chat(chat())).body["choices"][0]["finish_reason"] == "stop"
    assert fake.script == []


async def test_connect_error_is_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = make_provider(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(UpstreamError) as caught:
            await p.chat(chat())
    finally:
        await p.close()
    assert caught.value.status is None and caught.value.retryable
    assert not isinstance(caught.value, UpstreamTimeout)


async def test_check(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    await provider.check()
    assert fake.last_request.method == "GET" and fake.last_request.path == "/v1/models"
    bad = make_provider(fake.url, api_key="sk-ant-wrong")
    try:
        with pytest.raises(UpstreamError) as caught:
            await bad.check()
    finally:
        await bad.close()
    assert caught.value.status == 401


# --- the fake itself -----------------------------------------------------------------------


async def test_fake_rejects_what_anthropic_rejects(fake: FakeAnthropic) -> None:
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    base = {"model": MODEL, "max_tokens": 10}
    cases = [
        (
            {**base, "messages": [{"role": "user", "content": "x"}], "user": "u1"},
            "user: Extra inputs",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (
            {
                **base,
                "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            },
            "alternate",
        ),
    ]
    async with aiohttp.ClientSession() as session:
        for body, message in cases:
            async with session.post(f"{fake.url}/v1/messages", json=body, headers=headers) as r:
                error = await r.json()
            assert r.status == 400
            assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
            assert message in error["error"]["message"]
            assert r.headers["request-id"].startswith("req_")


def test_fake_runs_in_a_thread_for_sync_callers() -> None:
    import urllib.request

    with FakeAnthropic().running_in_thread() as fake:
        request = urllib.request.Request(
            f"{fake.url}/v1/models",
            headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
        )
        with urllib.request.urlopen(request) as response:
            assert orjson.loads(response.read())["data"][0]["type"] == "model"
