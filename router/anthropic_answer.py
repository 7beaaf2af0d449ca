"""Anthropic's Messages API answer, spoken to clients: the providers' answer (a chat
completion or a native Anthropic message, or their streams) written back as an Anthropic
message or its SSE events. Under ApiFast's own id and the public model name; nothing of the
upstream shows. The request side is router/anthropic_request.py."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from apifast.errors import anthropic_error_body
from apifast.money import json_number
from apifast.providers import Usage
from apifast.router.call_ids import call_id

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


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
# The block events a native (Anthropic) stream relays, each with its documented fields only:
# nothing else the upstream adds to an event reaches the client.
_NATIVE_BLOCK_EVENTS = {
    "content_block_start": ("index", "content_block"),
    "content_block_delta": ("index", "delta"),
    "content_block_stop": ("index",),
}


class MessagesRenderer:
    """Writes the provider's answer as an Anthropic message, or as its event stream:
    message_start, then per block content_block_start / _delta / _stop, then message_delta
    (stop reason and usage) and message_stop."""

    __slots__ = ("_block", "_calls", "_failed", "_index", "_started", "_stop", "_stop_sequence",
                 "_tools", "generation_id", "model")  # fmt: skip

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
        self._calls = 0  # tool_use blocks given ApiFast's own id so far

    def _call_id(self) -> str:
        """A tool_use block's id: ApiFast's, never the upstream's (router/call_ids.py)."""
        self._calls += 1
        return call_id("toolu_", self.generation_id, self._calls - 1)

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
        calls = message.get("tool_calls")
        # Not a list (a buggy upstream): no calls, rather than a 500 for a billed answer.
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                content.append({"type": "tool_use", "id": self._call_id(),
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

    def _start(self, usage: Any = None) -> bytes:
        """message_start with the prompt's token counts where known (a native route's own
        message_start has them); a translated route learns them only at the end, so 0 here
        and the real counts in message_delta. output_tokens starts at 1, as Anthropic's."""
        self._started = True
        counts = {"input_tokens": 0, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 1}  # fmt: skip
        if isinstance(usage, dict):
            for name in counts:
                value = usage.get(name)
                if type(value) is int and value >= 0:
                    counts[name] = value
        return _event("message_start", {"message": {
            "id": self.message_id, "type": "message", "role": "assistant", "content": [],
            "model": self.model, "stop_reason": None, "stop_sequence": None, "usage": counts,
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
                    # signature "" as Anthropic's block starts (and as the answer above has
                    # it): the SDK's accumulator would leave None in a field typed str.
                    block = {"type": "thinking", "thinking": "", "signature": ""}
                    out += self._open("thinking", block)
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
                                                   "id": self._call_id(),
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
        content = [self._own_block(b) for b in content] if isinstance(content, list) else []
        return orjson.dumps({
            "id": self.message_id, "type": "message", "role": "assistant",
            "content": content, "model": self.model,
            "stop_reason": upstream.get("stop_reason") or "end_turn",
            "stop_sequence": upstream.get("stop_sequence"), "usage": usage_json(usage, cost),
        })  # fmt: skip

    def native_chunk(self, event: dict[str, Any]) -> bytes:
        kind = event.get("type")
        if kind == "message_start":
            if self._started:
                return b""
            message = event.get("message")
            return self._start(message.get("usage") if isinstance(message, dict) else None)
        if kind == "message_delta":
            # Told in our own message_delta at the end, with the priced usage.
            delta = event.get("delta") or {}
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self._stop = delta["stop_reason"]
                stop = delta.get("stop_sequence")
                self._stop_sequence = stop if isinstance(stop, str) else None
            return b""
        fields = _NATIVE_BLOCK_EVENTS.get(kind) if isinstance(kind, str) else None
        if fields is None or not isinstance(kind, str):
            # message_stop is ours at the end; an event type this relay does not know (the
            # API adds some) is dropped, as Anthropic asks clients to, since what it carries
            # (a model name, an upstream's own debugging) could show which upstream served.
            return b""
        out = b"" if self._started else self._start()
        if kind == "content_block_start":
            event["content_block"] = self._own_block(event.get("content_block"))
        return out + _event(kind, {k: event[k] for k in fields if k in event})

    def _own_block(self, block: Any) -> Any:
        """A native route's content block, a tool_use under ApiFast's own id."""
        if isinstance(block, dict) and block.get("type") == "tool_use":
            return {**block, "id": self._call_id()}
        return block

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
