"""`openai`: any OpenAI-compatible upstream (OpenAI, Groq, Together, DeepSeek, vLLM, Ollama).

Chat completions and embeddings pass through nearly unchanged; streams ask the upstream for
usage with `stream_options.include_usage`, so usage is reported, never guessed. With
`native_responses = true` in its catalog table, the provider also speaks OpenAI's Responses
API natively (plugins/providers/openai_responses.py): only for upstreams that have it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from apifast import hookimpl
from apifast.plugins.providers.http1 import (
    Http1Client,
    HttpError,
    connection_limit,
    encode_headers,
)
from apifast.plugins.providers.openai_responses import (
    checked_response,
    native_responses,
    responses_usage,
    stream_events,
    transport_failure,
)
from apifast.plugins.providers.sse import sse_data
from apifast.plugins.providers.upstream_json import loads
from apifast.providers import (
    ChatRequest,
    ChatResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    NativeRequest,
    Provider,
    ProviderConfig,
    StreamItem,
    UpstreamError,
    Usage,
    parse_retry_after,
    token_count,
)

# What /v1/responses/input_tokens takes: the prompt's fields, none of the sampling ones.
_COUNTED = ("input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "reasoning",
            "text", "truncation")  # fmt: skip


def _details(usage: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A `*_tokens_details` object: {} when absent or null, None when it is not an object."""
    details = usage.get(name)
    if details is None:
        return {}
    return details if isinstance(details, dict) else None


def _part(details: dict[str, Any], name: str) -> int | None:
    """A part of a count (cached, reasoning...): 0 when absent or null."""
    value = details.get(name)
    return 0 if value is None else token_count(value)


def parse_usage(usage: Any, *, completion: bool = True) -> Usage | None:
    """The upstream's usage, or None when it sent none or any count in it is not a
    non-negative number (a string, a bool, a negative, an object; null for a whole count):
    the router then bills the documented estimate. Floats are truncated. `completion`: a
    chat answer, whose usage must count its completion tokens (an embeddings answer has
    none). Never raises."""
    if not isinstance(usage, dict) or not usage:
        return None
    prompt_details = _details(usage, "prompt_tokens_details")
    completion_details = _details(usage, "completion_tokens_details")
    if prompt_details is None or completion_details is None:
        return None
    prompt = token_count(usage.get("prompt_tokens"))
    raw_output = usage.get("completion_tokens")
    output = 0 if raw_output is None and not completion else token_count(raw_output)
    cached = _part(prompt_details, "cached_tokens")
    if cached == 0:  # DeepSeek reports cache hits as prompt_cache_hit_tokens
        cached = _part(usage, "prompt_cache_hit_tokens")
    cache_write = _part(prompt_details, "cache_write_tokens")
    reasoning = _part(completion_details, "reasoning_tokens")
    if (
        prompt is None or output is None or cached is None or cache_write is None
        or reasoning is None
    ):  # fmt: skip
        return None
    return Usage(
        input_tokens=prompt,
        output_tokens=output,
        cached_tokens=cached,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
    )


def _choices_readable(choices: Any, part: str) -> bool:
    """Every choice an object whose `message` (`delta` in a stream chunk) is one: anything
    else is passed through as is, so a faulty upstream's `[7]` would reach the client as a
    chat answer no SDK reads (and be billed). Checked, not repaired: a 502 before the hold
    is settled, or the stream's error."""
    return type(choices) is list and all(
        type(c) is dict and type(c.get(part, {})) is dict for c in choices
    )


