"""OpenAI's Responses API on a route whose provider speaks it natively (`native_responses`):
what of the client's body the upstream gets, and the upstream's output items rebuilt under
ApiFast's own ids with only the documented fields, so nothing of the upstream shows.

The body is the client's own, through an allow-list: `user`, `metadata`,
`safety_identifier` and `prompt_cache_key` never go upstream (the last is a cache hint, but
OpenAI documents it as the replacement for `user`, and callers set it to a user or session
id: a label that would let the upstream link a caller's requests); nor `service_tier` and
`prompt_cache_retention` (they change the upstream's price). Of `include`, only
`message.output_text.logprobs` goes (the reply shows logprobs); upstream-encrypted reasoning
is never shown, so it is not asked for. `store` is always false. Input
items lose their `id` (ApiFast's ids, which an upstream that stores nothing would look up
and refuse) and earlier `reasoning` items are left out, as on the translated path.
"""

from __future__ import annotations

from typing import Any

_NATIVE_FIELDS = ("input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
                  "max_output_tokens", "max_tool_calls", "temperature", "top_p",
                  "top_logprobs", "text", "reasoning", "truncation")  # fmt: skip
_LOGPROBS = "message.output_text.logprobs"
# OpenAI's Responses API refuses max_output_tokens below this (integer_below_min_value).
RESPONSES_MIN_OUTPUT = 16
# Output item type -> the prefix of ApiFast's id for it.
ITEM_PREFIXES = {"message": "msg", "function_call": "fc", "reasoning": "rs"}
_STATUSES = ("in_progress", "completed", "incomplete")
# Fields of a stream event copied as they are (ids, indexes, items and parts are rebuilt).
EVENT_FIELDS = ("content_index", "summary_index", "delta", "text", "arguments", "name",
                "refusal", "logprobs")  # fmt: skip
# Why a response is incomplete -> the chat finish_reason ResponsesRenderer keeps.
INCOMPLETE_STOPS = {"max_output_tokens": "length", "content_filter": "content_filter"}


def _input_item(item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return item  # type: ignore[no-any-return]  # chat_body has refused it already
    if item.get("type") == "reasoning":
        return None
    return {k: v for k, v in item.items() if k != "id"}


def native_body(body: dict[str, Any]) -> dict[str, Any]:
    """The client's Responses body as a native route gets it (already validated by the
    translation, `responses_input.chat_body`, which refuses what needs state and built-in
    tools). The core sets `max_output_tokens` and `model`, and `stream` when streaming."""
    out = {name: body[name] for name in _NATIVE_FIELDS if name in body}
    items = out.get("input")
    if isinstance(items, list):
        out["input"] = [i for i in map(_input_item, items) if i is not None]
    include = body.get("include")
    if isinstance(include, list) and _LOGPROBS in include:
        out["include"] = [_LOGPROBS]
    out["store"] = False
    return out


def clean_part(part: Any) -> dict[str, Any] | None:
    """A content part of the upstream's with only the documented fields, or None."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "output_text":
        annotations = [
            {k: a[k] for k in ("type", "start_index", "end_index", "title", "url") if k in a}
            for a in part.get("annotations") or ()
            if isinstance(a, dict) and a.get("type") == "url_citation"
        ]  # file citations name upstream files: never shown
        logprobs = part.get("logprobs")
        return {"type": kind, "text": str(part.get("text") or ""), "annotations": annotations,
                "logprobs": logprobs if isinstance(logprobs, list) else []}  # fmt: skip
    if kind == "refusal":
        return {"type": kind, "refusal": str(part.get("refusal") or "")}
    if kind in ("summary_text", "reasoning_text"):
        return {"type": kind, "text": str(part.get("text") or "")}
    return None


def _parts(parts: Any) -> list[dict[str, Any]]:
    if not isinstance(parts, list):
        return []
    return [p for p in map(clean_part, parts) if p is not None]


def clean_item(raw: Any, item_id: str) -> dict[str, Any] | None:
    """An output item of the upstream's under ApiFast's `item_id`, or None for a type ApiFast
    does not relay (built-in tool calls cannot occur: their tools are refused)."""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in ITEM_PREFIXES:
        return None
    status = raw.get("status") if raw.get("status") in _STATUSES else "completed"
    if kind == "message":
        item = {"type": kind, "id": item_id, "status": status, "role": "assistant",
                "content": _parts(raw.get("content"))}  # fmt: skip
        if raw.get("phase") in ("commentary", "final_answer"):
            item["phase"] = raw["phase"]
        return item
    if kind == "function_call":
        # The call id is ApiFast's too: the client sends it back with the call and its
        # output, so the upstream never needs its own.
        return {"type": kind, "id": item_id, "call_id": "call_" + item_id.split("_", 1)[1],
                "name": str(raw.get("name") or ""), "arguments": str(raw.get("arguments") or ""),
                "status": status}  # fmt: skip
    item = {"type": kind, "id": item_id, "summary": _parts(raw.get("summary"))}
    if isinstance(raw.get("content"), list):
        item["content"] = _parts(raw["content"])  # reasoning text; encrypted_content never
    return item


def item_chars(item: Any) -> int:
    """Characters of text, refusals, reasoning and call arguments in an output item."""
    if not isinstance(item, dict):
        return 0
    total = len(item["arguments"]) if isinstance(item.get("arguments"), str) else 0
    for name in ("content", "summary"):
        parts = item.get(name)
        for part in parts if isinstance(parts, list) else ():  # a faulty upstream's 7: none
            if isinstance(part, dict):
                for field in ("text", "refusal"):
                    if isinstance(part.get(field), str):
                        total += len(part[field])
    return total
