"""Rewrites upstream answers into ApiFast's own: our generation id, the public model id, and
no upstream fingerprint, so nothing reveals which upstream served the request."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from apifast.money import json_number
from apifast.providers import Usage

_CHOICE_KEYS = ("index", "message", "delta", "finish_reason", "logprobs")
# What of a message (or a stream's delta) and of its tool calls is relayed: OpenAI's fields,
# and the reasoning text OpenAI-compatible upstreams add. Anything else an upstream (or a
# proxy in front of it) puts there, its own fields and debugging, could show which one it is.
_MESSAGE_KEYS = frozenset({
    "role", "content", "refusal", "tool_calls", "function_call", "audio", "annotations",
    "reasoning_content", "reasoning",
})  # fmt: skip
# A stream chunk's choice with only these keys, and a delta with only these, is relayed as it
# is: nothing in it to clean (a delta's tool calls are, and get ApiFast's ids).
_CHUNK_CHOICE_KEYS = frozenset({"index", "delta", "finish_reason", "logprobs"})
_PLAIN_DELTA_KEYS = _MESSAGE_KEYS - {"tool_calls"}
_TOOL_CALL_KEYS = frozenset({"index", "id", "type", "function"})
_FUNCTION_KEYS = frozenset({"name", "arguments"})
_EMBEDDING_KEYS = ("object", "index", "embedding")


def usage_json(usage: Usage, cost: Decimal) -> dict[str, Any]:
    """OpenAI's usage object plus `cost`, written as an exact JSON number."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "cost": orjson.Fragment(json_number(cost).encode()),
    }


def _only(value: Any, keys: frozenset[str]) -> Any:
    # The usual object has no other key: kept as it is, with no copy.
    if not isinstance(value, dict) or value.keys() <= keys:
        return value
    return {k: v for k, v in value.items() if k in keys}


def _clean_call(call: Any) -> Any:
    call = _only(call, _TOOL_CALL_KEYS)
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        function = _only(call["function"], _FUNCTION_KEYS)
        if function is not call["function"]:
            call = {**call, "function": function}
    return call


def _clean_message(message: Any) -> Any:
    message = _only(message, _MESSAGE_KEYS)
    if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
        message = {**message, "tool_calls": [_clean_call(c) for c in message["tool_calls"]]}
    return message


def _clean_choice(choice: Any) -> Any:
    if not isinstance(choice, dict):
        return choice
    out = {k: choice[k] for k in _CHOICE_KEYS if k in choice}
    for key in ("message", "delta"):
        if key in out:
            out[key] = _clean_message(out[key])
    return out


def clean_choices(choices: Any) -> list[Any]:
    if not isinstance(choices, list):
        return []
    return [_clean_choice(c) for c in choices]


def completion_body(
    upstream: dict[str, Any], generation_id: str, model: str, usage: Usage, cost: Decimal,
    created: int,
) -> bytes:  # fmt: skip
    """The answer under ApiFast's id, public model and clock (`created`, as the stream's
    chunks have it): nothing of the upstream's envelope."""
    out: dict[str, Any] = {
        "id": generation_id, "model": model, "object": "chat.completion", "created": created,
        "choices": clean_choices(upstream.get("choices")), "usage": usage_json(usage, cost),
    }  # fmt: skip
    return orjson.dumps(out)


def plain_choices(choices: list[Any]) -> bool:
    """Whether a stream chunk's choices are relayed as they are (the usual text chunk): the
    check costs less than the copy it saves."""
    for choice in choices:
        if type(choice) is not dict or not choice.keys() <= _CHUNK_CHOICE_KEYS:
            return False
        delta = choice.get("delta")
        if delta is not None and (type(delta) is not dict or not delta.keys() <= _PLAIN_DELTA_KEYS):
            return False
    return True


def chunk_bytes(choices: list[Any], generation_id: str, model: str, created: int) -> bytes:
    """A stream chunk under ApiFast's id, of choices that `plain_choices` passed or that
    `clean_choices` made."""
    out = {
        "id": generation_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    return b"data: " + orjson.dumps(out) + b"\n\n"


def usage_chunk_bytes(
    generation_id: str, model: str, created: int, usage: Usage, cost: Decimal
) -> bytes:
    out = {
        "id": generation_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_json(usage, cost),
    }
    return b"data: " + orjson.dumps(out) + b"\n\n"


def error_event_bytes(message: str, status: int) -> bytes:
    kind = "timeout_error" if status == 504 else "upstream_error"
    return (
        b"data: "
        + orjson.dumps({"error": {"message": message, "type": kind, "code": status, "param": None}})
        + b"\n\n"
    )


def embeddings_body(upstream: dict[str, Any], model: str, usage: Usage, cost: Decimal) -> bytes:
    data = upstream.get("data")
    items = [
        {k: d[k] for k in _EMBEDDING_KEYS if k in d} if isinstance(d, dict) else d
        for d in (data if isinstance(data, list) else ())
    ]
    return orjson.dumps(
        {
            "object": "list",
            "model": model,
            "data": items,
            "usage": {
                "prompt_tokens": usage.input_tokens,
                "total_tokens": usage.input_tokens,
                "cost": orjson.Fragment(json_number(cost).encode()),
            },
        }
    )


DONE = b"data: [DONE]\n\n"
