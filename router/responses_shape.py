"""OpenAI's Responses API, spoken to clients: the providers' (chat-completions) answer written
back as a Response object, or as its typed SSE events, each with a `sequence_number`. Under
ApiFast's own ids and the public model name; nothing of the upstream shows, and every
response says `"store": false` (nothing is kept)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

from apifast.money import json_number
from apifast.providers import Usage
from apifast.router.responses_native import (
    EVENT_FIELDS,
    INCOMPLETE_STOPS,
    ITEM_PREFIXES,
    clean_item,
    clean_part,
    item_chars,
)

# chat finish_reason -> why a response is incomplete
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def usage_json(usage: Usage, cost: Decimal) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "cost": orjson.Fragment(json_number(cost).encode()),
    }


def request_echo(body: dict[str, Any]) -> dict[str, Any]:
    """The request parameters a Response object repeats back (no content beyond the
    client's own `instructions`, and no caller-identifying field)."""
    tools = [t for t in body.get("tools") or () if isinstance(t, dict)]
    text = body.get("text")
    text = text if isinstance(text, dict) else {}
    reasoning = body.get("reasoning")
    reasoning = reasoning if isinstance(reasoning, dict) else {}
    return {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": reasoning.get("effort"), "summary": None},
        "store": False,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": tools,
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "user": None,
        "metadata": {},
    }


def _event(kind: str, payload: dict[str, Any], sequence: int) -> bytes:
    data = orjson.dumps({"type": kind, "sequence_number": sequence, **payload})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


class ResponsesRenderer:
    """Writes the provider's answer as a Response object or as the Responses event stream:
    response.created, response.in_progress, then per output item output_item.added, its
    content or arguments deltas and dones, output_item.done, then response.completed (or
    .incomplete, or .failed) carrying usage."""

    __slots__ = ("_failed", "_item", "_items", "_seq", "_started", "_stop", "_tools",
                 "_upstream", "created_at", "echo", "generation_id", "model")  # fmt: skip

    def __init__(self, model: str, started: float, echo: dict[str, Any]) -> None:
        self.generation_id = ""
        self.model = model
        self.created_at = int(started)
        self.echo = echo
        self._seq = -1
        self._started = False
        self._items: list[dict[str, Any]] = []  # the output so far, in order
        self._item: dict[str, Any] | None = None  # the open item
        self._tools: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its item
        self._stop: str | None = None
        self._failed: int | None = None
        # From a native route: the upstream's item ids and output indexes -> our indexes.
        self._upstream: dict[str | int, int] | None = None

    @property
    def response_id(self) -> str:
        return "resp_" + self.generation_id

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self.generation_id.removeprefix('gen-')}{len(self._items):02d}"

    def _response(
        self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        reason = _INCOMPLETE.get(self._stop or "") if status == "incomplete" else None
        error = None
        if status == "failed":
            error = {"code": "server_error", "message": "The model provider's stream failed."}
        return {
            "id": self.response_id, "object": "response", "created_at": self.created_at,
            "status": status, "error": error,
            "incomplete_details": {"reason": reason} if reason else None,
            "model": self.model, "output": output, "usage": usage, **self.echo,
        }  # fmt: skip

    def _status(self) -> str:
        return "incomplete" if self._stop in _INCOMPLETE else "completed"

    # --- non-streaming ---------------------------------------------------------------------

    def completion(self, upstream: dict[str, Any], usage: Usage, cost: Decimal) -> bytes:
        choices = upstream.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else {}
        choice = choice if isinstance(choice, dict) else {}
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        reasoning = message.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            self._items.append(self._reasoning_item(reasoning))
        content = message.get("content")
        refusal = message.get("refusal")
        if (isinstance(content, str) and content) or (isinstance(refusal, str) and refusal):
            item = self._message_item()
            if isinstance(content, str) and content:
                item["content"].append(_text_part(content, _logprobs(choice.get("logprobs"))))
            if isinstance(refusal, str) and refusal:
                item["content"].append({"type": "refusal", "refusal": refusal})
            item["status"] = "completed"
            self._items.append(item)
        calls = message.get("tool_calls")
        # Not a list (a buggy upstream): no calls, rather than a 500 for a billed answer.
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                item = self._call_item(call, fn)
                item["arguments"] = str(fn.get("arguments") or "")
                item["status"] = "completed"
                self._items.append(item)
        self._stop = str(choice.get("finish_reason") or "stop")
        status = self._status()
        if status == "incomplete" and self._items and "status" in self._items[-1]:
            self._items[-1]["status"] = "incomplete"  # the item the bound cut short
        return orjson.dumps(self._response(status, self._items, usage_json(usage, cost)))

    def _message_item(self) -> dict[str, Any]:
        return {"type": "message", "id": self._item_id("msg"), "status": "in_progress",
                "role": "assistant", "content": []}  # fmt: skip

    def _reasoning_item(self, text: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": self._item_id("rs"), "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}  # fmt: skip

    def _call_item(self, call: dict[str, Any], fn: dict[str, Any]) -> dict[str, Any]:
        # The call id is ApiFast's, as on a native route (router/call_ids.py): the upstream's
        # would tell which upstream answered.
        item_id = self._item_id("fc")
        return {"type": "function_call", "id": item_id,
                "call_id": "call_" + item_id.split("_", 1)[1], "name": str(fn.get("name") or ""),
                "arguments": "", "status": "in_progress"}  # fmt: skip

    # --- streaming -------------------------------------------------------------------------

    def _emit(self, kind: str, payload: dict[str, Any]) -> bytes:
        self._seq += 1
        return _event(kind, payload, self._seq)

    def _start(self) -> bytes:
        self._started = True
        response = self._response("in_progress", [], None)
        return self._emit("response.created", {"response": response}) + self._emit(
            "response.in_progress", {"response": response}
        )

    def _open(self, item: dict[str, Any]) -> bytes:
        out = self._close()
        self._items.append(item)
        self._item = item
        index = len(self._items) - 1
        # A message is added with no content, then its part (OpenAI's order): the SDK's
        # accumulator appends each content_part.added to the added item's content.
        out += self._emit("response.output_item.added", {"output_index": index, "item": item})
        if item["type"] == "message":
            item["content"].append(_text_part(""))
            out += self._emit("response.content_part.added", {
                "item_id": item["id"], "output_index": index, "content_index": 0,
                "part": _text_part(""),
            })  # fmt: skip
        return out

    def _close(self, status: str = "completed") -> bytes:
        item = self._item
        if item is None:
            return b""
        self._item = None
        index = self._items.index(item)
        ids = {"item_id": item["id"], "output_index": index}
        out = b""
        if item["type"] == "message":
            text = item["content"][0]["text"]
            out += self._emit("response.output_text.done", {
                **ids, "content_index": 0, "text": text,
                "logprobs": item["content"][0]["logprobs"]})  # fmt: skip
            out += self._emit("response.content_part.done", {
                **ids, "content_index": 0, "part": item["content"][0]})  # fmt: skip
        elif item["type"] == "reasoning":
            text = item["content"][0]["text"]
            out += self._emit("response.reasoning_text.done", {
                **ids, "content_index": 0, "text": text})  # fmt: skip
        else:
            out += self._emit("response.function_call_arguments.done", {
                **ids, "name": item["name"], "arguments": item["arguments"]})  # fmt: skip
        item["status"] = status
        return out + self._emit("response.output_item.done", {"output_index": index, "item": item})

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        out = b"" if self._started else self._start()
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                out += self._delta(delta, choice.get("logprobs"))
            if choice.get("finish_reason"):
                self._stop = str(choice["finish_reason"])
        return out

    def _delta(self, delta: dict[str, Any], logprobs: Any = None) -> bytes:
        out = b""
        item = self._item
        thinking = delta.get("reasoning_content")
        if isinstance(thinking, str) and thinking:
            if item is None or item["type"] != "reasoning":
                out += self._open(self._reasoning_item(""))
                item = self._item
                assert item is not None
            item["content"][0]["text"] += thinking
            out += self._emit("response.reasoning_text.delta", {
                "item_id": item["id"], "output_index": len(self._items) - 1,
                "content_index": 0, "delta": thinking})  # fmt: skip
        text = delta.get("content")
        if isinstance(text, str) and text:
            if item is None or item["type"] != "message":
                out += self._open(self._message_item())
                item = self._item
                assert item is not None
            item["content"][0]["text"] += text
            tokens = _logprobs(logprobs) if logprobs else []
            item["content"][0]["logprobs"].extend(tokens)
            out += self._emit("response.output_text.delta", {
                "item_id": item["id"], "output_index": len(self._items) - 1,
                "content_index": 0, "delta": text, "logprobs": tokens})  # fmt: skip
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            fn = call.get("function") or {}
            if not isinstance(fn, dict):
                continue
            position = call.get("index", 0)
            if position not in self._tools:
                self._tools[position] = self._call_item(call, fn)
                out += self._open(self._tools[position])
            item = self._tools[position]
            arguments = fn.get("arguments")
            if isinstance(arguments, str) and arguments:
                item["arguments"] += arguments
                out += self._emit("response.function_call_arguments.delta", {
                    "item_id": item["id"], "output_index": self._items.index(item),
                    "delta": arguments})  # fmt: skip
        return out

    def stream_end(self, usage: Usage, cost: Decimal) -> bytes:
        # The item a failure or the output bound cut short is incomplete, as OpenAI marks it.
        cut = "incomplete" if self._failed is not None else self._status()
        out = (b"" if self._started else self._start()) + self._close(cut)
        if self._failed is not None:
            failed = self._response("failed", self._items, usage_json(usage, cost))
            return out + self._emit("response.failed", {"response": failed})
        status = self._status()
        response = self._response(status, self._items, usage_json(usage, cost))
        return out + self._emit(f"response.{status}", {"response": response})

    def stream_error(self, status: int) -> bytes:
        # The failure is told in stream_end, which then knows what was delivered and billed.
        self._failed = status
        return b""

    # --- from a native route (native_responses): the upstream's Response, rebuilt ----------

    def native_completion(self, upstream: dict[str, Any], usage: Usage, cost: Decimal) -> bytes:
        output = upstream.get("output")
        for raw in output if isinstance(output, list) else ():
            self._native_item(raw)
        self._native_status(upstream)
        return orjson.dumps(self._response(self._status(), self._items, usage_json(usage, cost)))

    def _native_item(self, raw: Any) -> dict[str, Any] | None:
        prefix = ITEM_PREFIXES.get(str(raw.get("type"))) if isinstance(raw, dict) else None
        item = clean_item(raw, self._item_id(prefix)) if prefix else None
        if item is not None:
            self._items.append(item)
        return item

    def _native_status(self, upstream: dict[str, Any]) -> None:
        self._stop = "stop"
        if upstream.get("status") == "incomplete":
            details = upstream.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            self._stop = INCOMPLETE_STOPS.get(str(reason), "length")

    def native_chunk(self, event: dict[str, Any]) -> bytes:
        """One upstream event under our ids and sequence numbers. The terminal event is
        ours to write (stream_end, with the priced usage); events of items not relayed, and
        event types not known, are left out."""
        out = b"" if self._started else self._start()
        kind = event.get("type")
        upstream = self._upstream
        if upstream is None:
            upstream = self._upstream = {}
        if kind in ("response.completed", "response.incomplete"):
            response = event.get("response")
            if isinstance(response, dict):
                self._native_status(response)
                self._native_final(response.get("output"), upstream)
            return out
        if kind == "response.output_item.added":
            raw = event.get("item")
            item = self._native_item(raw)
            if item is None:
                return out
            assert isinstance(raw, dict)
            index = len(self._items) - 1
            for key in (raw.get("id"), event.get("output_index")):
                if isinstance(key, (str, int)):
                    upstream[key] = index
            return out + self._emit(kind, {"output_index": index, "item": item})
        if kind not in _NATIVE_EVENTS:
            return out
        found: int | None = None
        for key in (event.get("item_id"), event.get("output_index")):
            if found is None and isinstance(key, (str, int)):
                found = upstream.get(key)
        if found is None:
            return out
        index = found
        item = self._items[index]
        if kind == "response.output_item.done":
            done = clean_item(event.get("item"), item["id"])
            if done is not None:
                item.clear()
                item.update(done)
            return out + self._emit(kind, {"output_index": index, "item": item})
        payload: dict[str, Any] = {"item_id": item["id"], "output_index": index}
        for name in EVENT_FIELDS:
            if name in event:
                payload[name] = event[name]
        if "part" in event:
            part = clean_part(event["part"])
            if part is None:
                return out
            payload["part"] = part
            if kind == "response.content_part.added" and isinstance(item.get("content"), list):
                item["content"].append(dict(part))
        delta = event.get("delta")
        if isinstance(delta, str):
            _accumulate(kind, item, event.get("content_index"), delta)
        return out + self._emit(kind, payload)

    def _native_final(self, output: Any, upstream: dict[str | int, int]) -> None:
        """The upstream's final output, over what the events built (they may skip parts)."""
        for raw in output if isinstance(output, list) else ():
            key = raw.get("id") if isinstance(raw, dict) else None
            index = upstream.get(key) if isinstance(key, str) else None
            if index is None:
                self._native_item(raw)
                continue
            known = self._items[index]
            done = clean_item(raw, known["id"])
            if done is not None:
                known.clear()
                known.update(done)

    def native_chars(self, item: dict[str, Any]) -> int:
        """Characters delivered in one upstream event, or in a whole Response's output."""
        delta = item.get("delta")
        if isinstance(delta, str):
            return len(delta)
        output = item.get("output") if item.get("object") == "response" else None
        return sum(item_chars(i) for i in output) if isinstance(output, list) else 0


# The upstream events relayed, under our ids (the terminal ones and output_item.added are
# handled on their own).
_NATIVE_EVENTS = frozenset({
    "response.output_item.done", "response.content_part.added", "response.content_part.done",
    "response.output_text.delta", "response.output_text.done", "response.refusal.delta",
    "response.refusal.done", "response.function_call_arguments.delta",
    "response.function_call_arguments.done", "response.reasoning_summary_part.added",
    "response.reasoning_summary_part.done", "response.reasoning_summary_text.delta",
    "response.reasoning_summary_text.done", "response.reasoning_text.delta",
    "response.reasoning_text.done",
})  # fmt: skip


def _accumulate(kind: str, item: dict[str, Any], content_index: Any, delta: str) -> None:
    """A delta added to our copy of its item, so a stream that fails mid-item still lists
    what it delivered."""
    if kind == "response.function_call_arguments.delta":
        item["arguments"] = str(item.get("arguments") or "") + delta
        return
    field = {"response.output_text.delta": "text", "response.refusal.delta": "refusal"}.get(kind)
    parts = item.get("content")
    if field and isinstance(parts, list) and isinstance(content_index, int):
        if 0 <= content_index < len(parts) and isinstance(parts[content_index].get(field), str):
            parts[content_index][field] += delta


def _text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _logprob(entry: dict[str, Any]) -> dict[str, Any]:
    return {"token": str(entry.get("token") or ""), "logprob": entry.get("logprob"),
            "bytes": entry.get("bytes")}  # fmt: skip


def _logprobs(logprobs: Any) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` as output_text logprobs (the same shape), asked for with
    `top_logprobs` or include `message.output_text.logprobs`; only the known keys."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return []
    out = []
    for entry in content:
        if isinstance(entry, dict):
            top = entry.get("top_logprobs")
            out.append({**_logprob(entry), "top_logprobs": [
                _logprob(t) for t in top if isinstance(t, dict)
            ] if isinstance(top, list) else []})  # fmt: skip
    return out
