"""The `anthropic` provider: OpenAI chat completions served by Anthropic's Messages API.

Request (OpenAI -> `POST {base_url}/v1/messages`, `anthropic-version: 2023-06-01`):
- `system`/`developer` messages, wherever they occur, become the top-level `system` (a string,
  or text blocks when a part carries `cache_control`). `cache_control` on content parts, on a
  message (applied to its last block) and on tools passes through.
- text parts -> text blocks; `image_url` -> image blocks (`data:` URLs as base64 sources,
  http(s) as url sources); `file` parts with a PDF `data:` URL -> document blocks.
- assistant `tool_calls` -> `tool_use` blocks (arguments parsed to an object); `tool` messages
  -> `tool_result` blocks in a user turn. Consecutive same-role turns are merged, since
  Anthropic wants user/assistant alternation, with tool results first in their turn.
- `tools` -> {name, description, input_schema}; `tool_choice` auto/required/none/function ->
  auto/any/none/tool; `parallel_tool_calls: false` -> `disable_parallel_tool_use`.
- `max_completion_tokens`/`max_tokens` -> `max_tokens` (Anthropic requires it; default
  `options.default_max_tokens`, 4096); `temperature`, `top_p`, `top_k`; `stop` ->
  `stop_sequences` (whitespace-only sequences dropped).
- `response_format` json_object/json_schema -> an instruction appended to `system`; with
  `options.native_structured_outputs = true`, json_schema -> `output_config.format` instead.
- `reasoning_effort` low/medium/high/xhigh -> `thinking` with a 1024/4096/16384/32768 token
  budget (kept below `max_tokens`; skipped when a tool is forced, an earlier assistant turn
  called tools, whose thinking blocks cannot be replayed, or `max_tokens` leaves no room for
  Anthropic's minimum budget of 1024). With thinking, temperature/top_p/top_k other than 1
  are refused (Anthropic takes none beside it). `minimal` and `none` -> no thinking.
- Refused before the hold (`check_request`, `UnsupportedParameter`: a 400 naming the field),
  as Anthropic has no equivalent: `n` > 1, `temperature` above 1 (Anthropic's range is 0..1),
  `top_p` < 1 together with `temperature` (newer models refuse both), `logprobs` /
  `top_logprobs`, non-zero `presence_penalty` / `frequency_penalty`, a non-empty
  `logit_bias`, `verbosity` other than medium, audio output, an unknown `reasoning_effort`.
  Dropped as hints or caller-identifying: `user`, `metadata`, `seed` (best effort even at
  OpenAI), `stream_options`, `prediction`, `top_p` of 1 next to `temperature` (a no-op).

Response (Anthropic -> OpenAI):
- text blocks -> `message.content`; `tool_use` -> `message.tool_calls`; thinking text ->
  `message.reasoning_content` (streamed as `delta.reasoning_content`).
- stop_reason end_turn/stop_sequence/pause_turn -> "stop", max_tokens -> "length",
  tool_use -> "tool_calls", refusal -> "content_filter".
- Anthropic's `input_tokens` excludes cache reads and writes; `Usage.input_tokens` is the sum
  of all three, `cached_tokens` = cache reads, `cache_write_tokens` = cache writes. Usage
  that is missing, or has a count that is not a non-negative number, is reported as none
  (`usage=None`, no `Usage` in a stream): the router bills its documented estimate.
- Errors: HTTP status and Anthropic error type only, never bodies. A stream's `error` event
  maps its type to the status Anthropic would have answered with (overloaded_error -> 529).

Provider options (extra keys of `[providers.NAME]`): `default_max_tokens` (4096),
`native_structured_outputs` (false), `anthropic_beta` (a string or list, sent as the
`anthropic-beta` header), `max_connections` (4096; 0 = unlimited).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from apifast import hookimpl
from apifast.plugins.providers.http1 import (
    Http1Client,
    HttpError,
    Response,
    connection_limit,
    encode_headers,
)
from apifast.plugins.providers.sse import SseDecoder
from apifast.plugins.providers.upstream_json import loads
from apifast.providers import (
    ChatRequest,
    ChatResponse,
    NativeRequest,
    PartialUsage,
    Provider,
    ProviderConfig,
    StreamItem,
    UnsupportedParameter,
    UpstreamError,
    UpstreamTimeout,
    Usage,
    parse_retry_after,
    token_count,
)

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_MAX_TOKENS = 4096

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Status Anthropic answers each error type with; used for `error` events inside a stream.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
THINKING_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768}
# reasoning_effort values whose equivalent is no thinking at all.
_NO_THINKING = ("minimal", "none")
_MIN_THINKING_BUDGET = 1024
_ERROR_TYPE_RE = re.compile(r"[a-z_]{1,40}")
_DATA_URL_RE = re.compile(r"data:([\w.+-]+/[\w.+-]+)(?:;[^,]*)?;base64,(.*)", re.DOTALL)


def _bad_request(message: str) -> UpstreamError:
    # The request cannot be expressed for Anthropic; retrying elsewhere would not help.
    return UpstreamError(400, message, retryable=False)


# --- OpenAI request -> Anthropic request ---------------------------------------------------


def _text_block(part: dict[str, Any]) -> dict[str, Any] | None:
    text = part.get("text") or part.get("refusal") or ""
    return {"type": "text", "text": text} if text else None


def _image_block(part: dict[str, Any]) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _bad_request("image_url part without a url")
    match = _DATA_URL_RE.match(url)
    if match:
        source = {"type": "base64", "media_type": match[1], "data": match[2]}
    elif url.startswith(("https://", "http://")):
        source = {"type": "url", "url": url}
    else:
        raise _bad_request("unsupported image_url scheme")
    return {"type": "image", "source": source}


def _document_block(part: dict[str, Any]) -> dict[str, Any]:
    file = part.get("file") or {}
    match = _DATA_URL_RE.match(file.get("file_data") or "")
    if not match or match[1] != "application/pdf":
        raise _bad_request("only PDF file parts given as data: URLs are supported")
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": match[1], "data": match[2]},
    }


_PART_CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {
    "text": _text_block,
    "refusal": _text_block,
    "image_url": _image_block,
    "file": _document_block,
}


def _content_blocks(content: Any) -> list[dict[str, Any]]:
    """OpenAI message content (a string or content parts) as Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise _bad_request("message content must be a string or a list of parts")
    blocks = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        convert = _PART_CONVERTERS.get(kind) if isinstance(kind, str) else None
        if convert is None:
            raise _bad_request("unsupported content part type")
        block = convert(part)
        if block is not None:
            if "cache_control" in part:
                block["cache_control"] = part["cache_control"]
            blocks.append(block)
    return blocks


