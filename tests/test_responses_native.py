"""POST /v1/responses passed through to an OpenAI route that speaks the Responses API
natively (`native_responses = true`), with the official `openai` SDK, unmodified: the fake
upstream gets a real /v1/responses call with nothing of the caller's, the client sees only
ApiFast's ids and the public model name, billing is exact, and fallback before the first
byte still works. A route without the option translates (tests/test_responses_api.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest

from apifast.keys import hash_key
from tests.fakes.openai_responses import REASONING
from tests.fakes.openai_upstream import REPLY, FakeOpenAI
from tests.harness import SECRET, Stack, models_toml, running_stack
from tests.test_responses_api import TOOLS

NATIVE = """
[providers.native]
type = "openai"
base_url = "{url}"
native_responses = true

[[models]]
id = "native-chat"
input_usd_per_mtok = "0.50"
output_usd_per_mtok = "1.50"
routes = [ {{ provider = "native", model = "upstream-native-model" }} ]

[[models]]
id = "native-then-chat"
input_usd_per_mtok = "0.50"
output_usd_per_mtok = "1.50"
routes = [ {{ provider = "native", model = "upstream-native-model" }},
           {{ provider = "local", model = "upstream-model-a" }} ]
"""
IN_PRICE, OUT_PRICE = Decimal("0.50"), Decimal("1.50")
# What the fake upstream puts in its answers that must never reach a client: values, and
# (checked on the wire, where the SDK adds no fields of its own) fields.
UPSTREAM_VALUES = ("UPSTREAM", "upstream-native-model", "gAAAA", "req_upstream")
UPSTREAM_FIELDS = ('"billing"', '"service_tier"', '"obfuscation"', '"encrypted_content"')
CALLER = {"user": "caller-123", "metadata": {"who": "me"}, "safety_identifier": "sid-123",
          "prompt_cache_key": "session-123", "store": True}  # fmt: skip


@pytest.fixture
async def nstack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> AsyncIterator[Stack]:
    settings = stack_settings_factory(
        models_toml(fake_openai.url, NATIVE.format(url=fake_openai.url))
    )
    async with running_stack(settings) as running:
        yield running


def sdk(stack: Stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0)


def _generation(response_id: str) -> str:
    assert response_id.startswith("resp_gen-")
    return response_id[len("resp_") :]


def _priced(usage: Any) -> Decimal:
    return (usage.input_tokens * IN_PRICE + usage.output_tokens * OUT_PRICE) / 1_000_000


async def _debit(stack: Stack, key: str, generation: str) -> Decimal:
    await stack.wait_metered([generation])
    return -Decimal(
        await stack.pool.fetchval(
            "SELECT l.amount_usd FROM ledger l JOIN api_keys k ON k.id = l.key_id"
            " WHERE l.kind = 'usage' AND l.ref = $1 AND k.key_hash = $2",
            generation, hash_key(SECRET.encode(), key),
        )
    )  # fmt: skip


def _assert_hidden(text: str, wire: bool = False) -> None:
    for mark in UPSTREAM_VALUES + (UPSTREAM_FIELDS if wire else ()):
        assert mark not in text, mark


def _assert_clean_upstream_body(sent: dict[str, Any]) -> None:
    assert sent["model"] == "upstream-native-model"
    assert sent["store"] is False
    for name in ("user", "metadata", "safety_identifier", "prompt_cache_key", "service_tier"):
        assert name not in sent, name


async def test_native_non_stream(nstack: Stack, fake_openai: FakeOpenAI) -> None:
    key = await nstack.create_key("1.00")
    raw = await sdk(nstack, key).responses.with_raw_response.create(
        model="native-chat", instructions="Be brief.", input="hello", max_output_tokens=100,
        **CALLER,
    )  # fmt: skip
    response = raw.parse()
    assert fake_openai.chat_requests == 0 and len(fake_openai.responses_requests) == 1
    sent = fake_openai.responses_requests[0]
    _assert_clean_upstream_body(sent)
    assert sent["input"] == "hello" and sent["instructions"] == "Be brief."
    assert sent["max_output_tokens"] == 100 and "stream" not in sent
    assert response.status == "completed" and response.model == "native-chat"
    assert response.store is False and response.user is None and response.metadata == {}
    assert response.output_text == REPLY
    message = response.output[0]
    assert message.type == "message" and message.id.startswith("msg_")
    _assert_hidden(raw.http_response.text, wire=True)
    for header in ("x-request-id", "openai-organization"):
        assert header not in raw.http_response.headers
    usage = response.usage
    assert usage is not None and usage.output_tokens == len(REPLY.split(" "))
    cost = Decimal(str(usage.model_extra["cost"]))  # type: ignore[index]
    assert cost == _priced(usage) > 0
    generation = _generation(response.id)
    assert await _debit(nstack, key, generation) == cost
    rows = await nstack.state.clickhouse.query(
        "SELECT api, input_tokens, output_tokens FROM usage_events"
        " WHERE generation_id = {g:String}", {"g": generation},
    )  # fmt: skip
    assert [(r["api"], r["input_tokens"], r["output_tokens"]) for r in rows] == [
        ("responses", usage.input_tokens, usage.output_tokens)
    ]


async def test_native_stream(nstack: Stack, fake_openai: FakeOpenAI) -> None:
    key = await nstack.create_key("1.00")
    async with sdk(nstack, key).responses.stream(
        model="native-chat", input=[{"role": "user", "content": "hello"}],
        max_output_tokens=100, **CALLER,
    ) as stream:  # fmt: skip
        kinds, deltas = [], []
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    sent = fake_openai.responses_requests[-1]
    _assert_clean_upstream_body(sent)
    assert sent["stream"] is True and fake_openai.chat_requests == 0
    assert kinds[:4] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
    ]  # fmt: skip
    assert kinds[-4:] == [
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert "".join(deltas) == REPLY == final.output_text
    assert final.model == "native-chat" and final.status == "completed"
    assert final.output[0].id.startswith("msg_")
    assert final.usage is not None and final.usage.input_tokens > 0
    cost = Decimal(str(final.usage.model_extra["cost"]))  # type: ignore[index]
    assert cost == _priced(final.usage)
    assert await _debit(nstack, key, _generation(final.id)) == cost


async def test_native_stream_wire(nstack: Stack, fake_openai: FakeOpenAI) -> None:
    """The raw events: numbered from 0 by ApiFast, ids ours, nothing of the upstream's."""
    key = await nstack.create_key("1.00")
    body = {"model": "native-chat", "input": "hi [[reasoning]]", "stream": True}
    async with httpx.AsyncClient(base_url=nstack.base_url, timeout=30) as c:
        r = await c.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200
    events = [orjson.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert "response.reasoning_summary_text.delta" in kinds
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    reasoning, message = final["output"]
    ours = final["id"].removeprefix("resp_gen-")
    assert reasoning["type"] == "reasoning" and reasoning["id"] == f"rs_{ours}00"
    assert reasoning["summary"] == [{"type": "summary_text", "text": REASONING}]
    assert message["id"].startswith("msg_") and message["id"] != reasoning["id"]
    ids = {e.get("item_id") for e in events} - {None}
    assert ids == {reasoning["id"], message["id"]}
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 5
    _assert_hidden(r.text, wire=True)


@pytest.mark.parametrize("stream", [False, True])
async def test_native_function_call_round_trip(
    nstack: Stack, fake_openai: FakeOpenAI, stream: bool
) -> None:
    key = await nstack.create_key("1.00")
    client = sdk(nstack, key)
    fake_openai.behaviour = "tools"
    try:
        if stream:
            async with client.responses.stream(
                model="native-chat",
                input="weather in Paris?",
                tools=TOOLS,  # type: ignore[arg-type]
            ) as events:
                kinds = [e.type async for e in events]
                first = await events.get_final_response()
            assert "response.function_call_arguments.delta" in kinds
            assert "response.function_call_arguments.done" in kinds
        else:
            first = await client.responses.create(
                model="native-chat",
                input="weather in Paris?",
                tools=TOOLS,  # type: ignore[arg-type]
            )
    finally:
        fake_openai.behaviour = "ok"
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and orjson.loads(call.arguments) == {"city": "Paris"}
    assert call.id and call.id.startswith("fc_") and call.call_id.startswith("call_")
    _assert_hidden(first.model_dump_json())
    sent_tools = fake_openai.responses_requests[-1]["tools"]
    assert sent_tools == TOOLS  # untranslated
    second = await client.responses.create(
        model="native-chat", tools=TOOLS,  # type: ignore[arg-type]
        input=[
            {"role": "user", "content": "weather in Paris?"},
            *[item.model_dump(exclude_none=True) for item in first.output],  # as agents do
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )  # fmt: skip
    assert second.status == "completed" and second.output_text == REPLY
    sent = fake_openai.responses_requests[-1]["input"]
    # Our item ids stay here (an upstream that stores nothing would look them up); the
    # call id, ours, pairs the call with its output.
    assert all("id" not in item for item in sent)
    assert sent[1]["type"] == "function_call" and sent[1]["call_id"] == call.call_id
    assert sent[2] == {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}


async def test_native_max_output_tokens_bounded_as_translated(
    nstack: Stack, fake_openai: FakeOpenAI
) -> None:
    """A balance that covers a shorter answer lowers max_output_tokens, says so in the
    header, and the upstream gets exactly that bound; with none asked, the default."""
    key = await nstack.create_key("0.0001")
    raw = await sdk(nstack, key).responses.with_raw_response.create(
        model="native-chat", input="hello"
    )
    lowered = int(raw.http_response.headers["X-ApiFast-Max-Tokens-Lowered"])
    assert fake_openai.responses_requests[-1]["max_output_tokens"] == lowered < 4096
    rich = await nstack.create_key("5.00")
    await sdk(nstack, rich).responses.create(model="native-chat", input="hello")
    assert fake_openai.responses_requests[-1]["max_output_tokens"] == 4096
    response = await sdk(nstack, rich).responses.create(
        model="native-chat", input="hello", max_output_tokens=20
    )
    assert fake_openai.responses_requests[-1]["max_output_tokens"] == 20
    assert (
        response.status == "completed"
    )  # the reply is shorter (tests/test_responses_native_shape.py: incomplete)


async def test_a_bound_below_the_native_minimum_is_translated(
    nstack: Stack, fake_openai: FakeOpenAI
) -> None:
    """The Responses API refuses max_output_tokens below 16 (the fake, as OpenAI does): such
    a request, asked for or lowered by the balance, goes to the route's chat completions
    instead, and is served and billed as usual."""
    key = await nstack.create_key("1.00")
    response = await sdk(nstack, key).responses.create(
        model="native-chat", input="hello", max_output_tokens=2
    )
    assert fake_openai.responses_requests == [] and fake_openai.chat_requests == 1
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens <= 2
    cost = Decimal(str(response.usage.model_extra["cost"]))  # type: ignore[index]
    assert cost == _priced(response.usage)
    assert await _debit(nstack, key, _generation(response.id)) == cost
    # What only a native route honours keeps it, and meets the upstream's own refusal.
    with pytest.raises(openai.BadRequestError):
        await sdk(nstack, key).responses.create(
            model="native-chat", input="hello", max_output_tokens=2, truncation="auto"
        )
    assert len(fake_openai.responses_requests) == 1


async def test_native_refusals_before_any_upstream_call(
    nstack: Stack, fake_openai: FakeOpenAI
) -> None:
    key = await nstack.create_key("1.00")
    client = sdk(nstack, key)
    for extra in ({"previous_response_id": "resp_1"}, {"conversation": "conv_1"},
                  {"background": True}, {"tools": [{"type": "web_search"}]}):  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            await client.responses.create(model="native-chat", input="hi", **extra)  # type: ignore[call-overload]
    assert fake_openai.requests == []


async def test_native_route_honours_what_translation_cannot(
    nstack: Stack, fake_openai: FakeOpenAI
) -> None:
    """truncation "auto" has no chat equivalent (a 400 on a translating route), but a native
    route passes it on; of `include`, only the logprobs the reply shows are asked for."""
    key = await nstack.create_key("1.00")
    client = sdk(nstack, key)
    response = await client.responses.create(
        model="native-chat", input="hi", truncation="auto", top_logprobs=2,
        include=["message.output_text.logprobs", "reasoning.encrypted_content"],
    )  # fmt: skip
    assert response.status == "completed"
    [sent] = fake_openai.responses_requests
    assert sent["truncation"] == "auto" and sent["top_logprobs"] == 2
    assert sent["include"] == ["message.output_text.logprobs"]
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(
            model="native-chat", input="hi", include=["file_search_call.results"]
        )
    assert refused.value.body["param"] == "include[0]"  # type: ignore[index]
    assert len(fake_openai.responses_requests) == 1


async def test_native_failure_mid_stream_is_response_failed(
    nstack: Stack, fake_openai: FakeOpenAI
) -> None:
    key = await nstack.create_key("1.00")
    for marker in ("[[failed]]", "[[broken]]"):
        async with sdk(nstack, key).responses.stream(
            model="native-chat", input=f"hi {marker}"
        ) as stream:
            kinds = []
            async for event in stream:
                kinds.append(event.type)
                if event.type == "response.failed":
                    failed = event.response
                    _assert_hidden(failed.model_dump_json())
                    assert failed.error is not None and "UPSTREAM" not in failed.error.message
        assert kinds[0] == "response.created" and kinds[-1] == "response.failed"


async def test_native_route_falls_back_before_the_first_byte(
    nstack: Stack, fake_openai: FakeOpenAI
) -> None:
    """The native route fails (500) before any byte: the next route, a translating one,
    answers, and the client cannot tell."""
    key = await nstack.create_key("1.00")
    for stream in (False, True):
        fake_openai.fail(500, times=1)
        before = len(fake_openai.responses_requests), fake_openai.chat_requests
        if stream:
            async with sdk(nstack, key).responses.stream(
                model="native-then-chat", input="hello"
            ) as events:
                response = await events.get_final_response()
        else:
            response = await sdk(nstack, key).responses.create(
                model="native-then-chat", input="hello"
            )
        assert response.output_text == REPLY and response.model == "native-then-chat"
        after = len(fake_openai.responses_requests), fake_openai.chat_requests
        assert after == (before[0] + 1, before[1] + 1)
        cost = Decimal(str(response.usage.model_extra["cost"]))  # type: ignore[union-attr,index]
        assert await _debit(nstack, key, _generation(response.id)) == cost


async def test_route_without_the_option_translates(nstack: Stack, fake_openai: FakeOpenAI) -> None:
    key = await nstack.create_key("1.00")
    response = await sdk(nstack, key).responses.create(model="fast-chat", input="hello")
    assert response.output_text == REPLY
    assert fake_openai.chat_requests == 1 and fake_openai.responses_requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_native_usage_not_believed_is_estimated(
    nstack: Stack, fake_openai: FakeOpenAI, stream: bool
) -> None:
    """Counts that are not sane integers are not billed: the documented estimate is, within
    the hold, and the event says so."""
    key = await nstack.create_key("1.00")
    fake_openai.usage_override = {"input_tokens": "many", "output_tokens": -3}
    try:
        if stream:
            async with sdk(nstack, key).responses.stream(
                model="native-chat", input="hello", max_output_tokens=50
            ) as events:
                response = await events.get_final_response()
        else:
            response = await sdk(nstack, key).responses.create(
                model="native-chat", input="hello", max_output_tokens=50
            )
    finally:
        fake_openai.usage_override = None
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0 and 0 < usage.output_tokens <= 50
    cost = Decimal(str(usage.model_extra["cost"]))  # type: ignore[index]
    assert cost == _priced(usage)
    generation = _generation(response.id)
    assert await _debit(nstack, key, generation) == cost
    rows = await nstack.state.clickhouse.query(
        "SELECT usage_estimated FROM usage_events WHERE generation_id = {g:String}",
        {"g": generation},
    )
    assert [bool(r["usage_estimated"]) for r in rows] == [True]


async def test_input_tokens_on_a_native_route_are_the_upstreams_count(
    nstack: Stack, fake_openai: FakeOpenAI
) -> None:
    """`responses.input_tokens.count` on a route speaking the Responses API natively asks
    that upstream's own POST /v1/responses/input_tokens, with the client's prompt fields as
    sent (reasoning and text.format count), nothing of the caller's and none of the sampling
    fields that endpoint refuses. Free: nothing held, nothing metered."""
    key = await nstack.create_key("1.00")
    items: Any = [{"role": "user", "content": [{"type": "input_text", "text": "count me"}]}]
    text: Any = {"format": {"type": "json_object"}}
    counted = await sdk(nstack, key).responses.input_tokens.count(
        model="native-chat", input=items, instructions="Be brief.", tools=TOOLS,
        reasoning={"effort": "low"}, text=text, extra_body={**CALLER, "max_output_tokens": 50,
                                                           "temperature": 0.2},
    )  # fmt: skip
    [sent] = fake_openai.count_requests
    assert sent == {"model": "upstream-native-model", "input": items,
                    "instructions": "Be brief.", "tools": TOOLS,
                    "reasoning": {"effort": "low"}, "text": text}  # fmt: skip
    assert counted.input_tokens == 500 + len(orjson.dumps(items)) // 4
    assert await nstack.pool.fetchval("SELECT count(*) FROM reservations") == 0
    assert not fake_openai.responses_requests


async def test_input_tokens_fall_back_to_the_estimate_when_the_upstream_cannot_count(
    nstack: Stack, fake_openai: FakeOpenAI
) -> None:
    """An upstream that fails the count (an OpenAI-compatible server without the endpoint,
    or one that is down) leaves ApiFast's documented estimate, never its error."""
    key = await nstack.create_key("1.00")
    fake_openai.api_key = "another-key"  # every upstream call now answers 401
    body = orjson.dumps({"model": "native-chat", "input": "how many tokens is this?"})
    async with nstack.client(key) as c:
        r = await c.post("/v1/responses/input_tokens", content=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "response.input_tokens", "input_tokens": -(-len(body) // 4)}
