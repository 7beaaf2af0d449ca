"""A faulty or hostile upstream, on every client protocol (chat, messages, responses,
embeddings), streaming and not, translated and native (issue 13, "Usage sanity" and "Every
hold is released on every path"):

- counts no double can hold (an integer of 400 digits, either sign) and counts past 64 bits,
  which made a served answer a 502 (orjson refuses the former): served, billed the estimate;
- counts past the model's context window (the documented sane bound): the estimate, not an
  overage;
- answers that are not the wire format: a non-JSON body, an array, choices or content that
  are not objects, malformed SSE lines, a stream without its end, usage on a non-final or a
  duplicated chunk.

Each case: the client gets an answer or an error in its protocol's shape with nothing of the
upstream's, no hold outlives the request, nothing is debited beyond the hold (no upstream
overage), and what is debited is exactly the `usage.cost` the client was shown."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest

from apifast.keys import hash_key
from apifast.plugins.providers.openai_responses import responses_usage
from apifast.plugins.providers.upstream_json import loads
from apifast.providers import Usage
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.wire_json import dumps
from tests.harness import SECRET, Stack, models_toml, running_stack

WINDOW = 5_000  # claude-chat's and native-chat's context window
EXTRA = """
[providers.claude]
type = "anthropic"
base_url = "{claude}"
api_key = "sk-ant-test-key"

[providers.native]
type = "openai"
base_url = "{openai}"
native_responses = true

[[models]]
id = "claude-chat"
input_usd_per_mtok = "3.00"
output_usd_per_mtok = "15.00"
context_window = {window}
routes = [ {{ provider = "claude", model = "claude-upstream-model" }} ]

[[models]]
id = "native-chat"
input_usd_per_mtok = "0.50"
output_usd_per_mtok = "1.50"
context_window = {window}
routes = [ {{ provider = "native", model = "upstream-native-model" }} ]
"""
# What of the fakes' answers must never reach a client.
LEAKS = ("UPSTREAM", "upstream-model", "claude-upstream", "upstream-native", "msg_X", "resp_X",
         "Traceback", "SECRET")  # fmt: skip


@pytest.fixture
async def fake_claude() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        fake.api_key = "sk-ant-test-key"
        yield fake


@pytest.fixture
async def hstack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI, fake_claude: FakeAnthropic
) -> AsyncIterator[Stack]:
    extra = EXTRA.format(claude=fake_claude.url, openai=fake_openai.url, window=WINDOW)
    async with running_stack(stack_settings_factory(models_toml(fake_openai.url, extra))) as s:
        yield s


def _request(api: str, model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    if api == "embeddings":
        return "/v1/embeddings", {"model": model, "input": "how long is a piece of string"}
    if api == "responses":
        path, body = "/v1/responses", {"model": model, "input": "hello"}
    elif api == "messages":
        body = {"model": model, "max_tokens": 100,
                "messages": [{"role": "user", "content": "hello"}]}  # fmt: skip
        path = "/v1/messages"
    else:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
        path = "/v1/chat/completions"
        if stream:
            body["stream_options"] = {"include_usage": True}
    if stream:
        body["stream"] = True
    return path, body


def _shown_cost(text: str) -> Decimal | None:
    """The last `usage.cost` in an answer or a stream's events, as the client read it."""
    found: list[Any] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            usage = value.get("usage")
            if isinstance(usage, dict) and "cost" in usage:
                found.append(usage["cost"])
            for inner in value.values():
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    lines = [line[6:] for line in text.splitlines() if line.startswith("data: {")]
    for raw in lines or [text]:
        walk(orjson.loads(raw))
    return Decimal(str(found[-1])) if found else None


async def _served(stack: Stack, api: str, model: str, stream: bool) -> tuple[Any, str]:
    """One request with a new key; (the response, the key's hash)."""
    key = await stack.create_key("1.00")
    path, body = _request(api, model, stream)
    async with stack.client(key) as c:
        r = await c.post(path, json=body)
    for leak in LEAKS:
        assert leak not in r.text, (leak, r.text)
    return r, hash_key(SECRET.encode(), key).hex()


