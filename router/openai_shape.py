"""Rewrites upstream answers into ApiFast's own: our generation id, the public model id, and
no upstream fingerprint, so nothing reveals which upstream served the request."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from apifast.money import json_number
from apifast.providers import Usage

_COMPLETION_KEYS = ("object", "created", "choices")
_CHOICE_KEYS = ("index", "message", "delta", "finish_reason", "logprobs")


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


def _clean_choices(choices: Any) -> list[Any]:
    if not isinstance(choices, list):
        return []
    return [
        {k: c[k] for k in _CHOICE_KEYS if k in c} if isinstance(c, dict) else c for c in choices
    ]


def completion_body(
    upstream: dict[str, Any], generation_id: str, model: str, usage: Usage, cost: Decimal
) -> bytes:
    out: dict[str, Any] = {"id": generation_id, "model": model}
    for key in _COMPLETION_KEYS:
        if key in upstream:
            out[key] = upstream[key]
    out["object"] = "chat.completion"
    out["choices"] = _clean_choices(upstream.get("choices"))
    out["usage"] = usage_json(usage, cost)
    return orjson.dumps(out)


def chunk_bytes(chunk: dict[str, Any], generation_id: str, model: str, created: int) -> bytes:
    out = {
        "id": generation_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": _clean_choices(chunk.get("choices")),
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
    return orjson.dumps(
        {
            "object": "list",
            "model": model,
            "data": data if isinstance(data, list) else [],
            "usage": {
                "prompt_tokens": usage.input_tokens,
                "total_tokens": usage.input_tokens,
                "cost": orjson.Fragment(json_number(cost).encode()),
            },
        }
    )


DONE = b"data: [DONE]\n\n"
