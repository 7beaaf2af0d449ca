"""Anthropic's Messages API, spoken to clients: its request read into the chat-completions body
the providers speak, and the providers' answer written back as an Anthropic message or its
SSE events. Under ApiFast's own id and the public model name; nothing of the upstream shows.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from apifast.errors import anthropic_error_body, bad
from apifast.money import json_number
from apifast.providers import Usage

_ROLES = ("user", "assistant")
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# --- request: Anthropic -> chat completions ----------------------------------------------


def _text_of(blocks: Any, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise bad(where, "must be a string or an array of text blocks")
    texts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise bad(f"{where}[{i}]", "must be a text block")
        texts.append(str(block.get("text", "")))
    return "\n\n".join(texts)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise bad(where, "an image block needs a source")
    if source.get("type") == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise bad(where, "a base64 image source needs media_type and data")
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise bad(where, "image source type must be base64 or url")


def _tool_result_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(
            str(b.get("text", ""))
            for b in content
            if isinstance(b, dict) and b.get("type") == "text"
        )
    raise bad(where, "tool_result content must be a string or an array of blocks")


def _message(message: Any, i: int) -> list[dict[str, Any]]:
    """One Anthropic turn as chat messages (a user turn's tool results become tool messages)."""
    where = f"messages[{i}]"
    if not isinstance(message, dict) or message.get("role") not in _ROLES:
        raise bad(f"{where}.role", "must be 'user' or 'assistant'")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content", "must be a string or an array of content blocks")
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append(_image_part(block, at))
        elif kind == "tool_use" and role == "assistant":
            calls.append({
                "id": str(block.get("id", "")), "type": "function",
                "function": {"name": str(block.get("name", "")),
                             "arguments": orjson.dumps(block.get("input") or {}).decode()},
            })  # fmt: skip
        elif kind == "tool_result" and role == "user":
            results.append({
                "role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                "content": _tool_result_text(block.get("content"), at),
            })  # fmt: skip
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier reasoning: not something a chat upstream takes back
        else:
            raise bad(at, f"unsupported content block {kind!r} in a {role} turn")
    out: list[dict[str, Any]] = list(results)
    if role == "assistant":
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        turn: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            turn["tool_calls"] = calls
        out.append(turn)
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad("tools", "must be an array")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise bad(f"tools[{i}]", "needs a name")
        if tool.get("type") not in (None, "custom"):
            raise bad(f"tools[{i}]", f"server tool {tool.get('type')!r} is not supported")
        fn: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or {}}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad("tool_choice", "must be {type: auto | any | none | tool}")


# What a native (Anthropic) route receives of the client's body: `metadata` (its user_id
# identifies the caller) and `service_tier` (it changes the upstream's price) never.
_NATIVE_FIELDS = ("max_tokens", "messages", "system", "stop_sequences", "temperature",
                  "top_p", "top_k", "tools", "tool_choice", "thinking")  # fmt: skip


def native_body(body: dict[str, Any]) -> dict[str, Any]:
    """The client's Messages body as a native route gets it (already validated by
    `chat_body`, which refuses server tools the catalog price does not cover)."""
    return {name: body[name] for name in _NATIVE_FIELDS if name in body}