async def _settled(stack: Stack, key_hash: str) -> tuple[Decimal, str | None]:
    """Once no hold of the key is left: its debit and the generation debited (None: none)."""
    row = await stack.pool.fetchrow(
        "SELECT id, balance_usd FROM api_keys WHERE key_hash = $1", bytes.fromhex(key_hash)
    )
    holds = "SELECT count(*) FROM reservations WHERE key_id = $1"
    await stack.wait_until(lambda: stack.pool.fetchval(holds, row["id"]), 0)
    reserved = "SELECT reserved_usd FROM api_keys WHERE id = $1"
    await stack.wait_until(lambda: stack.pool.fetchval(reserved, row["id"]), Decimal(0))
    debit = await stack.pool.fetchrow(
        "SELECT ref, -amount_usd AS usd FROM ledger WHERE kind = 'usage' AND key_id = $1",
        row["id"],
    )
    # Nothing reported beyond the hold: the debit is within it with nothing capped.
    assert await stack.pool.fetchval("SELECT count(*) FROM usage_overages") == 0
    balance = await stack.pool.fetchval("SELECT balance_usd FROM api_keys WHERE id = $1", row["id"])
    if debit is None:
        assert balance == Decimal("1.00")
        return Decimal(0), None
    assert balance == Decimal("1.00") - debit["usd"] >= 0
    return Decimal(debit["usd"]), str(debit["ref"])


async def _estimated(stack: Stack, generation_id: str) -> bool:
    await stack.wait_metered([generation_id])
    rows = await stack.state.clickhouse.query(
        "SELECT usage_estimated FROM usage_events WHERE generation_id = {id:String}",
        {"id": generation_id},
    )
    (row,) = rows
    return bool(row["usage_estimated"])


PATHS = [
    ("chat", "fast-chat", False), ("chat", "fast-chat", True),
    ("chat", "claude-chat", False), ("chat", "claude-chat", True),
    ("messages", "claude-chat", False), ("messages", "claude-chat", True),  # native
    ("messages", "fast-chat", False), ("messages", "fast-chat", True),
    ("responses", "fast-chat", False), ("responses", "fast-chat", True),
    ("responses", "claude-chat", False), ("responses", "claude-chat", True),
    ("responses", "native-chat", False), ("responses", "native-chat", True),  # native
    ("embeddings", "embed-small", False),
]  # fmt: skip


def _report(fake_openai: FakeOpenAI, fake_claude: FakeAnthropic, model: str, count: int) -> None:
    """Make the upstream of `model` report `count` (input for chat, output elsewhere)."""
    if model == "claude-chat":
        fake_claude.usage_override = {"input_tokens": 5, "output_tokens": count}
    elif model == "native-chat":
        fake_openai.usage_override = {"input_tokens": 5, "output_tokens": count,
                                      "total_tokens": 5}  # fmt: skip
    else:
        fake_openai.usage_override = {"prompt_tokens": count, "completion_tokens": 1,
                                      "total_tokens": 1}  # fmt: skip


@pytest.mark.parametrize(("api", "model", "stream"), PATHS)
async def test_counts_beyond_any_number_are_served_and_billed_the_estimate(
    hstack: Stack,
    fake_openai: FakeOpenAI,
    fake_claude: FakeAnthropic,
    api: str,
    model: str,
    stream: bool,
) -> None:
    # 10**400 is past what a double holds: orjson refused the whole answer, so it was a 502
    # (the stream an error after its content), though the upstream had served it.
    for count in (10**400, -(10**400), 2**64, -(2**64)):
        _report(fake_openai, fake_claude, model, count)
        r, key_hash = await _served(hstack, api, model, stream)
        assert r.status_code == 200, (count, r.text)
        for failed in ('"type":"error"', "upstream_error", "response.failed"):
            assert failed not in r.text, (count, r.text)
        debit, generation_id = await _settled(hstack, key_hash)
        assert generation_id is not None and debit == _shown_cost(r.text) > 0, count
        assert await _estimated(hstack, generation_id), count


