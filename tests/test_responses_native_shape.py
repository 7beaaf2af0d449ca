"""The native Responses relay without a stack: what of the client's body goes upstream, and
what of the upstream's answer (object or events) a client may see."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from apifast.providers import Usage
from apifast.router.responses_native import native_body
from apifast.router.responses_shape import ResponsesRenderer, request_echo


def _renderer() -> ResponsesRenderer:
    renderer = ResponsesRenderer("public-model", 1_700_000_000, request_echo({}))
    renderer.generation_id = "gen-0123456789abcdef01234567"
    return renderer


def _events(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: ")]


def test_native_body_is_an_allow_list() -> None:
    body = {
        "model": "public-model", "input": [
            {"type": "message", "id": "msg_ours", "role": "user", "content": "hi"},
            {"type": "reasoning", "id": "rs_ours", "summary": []},
            {"type": "function_call", "id": "fc_ours", "call_id": "call_1", "name": "f",
             "arguments": "{}"},
        ],
        "instructions": "x", "user": "u", "metadata": {"a": "b"}, "safety_identifier": "s",
        "prompt_cache_key": "k", "prompt_cache_retention": "24h", "service_tier": "priority",
        "include": ["reasoning.encrypted_content"], "store": True, "stream": True,
        "text": {"verbosity": "low"}, "truncation": "auto",
    }  # fmt: skip
    sent = native_body(body)
    assert sent == {
        "input": [
            {"type": "message", "role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
        ],
        "instructions": "x", "text": {"verbosity": "low"}, "truncation": "auto", "store": False,
    }  # fmt: skip
    assert body["input"][0]["id"] == "msg_ours"  # the client's body is not changed


def test_native_completion_keeps_only_documented_fields() -> None:
    upstream = {
        "id": "resp_UP", "object": "response", "status": "completed", "model": "up-model",
        "billing": {"payer": "developer"}, "service_tier": "default", "metadata": {"x": "y"},
        "output": [
            {"type": "reasoning", "id": "rs_UP", "summary": [{"type": "summary_text",
             "text": "why"}], "encrypted_content": "SEALED"},
            {"type": "web_search_call", "id": "ws_UP", "status": "completed"},
            {"type": "message", "id": "msg_UP", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": "hi", "annotations": [
                 {"type": "file_citation", "file_id": "file_UP", "index": 0},
                 {"type": "url_citation", "url": "https://e.x", "title": "t", "start_index": 0,
                  "end_index": 2}], "extra": "UP"}]},
            {"type": "function_call", "id": "fc_UP", "call_id": "call_UP", "name": "f",
             "arguments": "{}", "status": "completed"},
        ],
    }  # fmt: skip
    renderer = _renderer()
    out = orjson.loads(renderer.native_completion(upstream, Usage(3, 4), Decimal("0.01")))
    text = orjson.dumps(out).decode()
    for mark in ("_UP", "up-model", "SEALED", "billing", "service_tier", "file_citation",
                 "web_search_call", '"extra"'):  # fmt: skip
        assert mark not in text, mark
    assert out["id"] == "resp_gen-0123456789abcdef01234567" and out["model"] == "public-model"
    assert [i["type"] for i in out["output"]] == ["reasoning", "message", "function_call"]
    assert [i["id"] for i in out["output"]] == [
        "rs_0123456789abcdef0123456700", "msg_0123456789abcdef0123456701",
        "fc_0123456789abcdef0123456702",
    ]  # fmt: skip
    assert out["output"][2]["call_id"] == "call_0123456789abcdef0123456702"
    assert out["output"][1]["content"][0]["annotations"][0]["url"] == "https://e.x"
    assert out["usage"]["output_tokens"] == 4 and out["usage"]["cost"] == 0.01
    assert out["metadata"] == {} and out["store"] is False


def test_native_incomplete_is_told_as_such() -> None:
    upstream = {"object": "response", "status": "incomplete",
                "incomplete_details": {"reason": "max_output_tokens"}, "output": []}  # fmt: skip
    out = orjson.loads(_renderer().native_completion(upstream, Usage(1, 1), Decimal(0)))
    assert out["status"] == "incomplete"
    assert out["incomplete_details"] == {"reason": "max_output_tokens"}


def test_native_stream_drops_unknown_events_and_fails_with_what_was_delivered() -> None:
    renderer = _renderer()
    item = {"type": "message", "id": "msg_UP", "status": "in_progress", "role": "assistant",
            "content": []}  # fmt: skip
    part = {"type": "output_text", "text": "", "annotations": []}
    upstream_events = [
        {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_UP"}},
        {"type": "response.in_progress", "sequence_number": 1},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", "item_id": "msg_UP", "output_index": 0,
         "content_index": 0, "part": part},
        {"type": "response.output_text.delta", "item_id": "msg_UP", "output_index": 0,
         "content_index": 0, "delta": "Hel", "obfuscation": "UPpad"},
        {"type": "response.output_text.annotation.added", "item_id": "msg_UP",
         "annotation": {"type": "file_citation", "file_id": "file_UP"}},
        {"type": "response.some_future_event", "item_id": "msg_UP", "secret": "UP"},
        {"type": "response.output_text.delta", "item_id": "msg_UP", "output_index": 0,
         "content_index": 0, "delta": "lo"},
    ]  # fmt: skip
    out = b"".join(renderer.native_chunk(e) for e in upstream_events)
    assert renderer.native_chars(upstream_events[4]) == 3
    renderer.stream_error(502)
    out += renderer.stream_end(Usage(2, 2), Decimal("0.001"))
    events = _events(out)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.failed",
    ]  # fmt: skip
    assert "UP" not in out.decode()
    failed = events[-1]["response"]
    assert failed["output"][0]["content"][0]["text"] == "Hello"
    assert failed["error"]["code"] == "server_error"
