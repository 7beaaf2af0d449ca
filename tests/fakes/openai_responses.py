"""OpenAI's Responses API wire format for the fake OpenAI upstream (`POST /v1/responses`):
the Response object, and its typed SSE events in OpenAI's order, each with a
`sequence_number` (response.created, response.in_progress, then per output item
output_item.added, content_part.added, output_text.delta..., output_text.done,
content_part.done, output_item.done, and response.completed carrying usage; a function call
streams its arguments as function_call_arguments.delta / .done; a reasoning item its summary).
Ids and fields an upstream adds (`resp_`, `msg_`, `fc_`, `rs_`, `call_` ids, `billing`,
`service_tier`, `obfuscation`) are there so tests can check none reaches a client."""

from __future__ import annotations

import time
from typing import Any

from tests.fakes.wire_json import dumps

REASONING = "Thinking it over upstream."


def input_text(body: dict[str, Any]) -> str:
    """Every text of the request (instructions and input), for the token count and markers."""
    texts = [body["instructions"]] if isinstance(body.get("instructions"), str) else []
    items = body.get("input")
    if isinstance(items, str):
        return "\n".join([*texts, items])
    for item in items if isinstance(items, list) else ():
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            texts.append(content)
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        if isinstance(item, dict) and isinstance(item.get("output"), str):
            texts.append(item["output"])
    return "\n".join(texts)


def last_user_text(body: dict[str, Any]) -> str:
    items = body.get("input")
    if isinstance(items, str):
        return items
    for item in reversed(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("role") == "user":
            return input_text({"input": [item]})
    return ""


def usage(body: dict[str, Any], output: int, cached: int, reasoning: int) -> dict[str, Any]:
    prompt = len(input_text(body)) // 4 + 7
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": min(cached, prompt)},
        "output_tokens": output + reasoning,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output + reasoning,
    }


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]
    return {"id": "msg_UPSTREAM0001", "type": "message", "status": status,
            "content": content if status == "completed" else [], "role": "assistant"}  # fmt: skip


def call_item(arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": "fc_UPSTREAM0002", "type": "function_call", "status": status,
            "arguments": arguments, "call_id": "call_UPSTREAM0003", "name": "get_weather"}  # fmt: skip


def reasoning_item(done: bool = True) -> dict[str, Any]:
    summary = [{"type": "summary_text", "text": REASONING}] if done else []
    return {"id": "rs_UPSTREAM0004", "type": "reasoning", "summary": summary,
            "encrypted_content": "gAAAA-UPSTREAM-SEALED"}  # fmt: skip


def response_object(
    body: dict[str, Any], status: str, output: list[dict[str, Any]], used: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "id": "resp_UPSTREAM0000", "object": "response", "created_at": int(time.time()),
        "status": status, "background": False, "billing": {"payer": "developer"},
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "max_tool_calls": None,
        "model": body.get("model"), "output": output, "parallel_tool_calls": True,
        "previous_response_id": None, "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": body.get("safety_identifier"), "service_tier": "default",
        "store": body.get("store", True), "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto",
        "tools": body.get("tools") or [], "top_logprobs": 0, "top_p": 1.0,
        "truncation": "disabled", "usage": used, "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }  # fmt: skip


class EventWriter:
    """Typed SSE events, numbered from 0."""

    def __init__(self) -> None:
        self.sequence = -1

    def event(self, kind: str, **payload: Any) -> bytes:
        self.sequence += 1
        data = dumps({"type": kind, "sequence_number": self.sequence, **payload})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def message_events(w: EventWriter, index: int, words: list[str]) -> list[bytes]:
    """A message item's events, as OpenAI streams them."""
    ids = {"item_id": "msg_UPSTREAM0001", "output_index": index}
    empty = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    out = [
        w.event("response.output_item.added", output_index=index,
                item=message_item("", "in_progress")),
        w.event("response.content_part.added", **ids, content_index=0, part=empty),
    ]  # fmt: skip
    for i, word in enumerate(words):
        out.append(w.event("response.output_text.delta", **ids, content_index=0,
                           delta=word if i == 0 else " " + word, logprobs=[],
                           obfuscation="UPSTREAMpad"))  # fmt: skip
    text = " ".join(words)
    out += [
        w.event("response.output_text.done", **ids, content_index=0, text=text, logprobs=[]),
        w.event("response.content_part.done", **ids, content_index=0,
                part={**empty, "text": text}),
        w.event("response.output_item.done", output_index=index, item=message_item(text)),
    ]  # fmt: skip
    return out


def call_events(w: EventWriter, index: int, pieces: tuple[str, ...]) -> list[bytes]:
    ids = {"item_id": "fc_UPSTREAM0002", "output_index": index}
    out = [w.event("response.output_item.added", output_index=index,
                   item=call_item("", "in_progress"))]  # fmt: skip
    for piece in pieces:
        out.append(w.event("response.function_call_arguments.delta", **ids, delta=piece,
                           obfuscation="UPSTREAMpad"))  # fmt: skip
    arguments = "".join(pieces)
    out += [
        w.event("response.function_call_arguments.done", **ids, arguments=arguments),
        w.event("response.output_item.done", output_index=index, item=call_item(arguments)),
    ]
    return out


def reasoning_events(w: EventWriter, index: int) -> list[bytes]:
    ids = {"item_id": "rs_UPSTREAM0004", "output_index": index, "summary_index": 0}
    part = {"type": "summary_text", "text": ""}
    return [
        w.event("response.output_item.added", output_index=index,
                item=reasoning_item(done=False)),
        w.event("response.reasoning_summary_part.added", **ids, part=part),
        w.event("response.reasoning_summary_text.delta", **ids, delta=REASONING,
                obfuscation="UPSTREAMpad"),
        w.event("response.reasoning_summary_text.done", **ids, text=REASONING),
        w.event("response.reasoning_summary_part.done", **ids,
                part={**part, "text": REASONING}),
        w.event("response.output_item.done", output_index=index, item=reasoning_item()),
    ]  # fmt: skip
