"""An upstream that omits usage, or sends counts that are not counts (strings, bools, null,
negatives, objects), on every provider and protocol path (chat, messages translated and
native, responses, embeddings), streaming and not (issue 13,
"Usage sanity"): the request is served, billed the documented estimate (docs/billing.md),
marked `usage_estimated`, and the ledger debits exactly the `usage.cost` the client saw."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest

from apifast.plugins.providers.anthropic_messages import usage_from_anthropic
from apifast.plugins.providers.openai_compat import parse_usage
from apifast.providers import Usage
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import REPLY, FakeOpenAI
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
PRICES = {"fast-chat": ("0.50", "1.50"), "claude-chat": ("3.00", "15.00"),
          "embed-small": ("0.02", "0")}  # fmt: skip
CLAUDE_REPLY = FakeAnthropic.reply_text
OMIT = "omit"

# What faulty upstreams send, in each provider's own usage shape. None of it is believed.
OPENAI_FAULTS: list[Any] = [
    OMIT,
    {},
    {"prompt_tokens": "12.5", "completion_tokens": 3, "total_tokens": 15},
    {"prompt_tokens": 12, "completion_tokens": "ten", "total_tokens": 22},
    {"prompt_tokens": None, "completion_tokens": None},
    {"prompt_tokens": True, "completion_tokens": 3},
    {"prompt_tokens": 12, "completion_tokens": -1.5},
    {"prompt_tokens": {"n": 12}, "completion_tokens": [3]},
    {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": "x"}},
    {"prompt_tokens": 12, "completion_tokens": 3, "completion_tokens_details": "garbage"},
    {"total_tokens": 15},
    "garbage",
    [1, 2],
]
ANTHROPIC_FAULTS: list[Any] = [
    OMIT,
    {},
    {"input_tokens": "12.5", "output_tokens": 3},
    {"input_tokens": 12, "output_tokens": "ten"},
    {"input_tokens": None, "output_tokens": None},
    {"input_tokens": False, "output_tokens": 3},
    {"input_tokens": -12, "output_tokens": 3},
    {"input_tokens": 12, "output_tokens": 3, "cache_read_input_tokens": "many"},
    {"input_tokens": [12], "output_tokens": {"n": 3}},
    "garbage",
]


@pytest.fixture
async def fake_claude() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        fake.api_key = "sk-ant-test-key"
        yield fake


@pytest.fixture
async def ustack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> AsyncIterator[Stack]:
    settings = stack_settings_factory(
        models_toml(fake_openai.url, CLAUDE.format(url=fake_claude.url))
    )
    async with running_stack(settings) as running:
        yield running


def _set_fault(fake: FakeOpenAI | FakeAnthropic, fault: Any) -> None:
    fake.omit_usage = fault == OMIT
    fake.usage_override = None if fault == OMIT else fault


def _price(model: str, usage: dict[str, Any]) -> Decimal:
    pin, pout = PRICES[model]
    tokens_in = usage.get("prompt_tokens", usage.get("input_tokens"))
    tokens_out = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return (tokens_in * Decimal(pin) + tokens_out * Decimal(pout)) / 1_000_000


def _sse_json(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def _post(stack: Stack, key: str, api: str, model: str, stream: bool) -> tuple[
    str, dict[str, Any], int, int
]:  # fmt: skip
    """One request; (generation id, the usage the client was shown, body bytes sent, chars
    of content delivered)."""
    if api == "embeddings":
        body: dict[str, Any] = {"model": model, "input": "how long is a piece of string"}
        path = "/v1/embeddings"
    elif api == "responses":
        body = {"model": model, "input": "hello"}
        path = "/v1/responses"
    elif api == "messages":
        body = {"model": model, "max_tokens": 100,
                "messages": [{"role": "user", "content": "hello"}]}  # fmt: skip
        path = "/v1/messages"
    else:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        path = "/v1/chat/completions"
    if stream:
        body["stream"] = True
    raw = orjson.dumps(body)
    async with stack.client(key) as c:
        r = await c.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    reply = CLAUDE_REPLY if model == "claude-chat" else REPLY
    if api == "embeddings":
        return r.json()["id"] if "id" in r.json() else "", r.json()["usage"], len(raw), 0
    if not stream:
        out = r.json()
        prefix = {"messages": "msg_", "responses": "resp_"}.get(api, "")
        generation_id = out["id"][len(prefix) :]
        return generation_id, out["usage"], len(raw), len(reply)
    events = _sse_json(r.text)
    if api == "messages":
        start = next(e for e in events if e.get("type") == "message_start")
        final = [e for e in events if e.get("type") == "message_delta"][-1]
        return start["message"]["id"][len("msg_") :], final["usage"], len(raw), len(reply)
    return events[-1]["id"], events[-1]["usage"], len(raw), len(reply)


async def _embeddings_generation(stack: Stack, before: set[str]) -> str:
    rows = await stack.pool.fetch("SELECT ref FROM ledger WHERE kind = 'usage'")
    (new,) = {r["ref"] for r in rows} - before
    return str(new)


PATHS = [
    ("chat", "fast-chat", False), ("chat", "fast-chat", True),
    ("chat", "claude-chat", False), ("chat", "claude-chat", True),
    ("messages", "claude-chat", False), ("messages", "claude-chat", True),
    ("messages", "fast-chat", False),
    ("responses", "fast-chat", False), ("responses", "claude-chat", False),
    ("embeddings", "embed-small", False),
]  # fmt: skip


@pytest.mark.parametrize(("api", "model", "stream"), PATHS)
async def test_missing_or_garbage_usage_bills_the_documented_estimate(
    ustack: Stack,
    fake_openai: FakeOpenAI,
    fake_claude: FakeAnthropic,
    api: str,
    model: str,
    stream: bool,
) -> None:
    stack = ustack
    claude = model == "claude-chat"
    fake: FakeOpenAI | FakeAnthropic = fake_claude if claude else fake_openai
    faults = ANTHROPIC_FAULTS if claude else OPENAI_FAULTS
    key = await stack.create_key("1.00")
    shown: dict[str, Decimal] = {}
    for fault in faults:
        _set_fault(fake, fault)
        before = {r["ref"] for r in await stack.pool.fetch("SELECT ref FROM ledger")}
        generation_id, usage, sent, chars = await _post(stack, key, api, model, stream)
        tokens_in = usage.get("prompt_tokens", usage.get("input_tokens"))
        # The documented estimate: input = body bytes / 4 within the hold's input bound (for
        # embeddings, the hold's bound: the body's bytes), output = delivered chars / 4.
        if api == "embeddings":
            assert tokens_in == sent, fault
        else:
            tokens_out = usage.get("completion_tokens", usage.get("output_tokens"))
            assert 0 < tokens_in <= math.ceil(sent / 4), fault
            assert tokens_out == math.ceil(chars / 4), fault
        cost = Decimal(str(usage["cost"]))
        assert cost == _price(model, usage) > 0, fault
        if api == "embeddings":
            await stack.wait_until(
                lambda: stack.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'"),
                len([r for r in before if r.startswith("gen-")]) + 1,
            )
            generation_id = await _embeddings_generation(stack, before)
        shown[generation_id] = cost
    assert len(shown) == len(faults)
    await stack.wait_metered(list(shown))
    rows = await stack.pool.fetch(
        "SELECT ref, -amount_usd AS debit FROM ledger WHERE kind = 'usage' AND ref = ANY($1)",
        list(shown),
    )
    assert {r["ref"]: r["debit"] for r in rows} == shown  # debited exactly what was shown
    marked = await stack.state.clickhouse.query(
        "SELECT generation_id, usage_estimated FROM usage_events"
        " WHERE generation_id IN {ids:Array(String)}",
        {"ids": list(shown)},
    )
    assert {r["generation_id"] for r in marked if r["usage_estimated"]} == set(shown)
    balance, reserved = await stack.pool.fetchrow(
        "SELECT balance_usd, reserved_usd FROM api_keys WHERE id = (SELECT key_id FROM ledger"
        " WHERE ref = $1)",
        next(iter(shown)),
    )
    assert balance == Decimal("1.00") - sum(shown.values()) and reserved == 0


def test_usage_parsing_is_total() -> None:
    # Sane counts pass (floats truncated); anything else is no usage, never an exception.
    assert parse_usage({"prompt_tokens": 12.9, "completion_tokens": 3}) == Usage(12, 3)
    assert parse_usage({"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details":
                        None, "completion_tokens_details": {"reasoning_tokens": None}}) == Usage(
        5, 2
    )  # fmt: skip
    assert parse_usage({"prompt_tokens": 9, "prompt_cache_hit_tokens": 4}, completion=False) == (
        Usage(9, 0, cached_tokens=4)
    )
    # Huge but an integer: believed, and the debit is capped at the hold.
    assert parse_usage({"prompt_tokens": 2**70, "completion_tokens": 1}) == Usage(2**70, 1)
    for fault in [*OPENAI_FAULTS[1:], None, 7]:
        assert parse_usage(fault) is None, fault
    assert usage_from_anthropic({"input_tokens": 3, "output_tokens": 2.5,
                                 "cache_read_input_tokens": None}) == Usage(3, 2)  # fmt: skip
    for fault in [*ANTHROPIC_FAULTS[1:], None, 7]:
        assert usage_from_anthropic(fault) is None, fault


def _delivered_text(api: str, events: list[dict[str, Any]]) -> str:
    if api == "messages":
        return "".join(
            e["delta"]["text"] for e in events
            if e.get("type") == "content_block_delta" and e["delta"].get("type") == "text_delta"
        )  # fmt: skip
    return "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices") or ())


@pytest.mark.parametrize("fault", ["broken", "stream_error"])
@pytest.mark.parametrize("api", ["chat", "messages"])
async def test_a_stream_the_upstream_breaks_off_bills_what_was_delivered(
    ustack: Stack, fake_claude: FakeAnthropic, api: str, fault: str
) -> None:
    # Anthropic's message_start reports 1 output token; the real count comes in the last
    # message_delta, which a stream broken off (a dropped connection, an overloaded_error
    # event) never sends. Two long words are delivered first: ~200 tokens, not 1.
    stack = ustack
    fake_claude.reply_text = " ".join(["w" * 399] * 6)
    fake_claude.behaviour = fault
    key = await stack.create_key("1.00")
    body: dict[str, Any] = {"model": "claude-chat", "max_tokens": 4000, "stream": True,
                            "messages": [{"role": "user", "content": "hello"}]}  # fmt: skip
    path = "/v1/messages" if api == "messages" else "/v1/chat/completions"
    async with stack.client(key) as c:
        r = await c.post(path, json=body)
    assert r.status_code == 200, r.text
    events = _sse_json(r.text)
    delivered = _delivered_text(api, events)
    assert len(delivered) == 800  # two deltas, then the break
    (start,) = [e for e in events if e.get("type") == "message_start"] or [{}]
    generation_id = start["message"]["id"][4:] if api == "messages" else events[0]["id"]
    await stack.wait_metered([generation_id])
    debit = await stack.pool.fetchval(
        "SELECT -amount_usd FROM ledger WHERE kind = 'usage' AND ref = $1", generation_id
    )
    # The upstream's input count (21, from message_start), the delivered output estimated.
    expected = _price("claude-chat", {"input_tokens": 21, "output_tokens": 200})
    assert debit == expected
    rows = await stack.state.clickhouse.query(
        "SELECT output_tokens, usage_estimated, outcome FROM usage_events"
        " WHERE generation_id = {id:String}",
        {"id": generation_id},
    )
    assert [(r["output_tokens"], bool(r["usage_estimated"]), r["outcome"]) for r in rows] == [
        (200, True, "upstream_error")
    ]
    reserved = await stack.pool.fetchval(
        "SELECT reserved_usd FROM api_keys WHERE id = (SELECT key_id FROM ledger WHERE ref = $1)",
        generation_id,
    )
    assert reserved == 0


HUGE = 1 << 32  # one more than the usage event's UInt32 columns hold


@pytest.mark.parametrize(
    ("model", "fault"),
    [
        ("fast-chat", {"prompt_tokens": HUGE, "completion_tokens": 1, "total_tokens": HUGE + 1}),
        ("fast-chat", {"prompt_tokens": 5, "completion_tokens": HUGE, "total_tokens": HUGE + 5}),
        ("fast-chat", {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6,
                       "completion_tokens_details": {"reasoning_tokens": HUGE}}),
        ("claude-chat", {"input_tokens": 5, "output_tokens": HUGE}),
    ],
)  # fmt: skip
@pytest.mark.parametrize("stream", [False, True])
async def test_counts_the_usage_event_cannot_carry_bill_the_estimate(
    ustack: Stack,
    fake_openai: FakeOpenAI,
    fake_claude: FakeAnthropic,
    model: str,
    fault: dict[str, Any],
    stream: bool,
) -> None:
    # Believed before: the client was shown a cost, the meter refused the event (a count
    # past its UInt32 column), so the request was never debited and its hold stayed for the
    # whole reservation TTL, blocking the balance.
    stack = ustack
    _set_fault(fake_claude if model == "claude-chat" else fake_openai, fault)
    key = await stack.create_key("1.00")
    generation_id, usage, sent, chars = await _post(stack, key, "chat", model, stream)
    tokens_in, tokens_out = usage["prompt_tokens"], usage["completion_tokens"]
    assert 0 < tokens_in <= math.ceil(sent / 4) and tokens_out == math.ceil(chars / 4)
    shown = Decimal(str(usage["cost"]))
    assert shown == _price(model, usage) > 0
    await stack.wait_metered([generation_id])
    debit = await stack.pool.fetchval(
        "SELECT -amount_usd FROM ledger WHERE kind = 'usage' AND ref = $1", generation_id
    )
    assert debit == shown
    balance, reserved = await stack.pool.fetchrow(
        "SELECT balance_usd, reserved_usd FROM api_keys WHERE id ="
        " (SELECT key_id FROM ledger WHERE ref = $1)",
        generation_id,
    )
    assert balance == Decimal("1.00") - shown and reserved == 0
    rows = await stack.state.clickhouse.query(
        "SELECT usage_estimated FROM usage_events WHERE generation_id = {id:String}",
        {"id": generation_id},
    )
    assert [bool(r["usage_estimated"]) for r in rows] == [True]


@pytest.mark.parametrize("api", ["chat", "messages"])
async def test_a_client_gone_mid_stream_is_billed_the_input_anthropic_reported(
    ustack: Stack, fake_claude: FakeAnthropic, api: str
) -> None:
    # Anthropic reports the whole input in message_start; the byte estimate of a request
    # with an image counts the image's URL (a few tokens), not the image (~2400 here). A
    # client that left after the first words paid the URL's price before.
    stack = ustack
    fake_claude.reply_text = " ".join(["w" * 399] * 6)
    fake_claude.behaviour, fake_claude.delay_s = "stall", 60.0  # waits after two deltas
    fake_claude.input_tokens = 2_400
    image = {"type": "image", "source": {"type": "url", "url": "https://img.invalid/a.png"}}
    content = [image, {"type": "text", "text": "describe it"}]
    if api == "chat":
        content = [{"type": "image_url", "image_url": {"url": "https://img.invalid/a.png"}},
                   {"type": "text", "text": "describe it"}]  # fmt: skip
    body = {"model": "claude-chat", "max_tokens": 4000, "stream": True,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    path = "/v1/messages" if api == "messages" else "/v1/chat/completions"
    key = await stack.create_key("1.00")
    events: list[dict[str, Any]] = []
    async with stack.client(key) as c, c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                events.append(orjson.loads(line[6:]))
            if len(_delivered_text(api, events)) == 800:
                break  # the client goes away mid-stream
    if api == "messages":
        generation_id = events[0]["message"]["id"].removeprefix("msg_")
    else:
        generation_id = events[0]["id"]
    await stack.wait_metered([generation_id])
    rows = await stack.state.clickhouse.query(
        "SELECT input_tokens, output_tokens, usage_estimated, outcome FROM usage_events"
        " WHERE generation_id = {id:String}",
        {"id": generation_id},
    )
    assert [dict(r) for r in rows] == [{"input_tokens": 2_400, "output_tokens": 200,
                                        "usage_estimated": True,
                                        "outcome": "client_disconnect"}]  # fmt: skip
    debit = await stack.pool.fetchval(
        "SELECT -amount_usd FROM ledger WHERE kind = 'usage' AND ref = $1", generation_id
    )
    assert debit == _price("claude-chat", {"input_tokens": 2_400, "output_tokens": 200})