class OpenAIProvider(Provider):
    type = "openai"
    supports_embeddings = True

    _client: Http1Client | None = None

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        if native_responses(config.options):
            self.native_protocols = frozenset({"responses"})

    async def start(self) -> None:
        if self._client is not None:
            return
        # A lean keep-alive client: aiohttp cost ~10x the CPU per call (bench/README.md).
        self._client = Http1Client(
            self.config.base_url,
            limit=connection_limit(self.config.options),
            connect_timeout=self.config.connect_timeout_s,
            read_timeout=self.config.read_timeout_s,
            keepalive_s=30,
        )
        # No User-Agent: nothing about the caller or the client library goes upstream.
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
        }
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        self._headers = encode_headers(headers)
        self._stream_headers = encode_headers({**headers, "Accept": "text/event-stream"})

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _client_ready(self) -> Http1Client:
        if self._client is None:
            await self.start()
        assert self._client is not None
        return self._client

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        client = await self._client_ready()
        try:
            response = await client.request(b"POST", path, orjson.dumps(body), self._headers)
            status, retry_after = response.status, response.retry_after
            payload = await response.read()
        except HttpError as exc:
            raise transport_failure(exc, self.config.name) from None
        if status != 200:
            raise UpstreamError(
                status, f"{self.config.name}: HTTP {status}",
                retry_after_s=parse_retry_after(retry_after) if retry_after else None,
            )  # fmt: skip
        try:
            data = loads(payload)
        except ValueError:
            raise UpstreamError(502, f"{self.config.name}: response is not JSON") from None
        if not isinstance(data, dict):
            raise UpstreamError(502, f"{self.config.name}: response is not an object")
        return data

    async def chat(self, request: ChatRequest) -> ChatResponse:
        data = await self._post_json("/chat/completions", request.body)
        if not _choices_readable(data.get("choices"), "message"):
            raise UpstreamError(502, f"{self.config.name}: response has no readable choices")
        # No usage (or none to believe): None, and the router bills the documented estimate.
        return ChatResponse(body=data, usage=parse_usage(data.get("usage")))

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        body = dict(request.body)
        body["stream"] = True
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        client = await self._client_ready()
        failure: UpstreamError | None = None
        response = None
        name = self.config.name
        try:
            response = await client.request(
                b"POST", "/chat/completions", orjson.dumps(body), self._stream_headers, stream=True
            )
            if response.status != 200:
                retry_after = response.retry_after
                await response.read()
                raise UpstreamError(
                    response.status, f"{name}: HTTP {response.status}",
                    retry_after_s=parse_retry_after(retry_after) if retry_after else None,
                )  # fmt: skip
            failure = UpstreamError(None, f"{name}: stream ended before [DONE]", cause="reset")
            async for data in sse_data(response.chunks()):
                if data == b"[DONE]":
                    failure = None
                    break
                try:
                    chunk = loads(data)
                except ValueError:
                    failure = UpstreamError(502, f"{name}: bad stream data")
                    break
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk:
                    failure = UpstreamError(502, f"{name}: error event in stream")
                    break
                reported = chunk.pop("usage", None)
                if chunk.get("choices"):
                    if not _choices_readable(chunk["choices"], "delta"):
                        failure = UpstreamError(502, f"{name}: unreadable stream chunk")
                        break
                    yield chunk
                if reported:
                    # Yielded at once: a client gone before [DONE] is billed this, not a guess.
                    usage = parse_usage(reported)
                    if usage is not None:
                        yield usage
        except HttpError as exc:
            failure = transport_failure(exc, name, "stream ")
        finally:
            if response is not None:
                response.close()
        if failure is not None:
            raise failure

    def _native_body(self, request: NativeRequest, stream: bool) -> dict[str, Any]:
        if request.protocol not in self.native_protocols:
            raise UpstreamError(400, f"{self.config.name}: no native {request.protocol}",
                                retryable=False)  # fmt: skip
        body = {**request.body, "model": request.model}
        body.pop("stream", None)
        if stream:
            body["stream"] = True
        return body

    async def native(self, request: NativeRequest) -> ChatResponse:
        # The Responses API itself (only with native_responses): a pass-through.
        body = self._native_body(request, stream=False)
        data = checked_response(await self._post_json("/responses", body), self.config.name)
        return ChatResponse(body=data, usage=responses_usage(data.get("usage")))

    async def count_tokens_native(self, request: NativeRequest) -> int | None:
        # OpenAI's POST /v1/responses/input_tokens (only with native_responses).
        if request.protocol not in self.native_protocols:
            return None
        body = {name: request.body[name] for name in _COUNTED if name in request.body}
        body["model"] = request.model
        count = (await self._post_json("/responses/input_tokens", body)).get("input_tokens")
        if type(count) is not int or count < 0:
            raise UpstreamError(502, f"{self.config.name}: malformed input token count")
        return count

    def stream_native(self, request: NativeRequest) -> AsyncIterator[StreamItem]:
        body = self._native_body(request, stream=True)
        return stream_events(self._client_ready, self._stream_headers, body, self.config.name)

    async def embeddings(self, request: EmbeddingsRequest) -> EmbeddingsResponse:
        data = await self._post_json("/embeddings", request.body)
        usage = parse_usage(data.get("usage"), completion=False)
        return EmbeddingsResponse(body=data, usage=usage)

    async def check(self) -> None:
        client = await self._client_ready()
        try:
            status, _ = await client.fetch(b"GET", "/models", b"", self._headers)
        except HttpError as exc:
            raise transport_failure(exc, self.config.name) from None
        if status != 200:
            raise UpstreamError(status, f"{self.config.name}: HTTP {status}")


@hookimpl
def register_provider_types(register):  # type: ignore[no-untyped-def]
    register("openai", OpenAIProvider)