@pytest.mark.parametrize(
    ("api", "model", "stream"),
    [("chat", "claude-chat", False), ("messages", "claude-chat", True),
     ("responses", "native-chat", False), ("responses", "native-chat", True)],
)  # fmt: skip
async def test_a_count_past_the_context_window_is_not_believed(
    hstack: Stack,
    fake_openai: FakeOpenAI,
    fake_claude: FakeAnthropic,
    api: str,
    model: str,
    stream: bool,
) -> None:
    # One past the window no model can write: the estimate, not a $0.075 overage that no
    # upstream could have served. At the window it is believed (and capped at the hold).
    _report(fake_openai, fake_claude, model, WINDOW + 1)
    r, key_hash = await _served(hstack, api, model, stream)
    assert r.status_code == 200, r.text
    debit, generation_id = await _settled(hstack, key_hash)
    assert generation_id is not None and debit == _shown_cost(r.text) > 0
    assert await _estimated(hstack, generation_id)

    _report(fake_openai, fake_claude, model, 30)  # beyond no hold: believed as reported
    r, key_hash = await _served(hstack, api, model, stream)
    debit, generation_id = await _settled(hstack, key_hash)
    assert generation_id is not None and not await _estimated(hstack, generation_id)
    price = Decimal("15.00") if model == "claude-chat" else Decimal("1.50")
    assert debit == _shown_cost(r.text) >= 30 * price / 1_000_000


def _j(value: Any) -> bytes:
    return dumps(value)


def _sse(*events: Any, done: bool = True) -> list[bytes]:
    out = [b"data: " + (e if isinstance(e, bytes) else _j(e)) + b"\n\n" for e in events]
    return out + ([b"data: [DONE]\n\n"] if done else [])