def _tool_use_block(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise _bad_request("tool_calls entry without a function")
    arguments = function.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise _bad_request("tool call arguments are not a JSON object")
    return {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": parsed}


def _tool_result_block(message: dict[str, Any]) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.get("tool_call_id")}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif content:
        block["content"] = _content_blocks(content)
    return block


def _append_turn(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _finish_turns(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for turn in turns:
        blocks = turn["content"]
        if turn["role"] == "user":
            # Anthropic wants tool results before any other block of their turn.
            blocks.sort(key=lambda b: b.get("type") != "tool_result")
        if len(blocks) == 1 and blocks[0]["type"] == "text" and "cache_control" not in blocks[0]:
            turn["content"] = blocks[0]["text"]
    return turns


def _convert_messages(
    messages: Any,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Returns (system text blocks, Anthropic messages)."""
    if not isinstance(messages, list) or not messages:
        raise _bad_request("messages must be a non-empty list")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            raise _bad_request("messages entries must be objects")
        role = message.get("role")
        if role in ("system", "developer"):
            blocks = _content_blocks(message.get("content"))
            if any(b["type"] != "text" for b in blocks):
                raise _bad_request("system messages may contain text only")
            system.extend(blocks)
            continue
        if role == "tool":
            blocks = [_tool_result_block(message)]
            role = "user"
        elif role in ("user", "assistant"):
            blocks = _content_blocks(message.get("content"))
            if role == "assistant":
                blocks.extend(_tool_use_block(c) for c in message.get("tool_calls") or ())
                if not blocks:
                    continue  # an empty assistant turn carries nothing and Anthropic rejects it
        else:
            raise _bad_request("unsupported message role")
        if blocks and "cache_control" in message:
            blocks[-1]["cache_control"] = message["cache_control"]
        _append_turn(turns, role, blocks)
    return system, _finish_turns(turns)


def _convert_tools(tools: Any) -> list[dict[str, Any]]:
    converted = []
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            continue  # OpenAI-only tool kinds have no Anthropic counterpart
        entry: dict[str, Any] = {"name": function.get("name")}
        if function.get("description"):
            entry["description"] = function["description"]
        entry["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
        if "cache_control" in tool:
            entry["cache_control"] = tool["cache_control"]
        converted.append(entry)
    return converted


def _convert_tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    converted: dict[str, Any] | None
    if choice is None:
        converted = None
    elif choice in ("auto", "required", "none"):
        converted = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        converted = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise _bad_request("unsupported tool_choice")
    if parallel is False:
        converted = converted or {"type": "auto"}
        if converted["type"] != "none":
            converted["disable_parallel_tool_use"] = True
    return converted


def _json_instruction(response_format: Any, native: bool) -> tuple[str | None, Any]:
    """Returns (a system instruction, an `output_config.format`) for `response_format`."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return "Respond with a single valid JSON object and nothing else.", None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        if native:
            return None, {"type": "json_schema", "schema": schema}
        return (
            "Respond with a single JSON value that conforms to this JSON Schema, and nothing "
            "else:\n" + orjson.dumps(schema).decode()
        ), None
    return None, None


def _thinking(body: dict[str, Any], max_tokens: int, tool_choice: Any) -> dict[str, Any] | None:
    budget = THINKING_BUDGETS.get(body.get("reasoning_effort") or "")
    if budget is None or (tool_choice and tool_choice["type"] in ("any", "tool")):
        return None
    if any(m.get("role") == "assistant" and m.get("tool_calls") for m in body["messages"]):
        return None
    budget = min(budget, max_tokens - 1)
    if budget < _MIN_THINKING_BUDGET:
        return None
    return {"type": "enabled", "budget_tokens": budget}


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnsupportedParameter(name, "must be a number")
    return float(value)


def check_chat_body(body: dict[str, Any]) -> None:
    """Raise `UnsupportedParameter` for a field of a chat body that Anthropic's Messages API
    has no equivalent for, rather than drop it. Dictionary look-ups only: runs before the
    hold on every request to an Anthropic route."""
    if (body.get("n") or 1) != 1:
        raise UnsupportedParameter("n", "Anthropic models give one choice per request (n: 1)")
    temperature = _number(body, "temperature")
    if temperature is not None and not 0 <= temperature <= 1:
        raise UnsupportedParameter("temperature", "must be from 0 to 1 on this model's provider")
    top_p = _number(body, "top_p")
    if top_p is not None and temperature is not None and top_p != 1:
        raise UnsupportedParameter(
            "top_p", "this model's provider takes temperature or top_p, not both"
        )
    if body.get("logprobs") or body.get("top_logprobs"):
        name = "top_logprobs" if body.get("top_logprobs") else "logprobs"
        raise UnsupportedParameter(name, "this model's provider gives no log probabilities")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name):
            raise UnsupportedParameter(name, "this model's provider has no such penalty")
    if body.get("logit_bias"):
        raise UnsupportedParameter("logit_bias", "this model's provider has no logit bias")
    if body.get("verbosity") not in (None, "medium"):
        raise UnsupportedParameter("verbosity", "this model's provider has no verbosity setting")
    if body.get("audio") is not None or "audio" in (body.get("modalities") or ()):
        raise UnsupportedParameter("modalities", "this model's provider answers in text only")
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in THINKING_BUDGETS and effort not in _NO_THINKING:
        raise UnsupportedParameter(
            "reasoning_effort", "must be none, minimal, low, medium, high or xhigh"
        )
    if effort in THINKING_BUDGETS and _may_think(body):
        # Anthropic refuses sampling parameters beside thinking (as OpenAI's reasoning
        # models do); 1 is their default, so it needs no sending.
        for name in ("temperature", "top_p", "top_k"):
            if body.get(name) not in (None, 1):
                raise UnsupportedParameter(
                    name, "this model's provider takes no sampling parameter with reasoning_effort"
                )


def _may_think(body: dict[str, Any]) -> bool:
    """Whether thinking can be on: no forced tool, no earlier tool calls to replay."""
    choice = body.get("tool_choice")
    if choice == "required" or isinstance(choice, dict):
        return False
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    return not any(
        isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls")
        for m in messages
    )


# Fields of a Messages request that /v1/messages/count_tokens does not take.
_NOT_COUNTED = ("max_tokens", "stream", "temperature", "top_p", "top_k", "stop_sequences",
                "metadata", "service_tier")  # fmt: skip


def to_anthropic_request(
    body: dict[str, Any], *, default_max_tokens: int, native_structured_outputs: bool = False
) -> dict[str, Any]:
    """An Anthropic Messages request for an OpenAI chat-completions body."""
    check_chat_body(body)
    system, messages = _convert_messages(body.get("messages"))
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _bad_request("max_tokens must be a positive integer")
    out: dict[str, Any] = {"model": body.get("model"), "max_tokens": max_tokens}

    instruction, output_format = _json_instruction(
        body.get("response_format"), native_structured_outputs
    )
    if instruction:
        system.append({"type": "text", "text": instruction})
    if output_format:
        out["output_config"] = {"format": output_format}
    if any("cache_control" in b for b in system):
        out["system"] = system
    elif system:
        out["system"] = "\n\n".join(b["text"] for b in system)
    out["messages"] = messages

    tools = _convert_tools(body.get("tools"))
    tool_choice = _convert_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if tools:
        out["tools"] = tools
        if tool_choice:
            out["tool_choice"] = tool_choice
    else:
        tool_choice = None

    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if stops := [s for s in stops if isinstance(s, str) and s.strip()]:
        out["stop_sequences"] = stops

    thinking = _thinking(body, out["max_tokens"], tool_choice)
    if thinking:
        out["thinking"] = thinking  # Anthropic rejects sampling parameters with thinking
    elif body.get("temperature") is not None:
        out["temperature"] = body["temperature"]  # within 0..1 (check_chat_body)
    elif body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    if not thinking and isinstance(body.get("top_k"), int):
        out["top_k"] = body["top_k"]
    return out


# --- Anthropic response -> OpenAI response -------------------------------------------------


def usage_from_anthropic(raw: Any) -> Usage | None:
    """Anthropic's usage as a `Usage`, or None when it is missing or any count in it is not
    a non-negative number (the router then bills the documented estimate). Never raises."""
    if not isinstance(raw, dict):
        return None
    given = token_count(raw.get("input_tokens"))
    output = token_count(raw.get("output_tokens"))
    cache_read = _cache_count(raw, "cache_read_input_tokens")
    cache_write = _cache_count(raw, "cache_creation_input_tokens")
    if given is None or output is None or cache_read is None or cache_write is None:
        return None
    return Usage(
        input_tokens=given + cache_read + cache_write,
        output_tokens=output,
        cached_tokens=cache_read,
        cache_write_tokens=cache_write,
    )


def _partial(usage: Usage) -> PartialUsage:
    u = usage
    return PartialUsage(u.input_tokens, u.output_tokens, u.cached_tokens, u.cache_write_tokens)


def _cache_count(raw: dict[str, Any], name: str) -> int | None:
    value = raw.get(name)
    return 0 if value is None else token_count(value)


def openai_usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    arguments = orjson.dumps(block.get("input") or {}).decode()
    return {
        "id": block.get("id"),
        "type": "function",
        "function": {"name": block.get("name"), "arguments": arguments},
    }


def to_openai_completion(message: dict[str, Any], model: str) -> ChatResponse:
    """An OpenAI `chat.completion` for an Anthropic Message."""
    texts: list[str] = []
    reasoning: list[str] = []
    tool_calls = []
    for block in message.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            tool_calls.append(_tool_call(block))
        elif kind == "thinking":
            reasoning.append(block.get("thinking") or "")
    reply: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        reply["tool_calls"] = tool_calls
    if reasoning:
        reply["reasoning_content"] = "".join(reasoning)
    usage = usage_from_anthropic(message.get("usage"))
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": reply,
                "finish_reason": FINISH_REASONS.get(message.get("stop_reason") or "", "stop"),
                "logprobs": None,
            }
        ],
    }
    if usage is not None:  # else the router bills (and shows) its documented estimate
        body["usage"] = openai_usage(usage)
    return ChatResponse(body=body, usage=usage)


