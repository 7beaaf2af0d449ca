"""No silent drops on the translated protocols (issue 9, §3): a field with an equivalent on
the route's provider is translated to it, a pure hint is accepted, and anything else is a 400
in the protocol's own error shape naming the field, before anything is held or sent
upstream. Also: upstream overload and rate limits reach Anthropic clients as 529 / 429 (the
SDK's OverloadedError / RateLimitError), and message_start carries the prompt's counts."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from apifast.errors import ApiError
from apifast.keys import hash_key
from apifast.providers import UnsupportedParameter
from apifast.router.route_calls import upstream_failure
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

[[models]]
id = "mixed-chat"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "15.00"
routes = [ {{ provider = "local", model = "upstream-model-a" }},
           {{ provider = "claude", model = "claude-upstream-model" }} ]
"""
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def fake_claude() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def pstack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> AsyncIterator[Stack]:
    fake_claude.api_key = "sk-ant-test-key"
    settings = stack_settings_factory(
        models_toml(fake_openai.url, CLAUDE.format(url=fake_claude.url))
    )
    async with running_stack(settings) as running:
        yield running


async def _balance(stack: Stack, key: str) -> Decimal:
    return Decimal(
        await stack.pool.fetchval(
            "SELECT balance_usd FROM api_keys WHERE key_hash = $1", hash_key(SECRET.encode(), key)
        )
    )


async def _messages(stack: Stack, key: str, **body: Any) -> httpx.Response:
    body = {"max_tokens": 50, "messages": HI, **body}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as c:
        return await c.post("/v1/messages", json=body, headers={"x-api-key": key})


async def _post(stack: Stack, path: str, key: str, body: dict[str, Any]) -> httpx.Response:
    async with stack.client(key) as c:
        return await c.post(path, json=body)


def _anthropic_400(r: httpx.Response, field: str) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(f"{field}:"), body


async def _nothing_held_or_sent(
    stack: Stack, key: str, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> None:
    assert fake_openai.requests == [] and fake_claude.requests == []
    assert await stack.pool.fetchval("SELECT count(*) FROM reservations") == 0
    assert await _balance(stack, key) == Decimal("1.00")


# --- /v1/messages on an OpenAI-shaped route ----------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"top_k": 5}, "top_k"),
        ({"temperature": 1.5}, "temperature"),
        ({"top_p": 1.2}, "top_p"),
        ({"mcp_servers": [{"type": "url", "url": "https://mcp.invalid", "name": "x"}]},
         "mcp_servers"),
        ({"container": "container_123"}, "container"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"thinking": {"type": "adaptive"}}, "thinking.type"),
        ({"messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                            "data": "a document"}}]}]},
         "messages[0].content[0].type"),
        ({"messages": [
            {"role": "user", "content": "look it up"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "search_result", "title": "t",
                                                       "source": "s", "content": []}]}]},
        ]}, "messages[2].content[0].content[0].type"),
    ],
)  # fmt: skip
async def test_messages_without_equivalent_are_refused_before_the_hold(
    pstack: Stack,
    fake_openai: FakeOpenAI,
    fake_claude: FakeAnthropic,
    fields: dict[str, Any],
    field: str,
) -> None:
    key = await pstack.create_key("1.00")
    _anthropic_400(await _messages(pstack, key, model="fast-chat", **fields), field)
    await _nothing_held_or_sent(pstack, key, fake_openai, fake_claude)


async def test_messages_sdk_sees_a_bad_request_naming_the_field(pstack: Stack) -> None:
    key = await pstack.create_key("1.00")
    client = anthropic.AsyncAnthropic(api_key=key, base_url=pstack.base_url, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(
            model="fast-chat", max_tokens=10, messages=HI,  # type: ignore[arg-type]
            extra_body={"top_k": 3},
        )  # fmt: skip
    assert "top_k" in str(caught.value)


async def test_messages_equivalents_reach_the_openai_upstream(
    pstack: Stack, fake_openai: FakeOpenAI
) -> None:
    key = await pstack.create_key("1.00")
    tools = [{"name": "shot", "input_schema": {"type": "object", "properties": {}}}]
    r = await _messages(
        pstack, key, model="fast-chat", tools=tools, service_tier="auto",
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        thinking={"type": "enabled", "budget_tokens": 5000},
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": "take a screenshot"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                    {"type": "text", "text": "here it is"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": PNG}},
                ], "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "what do you see?",
                 "cache_control": {"type": "ephemeral"}},
            ]},
        ],
    )  # fmt: skip
    assert r.status_code == 200, r.text
    sent = fake_openai.requests[-1]
    assert sent["parallel_tool_calls"] is False and sent["tool_choice"] == "auto"
    assert sent["reasoning_effort"] == "medium"  # budget 5000: medium (4096..16383)
    assert "service_tier" not in sent and "cache_control" not in orjson.dumps(sent).decode()
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    # The tool result's text in the tool message, its image in the user turn after it.
    assert sent["messages"][3] == {"role": "tool", "tool_call_id": "toolu_1",
                                   "content": "here it is"}  # fmt: skip
    assert sent["messages"][4] == {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "text", "text": "what do you see?"},
    ]}  # fmt: skip