def _event(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + (
        data if isinstance(data, bytes) else _j(data)
    ) + b"\n\n"  # fmt: skip


_CHUNK = {"id": "chatcmpl-UPSTREAM", "object": "chat.completion.chunk", "model": "m"}
_USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
_USAGE_CHUNK = {**_CHUNK, "choices": [], "usage": _USAGE}
_MSG = {"id": "msg_X", "type": "message", "role": "assistant", "model": "m",
        "stop_reason": "end_turn", "stop_sequence": None}  # fmt: skip
_AU = {"input_tokens": 5, "output_tokens": 3}
_RESP = {"id": "resp_X", "object": "response", "status": "completed", "model": "m"}
_RU = {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}


def _chunk(delta: Any = None, **fields: Any) -> dict[str, Any]:
    delta = {"content": "hi there"} if delta is None else delta
    return {**_CHUNK, "choices": [{"index": 0, "delta": delta, "finish_reason": None}], **fields}


def _claude_stream(usage: Any = _AU, stop: bool = True, delta: Any = None) -> list[bytes]:
    delta = {"type": "text_delta", "text": "hi there"} if delta is None else delta
    start = {**_MSG, "content": [], "stop_reason": None, "usage": _AU}
    out = [
        _event("message_start", {"type": "message_start", "message": start}),
        _event("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
        _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": delta}),
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event("message_delta", {"type": "message_delta", "usage": usage,
                                 "delta": {"stop_reason": "end_turn", "stop_sequence": None}}),
    ]  # fmt: skip
    return out + ([_event("message_stop", {"type": "message_stop"})] if stop else [])


def _responses_stream(terminal: bool = True, extra: tuple[bytes, ...] = ()) -> list[bytes]:
    started = {**_RESP, "status": "in_progress", "output": []}
    delta = {"type": "response.output_text.delta", "item_id": "m1", "output_index": 0,
             "content_index": 0, "delta": "hi there"}  # fmt: skip
    done = {"type": "response.completed", "response": {**_RESP, "output": [], "usage": _RU}}
    out = [_event("response.created", {"type": "response.created", "response": started}),
           *extra, _event(delta["type"], delta)]  # fmt: skip
    return out + ([_event(done["type"], done)] if terminal else [])


SERVED, ERROR, STREAM_ERROR = "served", "error", "stream error"
# (api, model, stream, what the upstream answers with HTTP 200, what the client gets)
RAW: list[tuple[str, str, bool, Any, str]] = [
    ("chat", "fast-chat", False, b"not json", ERROR),
    ("chat", "fast-chat", False, b"[1, 2]", ERROR),
    # Passed through as they came before: a chat answer whose choices no SDK reads.
    ("chat", "fast-chat", False, _j({"choices": [7]}), ERROR),
    ("chat", "fast-chat", False, _j({"choices": [{"index": 0, "message": 7}]}), ERROR),
    ("messages", "fast-chat", False, _j({"choices": ["x"]}), ERROR),
    ("responses", "fast-chat", False, _j({"choices": [None]}), ERROR),
    ("embeddings", "embed-small", False, b"[1]", ERROR),
    ("embeddings", "embed-small", False, b"nope", ERROR),
    ("chat", "fast-chat", True, _sse(_chunk(), _USAGE_CHUNK, done=False), STREAM_ERROR),
    ("chat", "fast-chat", True, _sse(_chunk(), b"{bad", _USAGE_CHUNK), STREAM_ERROR),
    ("chat", "fast-chat", True, [b"no field\n: comment\nid: 3\n\n", *_sse(_chunk(), _USAGE_CHUNK)],
     SERVED),
    ("chat", "fast-chat", True, _sse(_chunk(usage=_USAGE), _chunk(), _chunk()), SERVED),
    ("chat", "fast-chat", True, _sse(_chunk(), _USAGE_CHUNK, _USAGE_CHUNK), SERVED),
    ("chat", "fast-chat", True, _sse([1], _chunk(), _USAGE_CHUNK), SERVED),
    ("chat", "fast-chat", True, _sse(_chunk(), {**_CHUNK, "choices": [7]}), STREAM_ERROR),
    ("chat", "fast-chat", True, _sse(_chunk(), _chunk(7), _USAGE_CHUNK), STREAM_ERROR),
    ("messages", "fast-chat", True, _sse(_chunk(), _chunk("x")), STREAM_ERROR),
    ("responses", "fast-chat", True, _sse(_chunk(), {**_CHUNK, "choices": 7}), STREAM_ERROR),
    ("chat", "fast-chat", True, [b"not sse at all"], ERROR),
    ("chat", "fast-chat", True, [], ERROR),
    ("messages", "claude-chat", False, b"not json", ERROR),
    ("messages", "claude-chat", False, b"[1]", ERROR),
    # Passed through natively before: a 200 "message" of no message at all, billed.
    ("messages", "claude-chat", False, _j({"type": "error", "usage": _AU}), ERROR),
    ("messages", "claude-chat", False, _j({**_MSG, "content": [7], "usage": _AU}), ERROR),
    ("messages", "claude-chat", False, _j({**_MSG, "content": "hi", "usage": _AU}), ERROR),
    ("chat", "claude-chat", False, _j({**_MSG, "content": [7], "usage": _AU}), ERROR),
    ("messages", "claude-chat", True, _claude_stream(stop=False), STREAM_ERROR),
    ("messages", "claude-chat", True, _claude_stream({"output_tokens": -5}), SERVED),
    ("messages", "claude-chat", True, _claude_stream({"output_tokens": 2**70}), SERVED),
    ("messages", "claude-chat", True, _claude_stream({"output_tokens": 10**400}), SERVED),
    ("messages", "claude-chat", True,
     _claude_stream({"output_tokens": 3, "cache_read_input_tokens": -1}), SERVED),
    ("messages", "claude-chat", True,
     _claude_stream({"output_tokens": 3, "cache_creation_input_tokens": 2**40}), SERVED),
    ("messages", "claude-chat", True, _claude_stream("x"), SERVED),
    ("messages", "claude-chat", True, _claude_stream(delta=7), STREAM_ERROR),
    ("messages", "claude-chat", True, [_event("message_start", b"{bad")], ERROR),
    ("chat", "claude-chat", True, _claude_stream(stop=False), STREAM_ERROR),
    ("chat", "claude-chat", True, _claude_stream({"output_tokens": True}), SERVED),
    ("responses", "native-chat", False, b"nope", ERROR),
    ("responses", "native-chat", False, b"[1]", ERROR),
    ("responses", "native-chat", False, _j({**_RESP, "output": [7], "usage": _RU}), SERVED),
    # A 500 before, for an answer the upstream had served: content that is not a list, read
    # for the estimate its usage (not believed) calls for.
    ("responses", "native-chat", False,
     _j({**_RESP, "output": [{"type": "message", "content": 7}],
         "usage": {"input_tokens": 1.5, "output_tokens": "x"}}), SERVED),
    ("responses", "native-chat", False, _j({**_RESP, "output": [], "usage": {
        "input_tokens": 5, "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 99},
        "input_tokens_details": {"cached_tokens": -4}}}), SERVED),
    ("responses", "native-chat", True, _responses_stream(terminal=False), STREAM_ERROR),
    ("responses", "native-chat", True, _responses_stream(extra=(_event("x", b"{bad"),)),
     STREAM_ERROR),
    ("responses", "native-chat", True, _responses_stream(extra=(_event("x", b"[1]"),)), SERVED),
    ("responses", "native-chat", True, [*_responses_stream(), *_responses_stream()], SERVED),
]  # fmt: skip


@pytest.mark.parametrize(
    ("api", "model", "stream", "raw", "outcome"), RAW,
    ids=[f"{i}-{c[0]}-{c[1]}-{'stream' if c[2] else 'json'}" for i, c in enumerate(RAW)],
)  # fmt: skip
async def test_an_answer_that_is_not_the_wire_format(
    hstack: Stack,
    fake_openai: FakeOpenAI,
    fake_claude: FakeAnthropic,
    api: str,
    model: str,
    stream: bool,
    raw: Any,
    outcome: str,
) -> None:
    (fake_claude if model == "claude-chat" else fake_openai).raw_answer = raw
    r, key_hash = await _served(hstack, api, model, stream)
    debit, generation_id = await _settled(hstack, key_hash)
    if outcome == ERROR:
        assert r.status_code == 502, r.text
        error = r.json()
        if api == "messages":  # Anthropic's error shape
            assert error["type"] == "error" and error["error"]["type"] == "api_error", error
        else:
            assert error["error"]["type"] == "upstream_error", error
        assert debit == 0  # nothing served, nothing billed, the hold given back
        return
    assert r.status_code == 200, r.text
    ended_in_error = any(
        failed in r.text for failed in ('"type":"error"', "upstream_error", "response.failed")
    )
    assert ended_in_error == (outcome == STREAM_ERROR), r.text
    assert generation_id is not None
    shown = _shown_cost(r.text)
    # A stream cut short shows no cost; what it delivered is billed, within the hold.
    assert debit == shown if shown is not None else debit > 0


def test_the_upstream_json_reader_and_responses_counts() -> None:
    # What orjson refuses only for its size is read, as an infinity; the rest stays refused.
    assert loads(b'{"n": 1' + b"0" * 5000 + b"}") == {"n": math.inf}
    assert loads(b'{"n": -1e999, "m": 18446744073709551615}') == {"n": -math.inf, "m": 2**64 - 1}
    for refused in (b"nope", b'{"n": NaN}', b'"\\ud800"', b"[" * 2000 + b"]" * 2000):
        with pytest.raises(ValueError):
            loads(refused)
    # Native Responses counts are read as chat's are: a float truncated, not an estimate.
    assert responses_usage({"input_tokens": 12.9, "output_tokens": 3}) == Usage(12, 3)
    assert responses_usage({"input_tokens": 5, "output_tokens": math.inf}).output_tokens == -1
    assert responses_usage({"input_tokens": 5, "output_tokens": 3,
                            "input_tokens_details": {"cached_tokens": None}}) == Usage(5, 3)  # fmt: skip
