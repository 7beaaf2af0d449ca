"""Lean validation of OpenAI request bodies: only what the router itself relies on, with
messages that name the field. Everything else is the upstream's business."""

from __future__ import annotations

from typing import Any

from apifast.errors import ApiError, bad

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Fields that identify the caller or make the upstream keep data: never sent upstream.
# prompt_cache_key is a cache hint, but OpenAI documents it as the replacement for `user`
# and callers set it to a user or session id, which would let the upstream link requests
# (as on the native Responses path, router/responses_native.py). service_tier: only the
# values that keep the catalog price get this far (validate_chat); prompt_cache_retention
# changes the upstream's price, which the catalog price does not follow. models and route
# are ApiFast's own routing preferences (router/route_prefs.py).
STRIPPED_FIELDS = frozenset({
    "user", "store", "metadata", "safety_identifier", "prompt_cache_key", "service_tier",
    "prompt_cache_retention", "models", "route",
})  # fmt: skip


def _optional_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad(name, f"must be an integer from {low} to {high}")
    return value


def _optional_number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad(name, f"must be a number from {low:g} to {high:g}")


def model_name(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: required, a model id from GET /v1/models", param="model",
                       code="invalid_value")  # fmt: skip
    return model


def validate_chat(body: dict[str, Any]) -> tuple[bool, bool, int | None, int]:
    """Check a chat body; returns (stream, include_usage, max output tokens asked, n)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "required, a non-empty array of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}]", "must be an object")
        role = message.get("role")
        if role not in _ROLES:
            raise bad(f"messages[{i}].role", f"must be one of {', '.join(sorted(_ROLES))}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", "must be a boolean")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", "must be an object")
        include_usage = options.get("include_usage") is True
    # Both are checked: each reaches the upstream unless the core replaces it, and a client
    # that sets both is held to the smaller.
    asked = [
        value
        for name in ("max_completion_tokens", "max_tokens")
        if (value := _optional_int(body, name, 1, 10_000_000)) is not None
    ]
    max_tokens = min(asked) if asked else None
    n = _optional_int(body, "n", 1, 128) or 1
    _optional_number(body, "temperature", 0, 2)
    _optional_number(body, "top_p", 0, 1)
    _optional_number(body, "presence_penalty", -2, 2)
    _optional_number(body, "frequency_penalty", -2, 2)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad("tools", "must be an array")
    check_service_tier(body.get("service_tier"))
    if body.get("web_search_options") is not None:
        # The upstream runs the searches and bills each one beside the tokens, which the
        # catalog price does not cover; and its user_location says where the caller is.
        raise ApiError(
            400,
            "web_search_options: not supported: web searches are billed by the model "
            "provider per search, outside the catalog price; declare a function tool instead",
            param="web_search_options", code="unsupported_parameter",
        )  # fmt: skip
    _check_text_output(body)
    return stream, include_usage, max_tokens, n


def _check_text_output(body: dict[str, Any]) -> None:
    """Spoken answers (`audio`, or "audio" in `modalities`) are refused by name: the upstream
    bills audio output at its own, higher rate, which the catalog's per-token price does not
    follow, so the hold could not be the bound it promises."""
    modalities = body.get("modalities")
    if modalities is not None and (
        not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities)
    ):
        raise bad("modalities", "must be an array of strings")
    if body.get("audio") is not None or any(m != "text" for m in modalities or ()):
        param = "audio" if body.get("audio") is not None else "modalities"
        raise ApiError(
            400,
            f"{param}: not supported: ApiFast answers in text only (send modalities "
            '["text"], or leave modalities and audio out)',
            param=param, code="unsupported_parameter",
        )  # fmt: skip


# service_tier values served as asked: every request is served at its catalog price, which
# is what "auto" and "default" (standard processing) mean. The others change what the
# upstream charges and how it serves (flex: cheaper and slower, priority and scale: dearer),
# which the catalog price does not follow: refused by name rather than silently dropped.
_SERVICE_TIERS = (None, "auto", "default")
_OTHER_TIERS = ("flex", "priority", "scale")


def check_service_tier(tier: Any) -> None:
    """Chat's and Responses' `service_tier`: the catalog price's values pass, the others are
    refused by name."""
    if tier in _SERVICE_TIERS:
        return
    if tier in _OTHER_TIERS:
        raise ApiError(
            400,
            f"service_tier: {tier!r} is not offered: ApiFast serves every request at its "
            "catalog price (send auto or default, or leave it out)",
            param="service_tier", code="unsupported_parameter",
        )  # fmt: skip
    raise bad("service_tier", "must be auto, default, flex, priority or scale")


# Chat's fields that OpenAI's embeddings API does not have. Other unknown fields pass to the
# upstream as on chat, but these ask for an answer ApiFast would not give (an SSE stream):
# refused by name as OpenAI refuses them, not left to an upstream that ignores them or
# rejects them with a 400 that cannot name the field.
_NOT_EMBEDDINGS = ("stream", "stream_options")


def validate_embeddings(body: dict[str, Any]) -> None:
    for name in _NOT_EMBEDDINGS:
        if name in body:
            raise ApiError(400, f"Unknown parameter: '{name}' (embeddings are not streamed).",
                           param=name, code="unknown_parameter")  # fmt: skip
    value = body.get("input")
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        return
    raise bad("input", "required, a string or a non-empty array")


def upstream_body(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k not in STRIPPED_FIELDS}
    out["model"] = upstream_model
    return out