async def test_a_native_only_field_picks_the_native_route(
    pstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> None:
    """mixed-chat's first route is OpenAI-shaped: top_k passes it over for the Anthropic
    route, where it passes through."""
    key = await pstack.create_key("1.00")
    r = await _messages(pstack, key, model="mixed-chat", top_k=7)
    assert r.status_code == 200, r.text
    assert fake_openai.requests == [] and fake_claude.last_request.body["top_k"] == 7


# --- the Anthropic route (chat completions and /v1/responses translated to it) ----------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"n": 2}, "n"), ({"temperature": 1.7}, "temperature"),
     ({"temperature": 0.5, "top_p": 0.5}, "top_p"), ({"logprobs": True}, "logprobs")],
)  # fmt: skip
async def test_chat_to_anthropic_refuses_what_it_cannot_express(
    pstack: Stack,
    fake_openai: FakeOpenAI,
    fake_claude: FakeAnthropic,
    fields: dict[str, Any],
    field: str,
) -> None:
    key = await pstack.create_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=pstack.base_url + "/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="claude-chat", messages=HI, **fields)  # type: ignore[call-overload]
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == field
    assert error["code"] == "unsupported_parameter"
    await _nothing_held_or_sent(pstack, key, fake_openai, fake_claude)


async def test_responses_to_anthropic_refuses_temperature_above_one(
    pstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> None:
    key = await pstack.create_key("1.00")
    r = await _post(pstack, "/v1/responses", key,
                    {"model": "claude-chat", "input": "hi", "temperature": 1.5})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    await _nothing_held_or_sent(pstack, key, fake_openai, fake_claude)


async def test_a_field_one_route_cannot_express_goes_to_the_other(
    pstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> None:
    key = await pstack.create_key("1.00")
    body = {"model": "mixed-chat", "messages": HI, "temperature": 1.5, "top_p": 0.5}
    r = await _post(pstack, "/v1/chat/completions", key, body)
    assert r.status_code == 200, r.text
    assert fake_claude.requests == [] and fake_openai.requests[-1]["temperature"] == 1.5


async def test_reasoning_minimal_is_answered_without_thinking(
    pstack: Stack, fake_claude: FakeAnthropic
) -> None:
    key = await pstack.create_key("1.00")
    body = {"model": "claude-chat", "input": "hi", "reasoning": {"effort": "minimal"}}
    r = await _post(pstack, "/v1/responses", key, body)
    assert r.status_code == 200, r.text
    assert "thinking" not in fake_claude.last_request.body


async def test_a_refusal_found_only_by_the_provider_is_a_400_and_the_hold_is_freed(
    pstack: Stack, fake_claude: FakeAnthropic
) -> None:
    """Past the check before the hold (a plugin that checks only when called): the client
    still gets a 400 naming the field, never a 502, and the hold goes back."""
    key = await pstack.create_key("1.00")
    provider = pstack.state.providers["claude"]
    provider.check_request = lambda request: None  # type: ignore[method-assign]
    r = await _post(pstack, "/v1/chat/completions", key,
                    {"model": "claude-chat", "messages": HI, "n": 2})  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "n" and fake_claude.requests == []

    async def held() -> int:
        return int(await pstack.pool.fetchval("SELECT count(*) FROM reservations"))

    await pstack.wait_until(held, 0)
    assert await _balance(pstack, key) == Decimal("1.00")


def test_upstream_failure_names_the_unsupported_field() -> None:
    error = upstream_failure(UnsupportedParameter("top_k", "no such thing here"))
    assert (error.status, error.param) == (400, "top_k")


# --- /v1/responses translated ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"include": ["file_search_call.results"]}, "include[0]"),
     ({"include": ["reasoning.encrypted_content", "message.input_image.image_url"]},
      "include[1]"),
     ({"truncation": "auto"}, "truncation"), ({"top_logprobs": 30}, "top_logprobs"),
     ({"service_tier": "flex"}, "service_tier"), ({"max_tool_calls": 0}, "max_tool_calls")],
)  # fmt: skip
async def test_responses_without_equivalent_are_refused_before_the_hold(
    pstack: Stack,
    fake_openai: FakeOpenAI,
    fake_claude: FakeAnthropic,
    fields: dict[str, Any],
    field: str,
) -> None:
    key = await pstack.create_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=pstack.base_url + "/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="fast-chat", input="hi", **fields)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == field, error
    await _nothing_held_or_sent(pstack, key, fake_openai, fake_claude)


