"""A fake OpenAI-compatible upstream: a real HTTP server on 127.0.0.1 that speaks the
chat-completions, Responses (tests/fakes/openai_responses.py) and embeddings wire formats,
SSE streams included.

Behaviour is chosen per request by a marker in the last user message, or for every request
by setting `server.behaviour`: "ok", "error:<status>", "slow:<seconds>", "broken" (the
stream is cut after two chunks), "nousage" (a stream without a usage chunk), "tools",
"gated" (a stream sends `gate_after` words, then waits for `gate` to be set), "malformed"
(a `tool_calls` that is not an array, as a buggy upstream might send: in the message, or in
a stream's third chunk), "json" (chat answers `REPLY_JSON`, as to a `response_format`); for
/v1/responses also "reasoning" (a reasoning item first) and "failed" (a response.failed
event after response.in_progress). Its requests are in `responses_requests` (and `requests`).

For routing tests, by counts rather than wall-clock: `fail(status, times, retry_after)` makes
the next `times` chat, Responses or embeddings requests fail and then recovers; `retry_after` adds a Retry-After
header to error answers; `on_request` is called with each chat body before it is answered
(a test advances its fake clock there, to make this upstream "slow").
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import openai_responses as wire
from tests.fakes.wire_json import RawAnswer, dumps, send_raw

REPLY = "Hello from the fake upstream model"
# The body of OpenAI's POST /v1/responses/input_tokens; anything else is refused.
_INPUT_TOKENS_FIELDS = {"model", "input", "instructions", "tools", "tool_choice",
                        "parallel_tool_calls", "reasoning", "text", "truncation", "conversation",
                        "previous_response_id"}  # fmt: skip
REPLY_JSON = '{"city": "Paris"}'  # the "json" behaviour's answer (a stream: word by word)
_MARKER = re.compile(
    r"\[\[(ok|error:\d+|slow:[\d.]+|broken|malformed|nousage|tools|gated|reasoning|failed"
    r"|json)\]\]"
)


def prompt_tokens(body: dict[str, Any]) -> int:
    chars = 0
    for m in body.get("messages", []):
        c = m.get("content")
        if isinstance(c, str):
            chars += len(c)
        elif isinstance(c, list):
            chars += sum(len(p.get("text", "")) for p in c if isinstance(p, dict))
    return chars // 4 + 7


# The Responses API refuses max_output_tokens below this.
RESPONSES_MIN_OUTPUT = 16


@dataclass
class FakeOpenAI:
    api_key: str | None = None
    behaviour: str = "ok"
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    usage_override: Any = None  # reported as is, however wrong (chat and embeddings)
    omit_usage: bool = False  # answers carry no `usage` at all (streams: no usage chunk)
    # Sent as is to every chat, responses and embeddings request (tests/fakes/wire_json.py).
    raw_answer: RawAnswer | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    responses_requests: list[dict[str, Any]] = field(default_factory=list)
    count_requests: list[dict[str, Any]] = field(default_factory=list)  # input_tokens
    input_tokens_base: int = 500  # /v1/responses/input_tokens answers this plus input bytes/4
    headers: list[dict[str, str]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # releases "gated" streams
    gate_after: int = 2
    retry_after: str | None = None  # sent with every error answer
    on_request: Callable[[dict[str, Any]], None] | None = None
    # Added to every message, delta, tool call (and its function) and embedding item, as
    # OpenAI-compatible upstreams and proxies add their own (LiteLLM's
    # `provider_specific_fields`, OpenRouter's `reasoning_details`).
    vendor_fields: dict[str, Any] = field(default_factory=dict)
    fail_status: int = 0
    fail_times: int = 0  # the next this many inference requests fail with fail_status
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/responses/input_tokens", self._input_tokens)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        return self

    def fail(self, status: int, times: int = 1_000_000, retry_after: str | None = None) -> None:
        """Fail the next `times` chat, Responses or embeddings requests with `status` (then
        recover)."""
        self.fail_status, self.fail_times, self.retry_after = status, times, retry_after

    def recover(self) -> None:
        self.fail_times, self.behaviour, self.retry_after = 0, "ok", None

    @property
    def chat_requests(self) -> int:
        return sum(1 for body in self.requests if "messages" in body)

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    def _vendor(self, message: dict[str, Any]) -> dict[str, Any]:
        """`message` (or a delta) with `vendor_fields` on it, its tool calls and functions."""
        if not self.vendor_fields or not message:
            return message
        calls = [
            {**call, **self.vendor_fields,
             "function": {**call.get("function", {}), **self.vendor_fields}}
            for call in message.get("tool_calls") or ()
        ]  # fmt: skip
        return {**message, **self.vendor_fields, **({"tool_calls": calls} if calls else {})}

    def _upstream_headers(self) -> dict[str, str]:
        # Headers a real upstream sends; none of them may reach ApiFast's clients.
        return {
            "x-request-id": "req_upstream_secret_123",
            "openai-organization": "upstream-org",
            "openai-processing-ms": "12",
            "x-ratelimit-remaining-requests": "99",
        }

    def _error(self, status: int) -> web.Response:
        return web.Response(
            status=status,
            body=dumps(
                {
                    "error": {
                        "message": "UPSTREAM-SECRET-ERROR-TEXT",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
            ),
            content_type="application/json",
            headers={
                **self._upstream_headers(),
                **({"Retry-After": self.retry_after} if self.retry_after else {}),
            },
        )

    def _auth_failed(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.Response(
                status=401,
                body=dumps({"error": {"message": "Incorrect API key provided",
                                             "type": "invalid_request_error",
                                             "param": None, "code": "invalid_api_key"}}),
                content_type="application/json",
            )  # fmt: skip
        return None

    def _behaviour(self, body: dict[str, Any]) -> str:
        for m in reversed(body.get("messages", [])):
            if m.get("role") == "user" and isinstance(m.get("content"), str):
                found = _MARKER.search(m["content"])
                if found:
                    return found.group(1)
                break
        return self.behaviour

    def _usage(self, body: dict[str, Any], completion: int) -> dict[str, Any]:
        if self.usage_override is not None:
            return copy.deepcopy(self.usage_override)  # a faulty upstream's own numbers
        prompt = prompt_tokens(body)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(self.cached_tokens, prompt)},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }

    def _words(self, body: dict[str, Any]) -> list[str]:
        if self._behaviour(body) == "json":
            return REPLY_JSON.split(" ")
        words = REPLY.split(" ")
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        return words[:limit] if isinstance(limit, int) else words

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        denied = self._auth_failed(request)
        if denied:
            return denied
        body = orjson.loads(await request.read())
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.on_request is not None:
            self.on_request(body)
        if self.fail_times > 0:
            self.fail_times -= 1
            return self._error(self.fail_status)
        if self.raw_answer is not None:
            return await send_raw(request, self.raw_answer)
        behaviour = self._behaviour(body)
        if behaviour.startswith("error:"):
            return self._error(int(behaviour.split(":")[1]))
        if behaviour.startswith("slow:"):
            await asyncio.sleep(float(behaviour.split(":")[1]))
        words = self._words(body)
        full = REPLY_JSON if behaviour == "json" else REPLY
        finish = "length" if len(words) < len(full.split(" ")) else "stop"
        if body.get("stream"):
            return await self._stream(request, body, behaviour, words, finish)
        message: dict[str, Any] = {"role": "assistant", "content": " ".join(words), "refusal": None}
        if behaviour == "tools":
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_upstream_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            }
            finish = "tool_calls"
        if behaviour == "malformed":
            message["tool_calls"] = 7  # not an array, as a buggy upstream might send
        message = self._vendor(message)
        out = {
            "id": "chatcmpl-UPSTREAMID",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": "fp_upstream_secret",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": finish,
                    "logprobs": _logprobs(body, [" ".join(words)] if message["content"] else []),
                }
            ],
            "usage": self._usage(body, len(words)),
            "service_tier": "default",
        }
        if self.omit_usage:
            del out["usage"]
        return web.Response(body=dumps(out), content_type="application/json",
                            headers=self._upstream_headers())  # fmt: skip

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        behaviour: str,
        words: list[str],
        finish: str,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **self._upstream_headers()}
        )
        await resp.prepare(request)
        created = int(time.time())

        def chunk(
            delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None
        ) -> bytes:
            c = {
                "id": "chatcmpl-UPSTREAMID",
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.get("model"),
                "system_fingerprint": "fp_upstream_secret",
                "choices": [
                    {
                        "index": 0,
                        "delta": self._vendor(delta),
                        "logprobs": logprobs,
                        "finish_reason": finish_reason,
                    }
                ],
            }
            return b"data: " + dumps(c) + b"\n\n"

        await resp.write(chunk({"role": "assistant", "content": ""}))
        if behaviour == "tools":
            # As OpenAI streams a call: id and name first, then the arguments in pieces.
            call = {"index": 0, "id": "call_upstream_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
            await resp.write(chunk({"tool_calls": [call]}))
            for piece in ('{"ci', 'ty":"Pa', 'ris"}'):
                await resp.write(
                    chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                )
            words, finish = [], "tool_calls"
        for i, word in enumerate(words):
            if behaviour == "broken" and i == 2:
                # Cut the connection mid-stream, as a crashed upstream would.
                request.transport.close()  # type: ignore[union-attr]
                return resp
            if behaviour == "malformed" and i == 2:
                await resp.write(chunk({"tool_calls": 7}))
            if behaviour == "gated" and i == self.gate_after:
                await self.gate.wait()
            piece = word if i == 0 else " " + word
            await resp.write(chunk({"content": piece}, None, _logprobs(body, [piece])))
            if behaviour.startswith("slow:"):
                await asyncio.sleep(float(behaviour.split(":")[1]))
        await resp.write(chunk({}, finish))
        include = (body.get("stream_options") or {}).get("include_usage")
        if include and behaviour != "nousage" and not self.omit_usage:
            u = {
                "id": "chatcmpl-UPSTREAMID",
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.get("model"),
                "choices": [],
                "usage": self._usage(body, 8 if behaviour == "tools" else len(words)),
            }
            await resp.write(b"data: " + dumps(u) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _input_tokens(self, request: web.Request) -> web.Response:
        """As OpenAI's: the prompt's fields only, {"object": "response.input_tokens",
        "input_tokens": N}, N here `input_tokens_base` plus the input's bytes / 4."""
        denied = self._auth_failed(request)
        if denied:
            return denied
        body = orjson.loads(await request.read())
        self.count_requests.append(body)
        unknown = sorted(set(body) - _INPUT_TOKENS_FIELDS)
        if unknown or "model" not in body:
            message = f"Unknown parameter: '{unknown[0]}'." if unknown else "Missing 'model'."
            error = {"message": message, "type": "invalid_request_error",
                     "param": unknown[0] if unknown else "model", "code": "unknown_parameter"}  # fmt: skip
            return web.json_response({"error": error}, status=400,
                                     headers=self._upstream_headers())  # fmt: skip
        count = self.input_tokens_base + len(orjson.dumps(body.get("input"))) // 4
        return web.json_response({"object": "response.input_tokens", "input_tokens": count},
                                 headers=self._upstream_headers())  # fmt: skip

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        denied = self._auth_failed(request)
        if denied:
            return denied
        body = orjson.loads(await request.read())
        self.requests.append(body)
        self.responses_requests.append(body)
        self.headers.append(dict(request.headers))
        if self.fail_times > 0:
            self.fail_times -= 1
            return self._error(self.fail_status)
        if self.raw_answer is not None:
            return await send_raw(request, self.raw_answer)
        found = _MARKER.search(wire.last_user_text(body))
        behaviour = found.group(1) if found else self.behaviour
        if behaviour.startswith("error:"):
            return self._error(int(behaviour.split(":")[1]))
        words = REPLY.split(" ")
        limit = body.get("max_output_tokens")
        if isinstance(limit, int) and limit < RESPONSES_MIN_OUTPUT:
            # OpenAI's own refusal of a bound below its minimum.
            message = ("Invalid 'max_output_tokens': integer below minimum value. Expected a "
                       f"value >= {RESPONSES_MIN_OUTPUT}, but got {limit} instead.")  # fmt: skip
            error = {"message": message, "type": "invalid_request_error",
                     "param": "max_output_tokens", "code": "integer_below_min_value"}  # fmt: skip
            return web.json_response({"error": error}, status=400,
                                     headers=self._upstream_headers())  # fmt: skip
        if isinstance(limit, int):
            words = words[:limit]
        status = "incomplete" if len(words) < len(REPLY.split(" ")) else "completed"
        reasoning = self.reasoning_tokens or (5 if behaviour == "reasoning" else 0)
        arguments = ('{"ci', 'ty":"Pa', 'ris"}')
        output: list[dict[str, Any]] = []
        if behaviour == "reasoning":
            output.append(wire.reasoning_item())
        if behaviour == "tools":
            output.append(wire.call_item("".join(arguments)))
            status, words = "completed", []
        else:
            output.append(wire.message_item(" ".join(words)))
        used = self.usage_override or wire.usage(
            body, 8 if behaviour == "tools" else len(words), self.cached_tokens, reasoning
        )
        if not body.get("stream"):
            out = wire.response_object(body, status, output, used)
            return web.Response(body=dumps(out), content_type="application/json",
                                headers=self._upstream_headers())  # fmt: skip
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **self._upstream_headers()}
        )
        await resp.prepare(request)
        w = wire.EventWriter()
        started = wire.response_object(body, "in_progress", [], None)
        events = [w.event("response.created", response=started),
                  w.event("response.in_progress", response=started)]  # fmt: skip
        if behaviour == "failed":
            failed = {
                **started,
                "status": "failed",
                "usage": used,
                "error": {"code": "server_error", "message": "UPSTREAM-SECRET-ERROR-TEXT"},
            }
            events.append(w.event("response.failed", response=failed))  # fmt: skip
        else:
            for index, item in enumerate(output):
                if item["type"] == "reasoning":
                    events += wire.reasoning_events(w, index)
                elif item["type"] == "function_call":
                    events += wire.call_events(w, index, arguments)
                else:
                    events += wire.message_events(w, index, words)
            done = wire.response_object(body, status, output, used)
            events.append(w.event(f"response.{status}", response=done))
        for i, event in enumerate(events):
            if behaviour == "broken" and i == 6:
                request.transport.close()  # type: ignore[union-attr]  # a crashed upstream
                return resp
            await resp.write(event)
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        denied = self._auth_failed(request)
        if denied:
            return denied
        body = orjson.loads(await request.read())
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.fail_times > 0:
            self.fail_times -= 1
            return self._error(self.fail_status)
        if self.raw_answer is not None:
            return await send_raw(request, self.raw_answer)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        tokens = sum(len(str(i)) // 4 + 1 for i in inputs)
        out = {
            "object": "list",
            "model": body.get("model"),
            "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3],
                      **self.vendor_fields} for i in range(len(inputs))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }  # fmt: skip
        if self.usage_override is not None:
            out["usage"] = copy.deepcopy(self.usage_override)
        if self.omit_usage:
            del out["usage"]
        return web.Response(body=dumps(out), content_type="application/json")

    async def _models(self, request: web.Request) -> web.Response:
        return web.Response(body=dumps({"object": "list", "data": []}),
                            content_type="application/json")  # fmt: skip


def _logprobs(body: dict[str, Any], tokens: list[str]) -> dict[str, Any] | None:
    """Chat's `logprobs` when asked for (`logprobs: true`): one entry per token, with
    `top_logprobs` alternatives."""
    if not body.get("logprobs"):
        return None
    top = int(body.get("top_logprobs") or 0)

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [
        {**entry(t, -0.25), "top_logprobs": [entry(t, -0.25 * (k + 1)) for k in range(top)]}
        for t in tokens
    ]
    return {"content": content, "refusal": None}