def chat_body(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(chat-completions body, number of messages) for a Messages API body; 400s name the
    field. `metadata` (its user_id identifies the caller) is never carried over."""
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad("max_tokens", "required, a positive integer")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "required, a non-empty array of messages")
    chat: list[dict[str, Any]] = []
    if body.get("system") is not None:
        chat.append({"role": "system", "content": _text_of(body["system"], "system")})
    for i, message in enumerate(messages):
        chat.extend(_message(message, i))
    out: dict[str, Any] = {"messages": chat, "max_tokens": max_tokens}
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(name, "must be a number")
            out[name] = value
    if body.get("stop_sequences") is not None:
        stops = body["stop_sequences"]
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad("stop_sequences", "must be an array of strings")
        out["stop"] = stops
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        out["tool_choice"] = _tool_choice(body["tool_choice"])
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "must be a boolean")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out, len(chat)


# --- answer: chat completions -> Anthropic -------------------------------------------------


def usage_json(usage: Usage, cost: Decimal) -> dict[str, Any]:
    """Anthropic's usage: input_tokens excludes the cache reads and writes; plus `cost`."""
    return {
        "input_tokens": usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cost": orjson.Fragment(json_number(cost).encode()),
    }


def _tool_input(arguments: Any) -> Any:
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return (
        b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"
    )


_PING = b'event: ping\ndata: {"type": "ping"}\n\n'


class MessagesRenderer:
    """Writes the provider's answer as an Anthropic message, or as its event stream:
    message_start, then per block content_block_start / _delta / _stop, then message_delta
    (stop reason and usage) and message_stop."""

    __slots__ = ("_block", "_failed", "_index", "_started", "_stop", "_stop_sequence", "_tools",
                 "generation_id", "model")  # fmt: skip

    def __init__(self, model: str) -> None:
        self.generation_id = ""
        self.model = model
        self._started = False
        self._block: str | None = None  # the open block's kind
        self._index = -1
        self._tools: dict[int, int] = {}  # chat tool-call index -> block index
        self._stop = "end_turn"
        self._stop_sequence: str | None = None
        self._failed = False

    @property
    def keepalive(self) -> bytes:
        """Anthropic's ping, once the stream has begun (message_start comes first)."""
        return _PING if self._started else b""

    @property
    def message_id(self) -> str:
        return "msg_" + self.generation_id

    def completion(self, upstream: dict[str, Any], usage: Usage, cost: Decimal) -> bytes:
        choices = upstream.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else {}
        message = choice.get("message") if isinstance(choice, dict) else None
        message = message if isinstance(message, dict) else {}
        content: list[dict[str, Any]] = []
        if isinstance(message.get("reasoning_content"), str) and message["reasoning_content"]:
            content.append({"type": "thinking", "thinking": message["reasoning_content"],
                            "signature": ""})  # fmt: skip
        if isinstance(message.get("content"), str) and message["content"]:
            content.append({"type": "text", "text": message["content"]})
        for call in message.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                content.append({"type": "tool_use", "id": str(call.get("id") or ""),
                                "name": str(fn.get("name") or ""),
                                "input": _tool_input(fn.get("arguments"))})  # fmt: skip
        finish = choice.get("finish_reason") if isinstance(choice, dict) else None
        return orjson.dumps({
            "id": self.message_id, "type": "message", "role": "assistant", "content": content,
            "model": self.model, "stop_reason": _STOP_REASONS.get(str(finish), "end_turn"),
            "stop_sequence": None, "usage": usage_json(usage, cost),
        })  # fmt: skip

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._index += 1
        self._block = kind
        return out + _event("content_block_start", {"index": self._index, "content_block": block})

    def _close(self) -> bytes:
        if self._block is None:
            return b""
        self._block = None
        return _event("content_block_stop", {"index": self._index})

    def _start(self) -> bytes:
        self._started = True
        return _event("message_start", {"message": {
            "id": self.message_id, "type": "message", "role": "assistant", "content": [],
            "model": self.model, "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }})  # fmt: skip

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        out = b"" if self._started else self._start()
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta: dict[str, Any] = choice.get("delta") or {}
            if not isinstance(delta, dict):
                continue
            thinking = delta.get("reasoning_content")
            if isinstance(thinking, str) and thinking:
                if self._block != "thinking":
                    out += self._open("thinking", {"type": "thinking", "thinking": ""})
                out += _event("content_block_delta", {"index": self._index, "delta": {
                    "type": "thinking_delta", "thinking": thinking}})  # fmt: skip
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self._block != "text":
                    out += self._open("text", {"type": "text", "text": ""})
                out += _event("content_block_delta", {"index": self._index, "delta": {
                    "type": "text_delta", "text": text}})  # fmt: skip
            for call in delta.get("tool_calls") or ():
                if not isinstance(call, dict):
                    continue
                position = call.get("index", 0)
                fn: dict[str, Any] = call.get("function") or {}
                if not isinstance(fn, dict):
                    continue
                if position not in self._tools:
                    out += self._open("tool_use", {"type": "tool_use",
                                                   "id": str(call.get("id") or ""),
                                                   "name": str(fn.get("name") or ""),
                                                   "input": {}})  # fmt: skip
                    self._tools[position] = self._index
                arguments = fn.get("arguments")
                if isinstance(arguments, str) and arguments:
                    out += _event("content_block_delta", {"index": self._tools[position],
                                  "delta": {"type": "input_json_delta",
                                            "partial_json": arguments}})  # fmt: skip
            if choice.get("finish_reason"):
                self._stop = _STOP_REASONS.get(str(choice["finish_reason"]), "end_turn")
        return out

    def stream_end(self, usage: Usage, cost: Decimal) -> bytes:
        if self._failed:
            return b""  # the error event ended the stream
        out = (b"" if self._started else self._start()) + self._close()
        out += _event("message_delta", {"delta": {"stop_reason": self._stop,
                                                  "stop_sequence": self._stop_sequence},
                                        "usage": usage_json(usage, cost)})  # fmt: skip
        return out + _event("message_stop", {})

    # --- from a native (Anthropic) route: its own blocks, under our id and model ---------

    def native_completion(self, upstream: dict[str, Any], usage: Usage, cost: Decimal) -> bytes:
        content = upstream.get("content")
        return orjson.dumps({
            "id": self.message_id, "type": "message", "role": "assistant",
            "content": content if isinstance(content, list) else [], "model": self.model,
            "stop_reason": upstream.get("stop_reason") or "end_turn",
            "stop_sequence": upstream.get("stop_sequence"), "usage": usage_json(usage, cost),
        })  # fmt: skip

    def native_chunk(self, event: dict[str, Any]) -> bytes:
        kind = event.get("type")
        if kind == "message_start":
            return b"" if self._started else self._start()
        if kind == "message_delta":
            # Told in our own message_delta at the end, with the priced usage.
            delta = event.get("delta") or {}
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self._stop = delta["stop_reason"]
                stop = delta.get("stop_sequence")
                self._stop_sequence = stop if isinstance(stop, str) else None
            return b""
        if kind == "message_stop" or not isinstance(kind, str):
            return b""
        out = b"" if self._started else self._start()
        return out + _event(kind, {k: v for k, v in event.items() if k != "type"})

    def native_chars(self, item: dict[str, Any]) -> int:
        """Characters of text, thinking and tool input in a message or one delta event."""
        blocks: list[Any] = []
        if item.get("type") == "content_block_delta":
            blocks = [item.get("delta")]
        elif item.get("type") == "message" and isinstance(item.get("content"), list):
            blocks = item["content"]
        total = 0
        for block in blocks:
            if not isinstance(block, dict):
                continue
            for name in ("text", "thinking", "partial_json"):
                if isinstance(block.get(name), str):
                    total += len(block[name])
            if block.get("type") == "tool_use":
                total += len(orjson.dumps(block.get("input")))
        return total

    def stream_error(self, status: int) -> bytes:
        self._failed = True
        message = "The model provider's stream failed."
        return (
            b"event: error\ndata: "
            + anthropic_error_body(529 if status == 502 else status, message)
            + b"\n\n"
        )