async def test_responses_hints_are_accepted(pstack: Stack, fake_openai: FakeOpenAI) -> None:
    key = await pstack.create_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=pstack.base_url + "/v1", max_retries=0)
    response = await client.responses.create(
        model="fast-chat", input="hi", include=["reasoning.encrypted_content"],
        truncation="disabled", top_logprobs=0, max_tool_calls=2, service_tier="default",
    )  # fmt: skip
    assert response.status == "completed" and response.truncation == "disabled"
    sent = fake_openai.requests[-1]
    for name in ("include", "truncation", "top_logprobs", "max_tool_calls", "service_tier"):
        assert name not in sent


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_logprobs_are_chats_logprobs(
    pstack: Stack, fake_openai: FakeOpenAI, stream: bool
) -> None:
    key = await pstack.create_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=pstack.base_url + "/v1", max_retries=0)
    asked: dict[str, Any] = {"model": "fast-chat", "input": "hi", "top_logprobs": 2,
                             "include": ["message.output_text.logprobs"]}  # fmt: skip
    if stream:
        deltas = []
        async with client.responses.stream(**asked) as events:
            async for event in events:
                if event.type == "response.output_text.delta":
                    deltas.extend(event.logprobs)
            response = await events.get_final_response()
        assert [d.token for d in deltas] == [
            t.token
            for t in response.output[0].content[0].logprobs  # type: ignore[union-attr]
        ]
    else:
        response = await client.responses.create(**asked)
    sent = fake_openai.requests[-1]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2
    logprobs = response.output[0].content[0].logprobs  # type: ignore[union-attr]
    assert logprobs and "".join(t.token for t in logprobs) == response.output_text
    assert all(len(t.top_logprobs) == 2 and t.logprob == -0.25 for t in logprobs)