# --- Streaming -----------------------------------------------------------------------------


class StreamTranslator:
    """Turns Anthropic stream events into OpenAI `chat.completion.chunk` dicts."""

    def __init__(self, model: str) -> None:
        self._base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self._usage: dict[str, Any] = {}  # as sent: usage_from_anthropic judges it
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self._tools_with_args: set[int] = set()
        self.started = False
        self.finished = False

    def usage(self) -> Usage | None:
        return usage_from_anthropic(self._usage)

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self._base, "choices": [choice]}

    def _tool_delta(self, block_index: int, call: dict[str, Any]) -> dict[str, Any]:
        return self._chunk({"tool_calls": [{"index": self._tools[block_index], **call}]})

    def _record_usage(self, raw: Any) -> None:
        if isinstance(raw, dict):
            self._usage.update((k, v) for k, v in raw.items() if v is not None)

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        index = event.get("index", 0)
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if dtype == "input_json_delta" and index in self._tools:
                partial = delta.get("partial_json") or ""
                if not partial:
                    return []
                self._tools_with_args.add(index)
                return [self._tool_delta(index, {"function": {"arguments": partial}})]
            if dtype == "thinking_delta":
                return [self._chunk({"reasoning_content": delta.get("thinking", "")})]
            return []
        if kind == "message_start":
            self.started = True
            self._record_usage((event.get("message") or {}).get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            if block.get("type") == "tool_use":
                self._tools[index] = len(self._tools)
                call = _tool_call(block)
                if block.get("input"):
                    self._tools_with_args.add(index)
                else:
                    call["function"]["arguments"] = ""
                return [self._tool_delta(index, call)]
            return []
        if kind == "content_block_stop":
            if index in self._tools and index not in self._tools_with_args:
                # A tool without arguments still needs a parseable JSON object.
                self._tools_with_args.add(index)
                return [self._tool_delta(index, {"function": {"arguments": "{}"}})]
            return []
        if kind == "message_delta":
            self._record_usage(event.get("usage"))
            stop_reason = (event.get("delta") or {}).get("stop_reason")
            if stop_reason:
                return [self._chunk({}, FINISH_REASONS.get(stop_reason, "stop"))]
            return []
        if kind == "message_stop":
            self.finished = True
        elif kind == "error":
            error_type = _error_type((event.get("error") or {}).get("type"))
            status = ERROR_STATUS.get(error_type, 500)
            raise UpstreamError(status, f"anthropic stream error {status} ({error_type})")
        return []  # ping and event kinds added by later API versions


# --- HTTP ----------------------------------------------------------------------------------


def _error_type(value: Any) -> str:
    # Only a short identifier may reach the logs, never free text from the upstream.
    return value if isinstance(value, str) and _ERROR_TYPE_RE.fullmatch(value) else "unknown"


def _http_error(status: int, raw: bytes, retry_after: bytes = b"") -> UpstreamError:
    try:
        error_type = _error_type(orjson.loads(raw)["error"]["type"])
    except Exception:
        error_type = "unknown"
    # Anthropic asks clients to retry 408 and 409 as well as 429 and 5xx (incl. 529).
    retryable = status in (408, 409, 429) or status >= 500
    return UpstreamError(
        status, f"anthropic HTTP {status} ({error_type})", retryable=retryable,
        retry_after_s=parse_retry_after(retry_after) if retry_after else None,
    )  # fmt: skip


def _transport_error(exc: BaseException, stage: str) -> UpstreamError:
    """Maps client failures; names the failure only (the client's messages hold no content)."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"anthropic timed out ({stage})")
    cause = exc.cause if isinstance(exc, HttpError) else "unknown"
    return UpstreamError(None, f"anthropic {stage} failed ({exc})", cause=cause)


def _parse_event(data: bytes) -> dict[str, Any]:
    try:
        event = loads(data)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise UpstreamError(502, "anthropic sent a malformed stream event")
    return event


def _is_message(value: Any) -> bool:
    """A Message object: type "message" and a list of content blocks (objects)."""
    if not isinstance(value, dict) or value.get("type") != "message":
        return False
    content = value.get("content")
    return isinstance(content, list) and all(isinstance(block, dict) for block in content)


class AnthropicProvider(Provider):
    native_protocols = frozenset({"messages"})
    type = "anthropic"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self._base_url = (config.base_url or DEFAULT_BASE_URL).rstrip("/")
        # No User-Agent and no cookies: nothing that could tell requests apart goes upstream.
        headers = {
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
            "accept-encoding": "gzip, deflate",
        }
        if config.api_key is not None:
            headers["x-api-key"] = config.api_key
        beta = config.options.get("anthropic_beta")
        if beta:
            headers["anthropic-beta"] = beta if isinstance(beta, str) else ",".join(beta)
        self._headers = encode_headers(headers)
        self._default_max_tokens = int(config.options.get("default_max_tokens", DEFAULT_MAX_TOKENS))
        self._native_structured_outputs = bool(config.options.get("native_structured_outputs"))
        self._client: Http1Client | None = None

    def _get_client(self) -> Http1Client:
        if self._client is None:
            # The lean keep-alive client the OpenAI plugin uses: aiohttp cost ~10x the CPU.
            self._client = Http1Client(
                self._base_url,
                limit=connection_limit(self.config.options),
                connect_timeout=self.config.connect_timeout_s,
                read_timeout=self.config.read_timeout_s,
                keepalive_s=30,
            )
        return self._client

    async def start(self) -> None:
        self._get_client()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def check_request(self, request: ChatRequest) -> None:
        check_chat_body(request.body)

    def _payload(self, request: ChatRequest, *, stream: bool) -> bytes:
        payload = to_anthropic_request(
            request.body,
            default_max_tokens=self._default_max_tokens,
            native_structured_outputs=self._native_structured_outputs,
        )
        payload["model"] = request.model
        if stream:
            payload["stream"] = True
        return orjson.dumps(payload)

    async def _post(self, path: str, payload: bytes, *, stream: bool = False) -> Response:
        try:
            response = await self._get_client().request(
                b"POST", path, payload, self._headers, stream=stream
            )
        except HttpError as exc:
            raise _transport_error(exc, "request") from None
        if response.status != 200:
            try:
                raw = await response.read()
            except HttpError:
                raw = b""
            raise _http_error(response.status, raw, response.retry_after)
        return response

    async def _post_json(self, path: str, payload: bytes) -> Any:
        response = await self._post(path, payload)
        try:
            raw = await response.read()
        except HttpError as exc:
            raise _transport_error(exc, "response") from None
        try:
            return loads(raw)
        except ValueError:
            raise UpstreamError(502, "anthropic sent a malformed response") from None

    async def chat(self, request: ChatRequest) -> ChatResponse:
        message = await self._post_json("/v1/messages", self._payload(request, stream=False))
        try:
            return to_openai_completion(message, request.model)
        except (AttributeError, TypeError, ValueError):
            raise UpstreamError(502, "anthropic sent a malformed response") from None

    async def count_tokens(self, request: ChatRequest) -> int | None:
        return await self._count(orjson.loads(self._payload(request, stream=False)))

    async def count_tokens_native(self, request: NativeRequest) -> int | None:
        if request.protocol != "messages":
            return None
        return await self._count({**request.body, "model": request.model})

    async def _count(self, payload: dict[str, Any]) -> int:
        # count_tokens takes the prompt's fields only.
        for name in _NOT_COUNTED:
            payload.pop(name, None)
        counted = await self._post_json("/v1/messages/count_tokens", orjson.dumps(payload))
        try:
            count = counted["input_tokens"]
        except (KeyError, TypeError):
            raise UpstreamError(502, "anthropic sent a malformed token count") from None
        if type(count) is not int or count < 0:
            raise UpstreamError(502, "anthropic sent a malformed token count")
        return count

    async def native(self, request: NativeRequest) -> ChatResponse:
        # The Messages API itself: a pass-through, so cache_control and thinking survive.
        payload = {**request.body, "model": request.model}
        payload.pop("stream", None)
        message = await self._post_json("/v1/messages", orjson.dumps(payload))
        if not _is_message(message):  # passed through: only a Message may reach the client
            raise UpstreamError(502, "anthropic sent a malformed response")
        try:
            # No usage (or none to believe): None, and the router bills its estimate.
            return ChatResponse(body=message, usage=usage_from_anthropic(message.get("usage")))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise UpstreamError(502, "anthropic sent a malformed response") from None

    def stream_native(self, request: NativeRequest) -> AsyncIterator[StreamItem]:
        payload = {**request.body, "model": request.model, "stream": True}
        return self._relay(orjson.dumps(payload), request.model, native=True)

    def stream_chat(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        return self._relay(self._payload(request, stream=True), request.model, native=False)

    async def _relay(
        self, payload: bytes, model: str, *, native: bool
    ) -> AsyncIterator[StreamItem]:
        """Anthropic's events, translated to chat chunks, or (`native`) as they came, minus
        pings; then the usage. The translator reads usage and errors in both cases."""
        response = await self._post("/v1/messages", payload, stream=True)
        translator = StreamTranslator(model)
        decoder = SseDecoder()
        failure: UpstreamError | None = None
        chunks = response.chunks()
        try:
            while not translator.finished and failure is None:
                try:
                    chunk = await anext(chunks, b"")
                except HttpError as exc:
                    failure = _transport_error(exc, "stream")
                    break
                if not chunk:
                    break
                for _event, data in decoder.feed(chunk):
                    try:
                        event = _parse_event(data)
                        items = translator.handle(event)
                        if native:
                            items = [] if event.get("type") == "ping" else [event]
                    except UpstreamError as exc:
                        failure = exc
                    except (AttributeError, TypeError, ValueError):
                        failure = UpstreamError(502, "anthropic sent a malformed stream event")
                    if failure is not None or translator.finished:
                        break
                    for item in items:
                        yield item
                    if event.get("type") == "message_start":
                        # The input is known now: a client gone mid-stream is billed it, not
                        # the router's byte estimate (an image or a document costs far more).
                        if (usage := translator.usage()) is not None:
                            yield _partial(usage)
        finally:
            response.close()
        if failure is None and not translator.finished:
            failure = UpstreamError(
                None, "anthropic stream ended before message_stop", cause="reset"
            )
        # Input tokens are known from message_start on, so even a broken stream is billed;
        # its output count is not final before message_stop.
        if translator.started and (usage := translator.usage()) is not None:
            yield usage if translator.finished else _partial(usage)
        if failure is not None:
            raise failure

    async def check(self) -> None:
        try:
            response = await self._get_client().request(
                b"GET", "/v1/models?limit=1", b"", self._headers
            )
            raw = await response.read()
        except HttpError as exc:
            raise _transport_error(exc, "check") from None
        if response.status != 200:
            raise _http_error(response.status, raw)


@hookimpl
def register_provider_types(register: Callable[[str, type[Any]], None]) -> None:
    register("anthropic", AnthropicProvider)
