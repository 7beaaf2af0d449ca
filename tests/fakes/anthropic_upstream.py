"""A fake Anthropic Messages API: a real HTTP server on 127.0.0.1 speaking Anthropic's wire format.

Serves `POST /v1/messages` (JSON or server-sent events) and `GET /v1/models`, checks
`x-api-key` and `anthropic-version`, validates the body the way Anthropic does (unknown
top-level fields, missing `max_tokens`, roles, tool_result ids, ...; it is stricter than
Anthropic in one way: consecutive same-role turns are rejected rather than merged, so a client
that forgets to merge them is caught) and records every request for assertions.

Behaviour per request: the next entry of the `script` list (consumed), else the `behaviour`
attribute if set, else a `[fake:NAME]` marker in the last user turn's text, else "text":
  text          a short text answer (`reply_text`)
  tool_use      a text block, then a tool_use block per request tool (or the forced one),
                with `tool_input` as input
  cache         like text, with `cache_read_tokens` / `cache_creation_tokens` in usage
  max_tokens    like text, stopped by max_tokens
  refusal       like text, stop_reason "refusal"
  error_NNN     HTTP NNN with Anthropic's error body (429, 500, 529, 400, 401, 403, 404, 413)
  slow          waits `delay_s` (cut short by `stop()`) before answering with text
  broken        streams a few deltas then drops the connection (non-stream: a truncated body)
  stall         streams a few deltas then waits `delay_s` (cut short by `stop()`) and finishes
  stream_error  streams a few deltas then sends an `error` event (overloaded_error)
Requests with `thinking` enabled get a thinking block first.

Use `async with FakeAnthropic() as fake:` in a test's event loop, or
`with FakeAnthropic().running_in_thread() as fake:` from synchronous code.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
import secrets
import string
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.wire_json import RawAnswer, dumps, send_raw

API_KEY = "sk-ant-fake-key"
MODELS = ("claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001", "claude-opus-4-1-20250805")

ERROR_TYPES = {
    400: ("invalid_request_error", "Invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "Not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}
_TOP_LEVEL_FIELDS = {
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
    "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier",
    "output_config", "container", "mcp_servers", "context_management",
}  # fmt: skip
_BLOCK_TYPES = {
    "text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
}  # fmt: skip
_MARKER_RE = re.compile(r"\[fake:([a-z0-9_]+)\]")
_ALPHABET = string.ascii_letters + string.digits


def _anthropic_id(prefix: str) -> str:
    return prefix + "01" + "".join(secrets.choice(_ALPHABET) for _ in range(22))


class _Invalid(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    raw_header_names: list[str]
    body: Any


@dataclass
class FakeAnthropic:
    api_key: str = API_KEY
    behaviour: str | None = None
    script: list[str] = field(default_factory=list)
    reply_text: str = "Hello from the fake Claude."
    tool_input: dict[str, Any] = field(default_factory=lambda: {"city": "Paris", "unit": "c"})
    input_tokens: int = 21
    output_tokens: int = 9
    cache_read_tokens: int = 1800
    cache_creation_tokens: int = 200
    delay_s: float = 30.0
    usage_override: Any = None  # reported as is (message and stream events), however wrong
    omit_usage: bool = False  # messages and stream events carry no `usage` at all
    raw_answer: RawAnswer | None = None  # sent as is to every message request (wire_json.py)
    count_tokens_base: int = 1000  # count_tokens answers this plus the messages' bytes / 4
    # When set, stream bytes are written in pieces of this size, so events straddle reads.
    fragment_size: int | None = None
    # Sent in every stream right after message_start, as they are: events of a type added by
    # a later API version (Anthropic: "we may occasionally add new event types").
    extra_events: list[dict[str, Any]] = field(default_factory=list)
    # Added to every content block event of a stream: fields a later version may add.
    extra_block_fields: dict[str, Any] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeAnthropic:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator[FakeAnthropic]:
        """Serves from a private event loop on a daemon thread, for synchronous callers."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fake-anthropic", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result()
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    @property
    def last_request(self) -> RecordedRequest:
        return self.requests[-1]

    # --- HTTP plumbing ---------------------------------------------------------------------

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {
            "request-id": _anthropic_id("req_"),
            "anthropic-organization-id": "5f0b7a4e-0c7e-4a59-9d47-6f5cbd3c2a11",
            "anthropic-ratelimit-requests-limit": "4000",
            "anthropic-ratelimit-requests-remaining": "3999",
            "anthropic-ratelimit-requests-reset": "2025-01-01T00:00:01Z",
            "anthropic-ratelimit-input-tokens-limit": "2000000",
            "anthropic-ratelimit-input-tokens-remaining": "2000000",
            "anthropic-ratelimit-input-tokens-reset": "2025-01-01T00:00:01Z",
            "anthropic-ratelimit-output-tokens-limit": "400000",
            "anthropic-ratelimit-output-tokens-remaining": "400000",
            "anthropic-ratelimit-output-tokens-reset": "2025-01-01T00:00:01Z",
            "anthropic-ratelimit-tokens-limit": "2400000",
            "anthropic-ratelimit-tokens-remaining": "2400000",
            "anthropic-ratelimit-tokens-reset": "2025-01-01T00:00:01Z",
            "via": "1.1 google",
            "cf-cache-status": "DYNAMIC",
            "server": "cloudflare",
        }
        headers.update(extra)
        return headers

    def _error(self, status: int, message: str | None = None) -> web.Response:
        error_type, default_message = ERROR_TYPES.get(status, ("api_error", "Error"))
        headers = self._headers(**{"x-should-retry": "true" if status >= 429 else "false"})
        if status in (429, 529):
            headers["retry-after"] = "1"
        request_id = headers["request-id"]
        body = {
            "type": "error",
            "error": {"type": error_type, "message": message or default_message},
            "request_id": request_id,
        }
        return web.Response(
            status=status, body=dumps(body), content_type="application/json",
            headers=headers,
        )  # fmt: skip

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers={k.lower(): v for k, v in request.headers.items()},
                raw_header_names=list(request.headers.keys()),
                body=body,
            )
        )
        return body

    def _check_auth(self, request: web.Request) -> None:
        key = request.headers.get("x-api-key")
        if key is None:
            raise _Invalid(401, "x-api-key header is required")
        if key != self.api_key:
            raise _Invalid(401, "invalid x-api-key")
        if "anthropic-version" not in request.headers:
            raise _Invalid(400, "anthropic-version: header is required")

    async def _not_found(self, request: web.Request) -> web.Response:
        await self._record(request)
        return self._error(404, f"Not Found: {request.path}")

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        try:
            self._check_auth(request)
        except _Invalid as exc:
            return self._error(exc.status, exc.message)
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-08-05T00:00:00Z"}
            for m in MODELS
        ]
        body = {"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}
        return web.json_response(body, headers=self._headers(), dumps=lambda v: dumps(v).decode())

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        try:
            self._check_auth(request)
            if not isinstance(body, dict):
                raise _Invalid(400, "There was an error parsing the body of your request.")
            _validate(body)
        except _Invalid as exc:
            return self._error(exc.status, exc.message)
        if self.raw_answer is not None:
            return await send_raw(request, self.raw_answer)
        behaviour = (self.script.pop(0) if self.script else self.behaviour) or _marker(body)
        behaviour = behaviour or "text"
        if behaviour.startswith("error_"):
            return self._error(int(behaviour.removeprefix("error_")))
        if behaviour == "slow":
            await self._pause()
        message = self._message(body, behaviour)
        if body.get("stream"):
            return await self._stream(request, message, behaviour)
        raw = dumps(message)
        if behaviour == "broken":
            response = web.StreamResponse(headers=self._headers())
            response.content_type = "application/json"
            response.content_length = len(raw)
            await response.prepare(request)
            await response.write(raw[: len(raw) // 2])
            _drop_connection(request)
            return response
        return web.Response(body=raw, content_type="application/json", headers=self._headers())

    async def _count_tokens(self, request: web.Request) -> web.Response:
        """As Anthropic's: the prompt fields only (no max_tokens), {"input_tokens": N}."""
        body = await self._record(request)
        try:
            self._check_auth(request)
            if not isinstance(body, dict) or "model" not in body:
                raise _Invalid(400, "model: Field required")
            if "max_tokens" in body or "stream" in body:
                raise _Invalid(400, "max_tokens: Extra inputs are not permitted")
            _validate_messages(body.get("messages"))
        except _Invalid as exc:
            return self._error(exc.status, exc.message)
        count = self.count_tokens_base + len(dumps(body.get("messages"))) // 4
        return web.Response(
            body=dumps({"input_tokens": count}),
            content_type="application/json",
            headers=self._headers(),
        )

    # --- answers ---------------------------------------------------------------------------

    def _usage(self, behaviour: str, output_tokens: int) -> Any:
        if self.usage_override is not None:
            return copy.deepcopy(self.usage_override)  # a faulty upstream's own numbers
        cached = behaviour == "cache"
        write = self.cache_creation_tokens if cached else 0
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": write,
            "cache_read_input_tokens": self.cache_read_tokens if cached else 0,
            "cache_creation": {"ephemeral_5m_input_tokens": write, "ephemeral_1h_input_tokens": 0},
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }

    def _message(self, body: dict[str, Any], behaviour: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if (body.get("thinking") or {}).get("type") == "enabled":
            content.append(
                {"type": "thinking", "thinking": "Let me think.", "signature": "c2lnbmF0dXJl"}
            )
        stop_reason = {"max_tokens": "max_tokens", "refusal": "refusal"}.get(behaviour, "end_turn")
        if behaviour == "tool_use" and body.get("tools"):
            content.append({"type": "text", "text": "Let me check."})
            forced = body.get("tool_choice") or {}
            for tool in body["tools"]:
                if forced.get("type") == "tool" and tool["name"] != forced.get("name"):
                    continue
                content.append(
                    {"type": "tool_use", "id": _anthropic_id("toolu_"), "name": tool["name"],
                     "input": dict(self.tool_input)}
                )  # fmt: skip
                if forced.get("disable_parallel_tool_use"):
                    break
            stop_reason = "tool_use"
        else:
            content.append({"type": "text", "text": self.reply_text})
        return {
            "id": _anthropic_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            **({} if self.omit_usage else {"usage": self._usage(behaviour, self.output_tokens)}),
        }

    async def _stream(
        self, request: web.Request, message: dict[str, Any], behaviour: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers=self._headers(**{"cache-control": "no-cache"}),
        )
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        await response.prepare(request)
        deltas_sent = 0
        async for event in _stream_events(message):
            if event["type"] == "content_block_delta":
                deltas_sent += 1
                if deltas_sent == 3 and behaviour == "stall":
                    await self._pause()
                if deltas_sent > 2 and behaviour in ("broken", "stream_error"):
                    if behaviour == "broken":
                        _drop_connection(request)
                        return response
                    event = {
                        "type": "error",
                        "error": {"type": "overloaded_error", "message": "Overloaded"},
                    }
            if event["type"].startswith("content_block_"):
                event = {**event, **self.extra_block_fields}
            later = self.extra_events if event["type"] == "message_start" else []
            for sent in (event, *later):
                data = b"event: " + sent["type"].encode() + b"\ndata: " + dumps(sent)
                await self._write(response, data + b"\n\n")
            if event["type"] == "error":
                break
        await response.write_eof()
        return response

    async def _pause(self) -> None:
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.delay_s)

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        size = self.fragment_size or len(data)
        for start in range(0, len(data), size):
            await response.write(data[start : start + size])
            if self.fragment_size:
                await asyncio.sleep(0)


async def _stream_events(message: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The event sequence Anthropic sends for `message`."""
    usage = message.get("usage")
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    if isinstance(usage, dict):
        start["usage"] = {**usage, "output_tokens": 1}
    yield {"type": "message_start", "message": start}
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        if kind == "text":
            yield {"type": "content_block_start", "index": index,
                   "content_block": {"type": "text", "text": ""}}  # fmt: skip
            if index == 0:
                yield {"type": "ping"}
            for piece in re.findall(r"\S*\s*", block["text"]):
                if piece:
                    yield _delta(index, {"type": "text_delta", "text": piece})
        elif kind == "tool_use":
            yield {"type": "content_block_start", "index": index,
                   "content_block": {**block, "input": {}}}  # fmt: skip
            yield _delta(index, {"type": "input_json_delta", "partial_json": ""})
            arguments = dumps(block["input"]).decode()
            third = max(1, len(arguments) // 3)
            for at in range(0, len(arguments), third):
                piece = arguments[at : at + third]
                yield _delta(index, {"type": "input_json_delta", "partial_json": piece})
        elif kind == "thinking":
            empty = {"type": "thinking", "thinking": "", "signature": ""}
            yield {"type": "content_block_start", "index": index, "content_block": empty}
            yield _delta(index, {"type": "thinking_delta", "thinking": block["thinking"]})
            yield _delta(index, {"type": "signature_delta", "signature": block["signature"]})
        yield {"type": "content_block_stop", "index": index}
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
    }
    if isinstance(usage, dict):
        delta["usage"] = {
            k: v for k, v in usage.items() if k not in ("cache_creation", "service_tier")
        }
    elif usage is not None:
        delta["usage"] = usage
    yield delta
    yield {"type": "message_stop"}


def _delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def _drop_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _marker(body: dict[str, Any]) -> str | None:
    for message in reversed(body["messages"]):
        if message["role"] != "user":
            continue
        content = message["content"]
        texts = [content] if isinstance(content, str) else [
            b.get("text", "") for b in content if b.get("type") == "text"
        ]  # fmt: skip
        for text in texts:
            if match := _MARKER_RE.search(text):
                return match[1]
        return None
    return None


# --- validation, as Anthropic answers it -----------------------------------------------------


def _validate(body: dict[str, Any]) -> None:
    for key in body:
        if key not in _TOP_LEVEL_FIELDS:
            raise _Invalid(400, f"{key}: Extra inputs are not permitted")
    model = body.get("model")
    if not isinstance(model, str):
        raise _Invalid(400, "model: Field required")
    if not model.startswith("claude"):
        raise _Invalid(404, f"model: {model}")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _Invalid(400, "max_tokens: Field required")
    temperature = body.get("temperature")
    if temperature is not None and not 0 <= temperature <= 1:
        raise _Invalid(400, "temperature: range: 0..1")
    if "temperature" in body and "top_p" in body:
        raise _Invalid(400, "`temperature` and `top_p` cannot both be specified for this model.")
    stops = body.get("stop_sequences", [])
    if not isinstance(stops, list) or not all(isinstance(s, str) and s.strip() for s in stops):
        raise _Invalid(400, "stop_sequences: each stop sequence must contain non-whitespace")
    _validate_system(body.get("system"))
    _validate_tools(body)
    _validate_thinking(body)
    _validate_messages(body.get("messages"))


def _validate_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list) or not all(
        isinstance(b, dict) and b.get("type") == "text" and b.get("text") for b in system
    ):
        raise _Invalid(400, "system: Input should be a valid string or a list of text blocks")


def _validate_tools(body: dict[str, Any]) -> None:
    names = set()
    for i, tool in enumerate(body.get("tools", [])):
        if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
            raise _Invalid(400, f"tools.{i}: name and input_schema are required")
        if set(tool) - {"name", "description", "input_schema", "cache_control", "type"}:
            raise _Invalid(400, f"tools.{i}: Extra inputs are not permitted")
        names.add(tool["name"])
    choice = body.get("tool_choice")
    if choice is None:
        return
    if choice.get("type") not in ("auto", "any", "tool", "none"):
        raise _Invalid(400, "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    if choice["type"] == "tool" and choice.get("name") not in names:
        raise _Invalid(400, "tool_choice.name: tool not found in tools")


def _validate_thinking(body: dict[str, Any]) -> None:
    thinking = body.get("thinking")
    if thinking is None or thinking.get("type") != "enabled":
        return
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or budget < 1024:
        raise _Invalid(400, "thinking.enabled.budget_tokens: Input should be >= 1024")
    if budget >= body["max_tokens"]:
        raise _Invalid(400, "`max_tokens` must be greater than `thinking.budget_tokens`")
    if "temperature" in body or "top_p" in body or "top_k" in body:
        raise _Invalid(400, "sampling parameters are not compatible with thinking")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _Invalid(400, "messages: Field required")
    previous_role = None
    pending_tool_ids: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise _Invalid(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if role == previous_role:
            raise _Invalid(400, f"messages.{i}: roles must alternate between user and assistant")
        previous_role = role
        content = message.get("content")
        if isinstance(content, str):
            if not content and i != len(messages) - 1:
                raise _Invalid(400, f"messages.{i}: all messages must have non-empty content")
            pending_tool_ids = set()
            continue
        if not isinstance(content, list) or not content:
            raise _Invalid(400, f"messages.{i}: all messages must have non-empty content")
        seen_other = False
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            where = f"messages.{i}.content.{j}"
            if kind not in _BLOCK_TYPES:
                raise _Invalid(400, f"{where}: Input tag {kind!r} found using 'type' is invalid")
            if kind == "text" and not block.get("text"):
                raise _Invalid(400, f"{where}: text content blocks must be non-empty")
            if kind == "tool_use":
                if role != "assistant" or not isinstance(block.get("input"), dict):
                    raise _Invalid(400, f"{where}: invalid tool_use block")
            if kind == "tool_result":
                if role != "user" or block.get("tool_use_id") not in pending_tool_ids:
                    raise _Invalid(
                        400, f"{where}: unexpected `tool_use_id` found in `tool_result` blocks"
                    )
                if seen_other:
                    raise _Invalid(400, f"{where}: tool_result blocks must come first")
            else:
                seen_other = True
            if kind == "image" and block.get("source", {}).get("type") not in ("base64", "url"):
                raise _Invalid(400, f"{where}.source: invalid image source")
        pending_tool_ids = {
            b["id"] for b in content if b.get("type") == "tool_use" and role == "assistant"
        }