async def test_responses_verbosity_is_chats_verbosity(
    pstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> None:
    key = await pstack.create_key("1.00")
    body = {"model": "fast-chat", "input": "hi", "text": {"verbosity": "low"}}
    r = await _post(pstack, "/v1/responses", key, body)
    assert r.status_code == 200, r.text
    assert fake_openai.requests[-1]["verbosity"] == "low"
    r = await _post(pstack, "/v1/responses", key, {**body, "model": "claude-chat"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "verbosity"
    assert fake_claude.requests == []


async def test_responses_logprobs_on_anthropic_are_refused(
    pstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> None:
    key = await pstack.create_key("1.00")
    r = await _post(pstack, "/v1/responses", key,
                    {"model": "claude-chat", "input": "hi", "top_logprobs": 2})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    await _nothing_held_or_sent(pstack, key, fake_openai, fake_claude)


# --- overload and rate limits ----------------------------------------------------------------


def test_apifast_own_503s_are_529_overloaded_in_anthropic_shape() -> None:
    error = ApiError(503, "Usage metering is backed up.", code="metering_unavailable",
                     headers={"Retry-After": "5"})  # fmt: skip
    response = error.response(anthropic=True)
    assert response.status_code == 529 and response.headers["retry-after"] == "5"
    assert orjson.loads(response.body)["error"]["type"] == "overloaded_error"
    assert error.response().status_code == 503  # OpenAI's shape keeps 503


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
async def test_overloaded_upstream_is_overloaded_error(
    pstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, model: str
) -> None:
    key = await pstack.create_key("1.00")
    fake_openai.fail(503, times=1)
    fake_claude.script = ["error_529"]
    client = anthropic.AsyncAnthropic(api_key=key, base_url=pstack.base_url, max_retries=0)
    with pytest.raises(anthropic.OverloadedError) as caught:
        await client.messages.create(model=model, max_tokens=10, messages=HI)  # type: ignore[arg-type]
    assert caught.value.status_code == 529
    text = caught.value.response.text
    assert "UPSTREAM" not in text and "Overloaded" not in text
    assert "x-should-retry" not in caught.value.response.headers
    assert "x-request-id" not in caught.value.response.headers


@pytest.mark.parametrize("model", ["fast-chat", "claude-chat"])
async def test_rate_limited_upstream_is_rate_limit_error(
    pstack: Stack, fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, model: str
) -> None:
    key = await pstack.create_key("1.00")
    fake_openai.fail(429, times=1, retry_after="7")
    fake_claude.script = ["error_429"]  # with retry-after: 1
    client = anthropic.AsyncAnthropic(api_key=key, base_url=pstack.base_url, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(model=model, max_tokens=10, messages=HI)  # type: ignore[arg-type]
    response = caught.value.response
    assert response.headers["retry-after"] == ("7" if model == "fast-chat" else "1")
    assert "UPSTREAM" not in response.text and "rate limit," not in response.text
    assert "x-ratelimit-remaining-requests" not in response.headers


async def test_other_upstream_failures_stay_502_api_error(
    pstack: Stack, fake_claude: FakeAnthropic
) -> None:
    key = await pstack.create_key("1.00")
    fake_claude.script = ["error_500"]
    r = await _messages(pstack, key, model="claude-chat")
    assert r.status_code == 502 and r.json()["error"]["type"] == "api_error"


async def test_chat_answers_502_for_upstreams_that_all_failed(
    pstack: Stack, fake_openai: FakeOpenAI
) -> None:
    """OpenAI's shape keeps the gateway's 502 when every route failed, rate limits and
    overload included; the code says which, and Retry-After is ApiFast's own."""
    key = await pstack.create_key("1.00")
    client = openai.AsyncOpenAI(api_key=key, base_url=pstack.base_url + "/v1", max_retries=0)
    fake_openai.fail(503, times=1)
    with pytest.raises(openai.InternalServerError) as overloaded:
        await client.chat.completions.create(model="fast-chat", messages=HI)  # type: ignore[arg-type]
    assert overloaded.value.status_code == 502
    assert overloaded.value.body["code"] == "upstream_overloaded"  # type: ignore[index]
    assert "retry-after" not in overloaded.value.response.headers  # the upstream named none
    # Last: its Retry-After benches the route.
    fake_openai.fail(429, times=1, retry_after="7")
    with pytest.raises(openai.InternalServerError) as limited:
        await client.chat.completions.create(model="fast-chat", messages=HI)  # type: ignore[arg-type]
    assert limited.value.status_code == 502
    assert limited.value.body["code"] == "upstream_rate_limited"  # type: ignore[index]
    assert limited.value.response.headers["retry-after"] == "7"


# --- message_start usage -----------------------------------------------------------------------


def _events(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


async def test_message_start_reports_the_native_routes_input_counts(
    pstack: Stack, fake_claude: FakeAnthropic
) -> None:
    key = await pstack.create_key("1.00")
    fake_claude.behaviour = "cache"
    r = await _messages(pstack, key, model="claude-chat", stream=True)
    assert r.status_code == 200
    start = _events(r.text)[0]
    assert start["type"] == "message_start"
    assert start["message"]["usage"] == {
        "input_tokens": fake_claude.input_tokens,
        "cache_creation_input_tokens": fake_claude.cache_creation_tokens,
        "cache_read_input_tokens": fake_claude.cache_read_tokens,
        "output_tokens": 1,
    }


async def test_message_start_on_a_translated_route(pstack: Stack) -> None:
    """The prompt's count is known only from the upstream's final usage: 0 at the start,
    the real count in message_delta."""
    key = await pstack.create_key("1.00")
    r = await _messages(pstack, key, model="fast-chat", stream=True)
    events = _events(r.text)
    assert events[0]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 1,
                                             "cache_creation_input_tokens": 0,
                                             "cache_read_input_tokens": 0}  # fmt: skip
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["usage"]["input_tokens"] > 0
