"""`openai`: any OpenAI-compatible upstream (OpenAI, Groq, Together, DeepSeek, vLLM, Ollama).

Chat completions and embeddings pass through nearly unchanged; streams ask the upstream for
usage with `stream_options.include_usage`, so usage is reported, never guessed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from apifast import hookimpl
from apifast.providers import (
    ChatRequest,
    ChatResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    Provider,
    StreamItem,
    UpstreamError,
    UpstreamTimeout,
    Usage,
)
from plugins.providers.sse import sse_events


def parse_usage(usage: dict[str, Any] | None) -> Usage | None:
    if not usage:
        return None
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    # DeepSeek reports cache hits as prompt_cache_hit_tokens.
    cached = prompt_details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens") or 0
    return Usage(
        input_tokens=int(usage.get("prompt_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(cached),
        cache_write_tokens=int(prompt_details.get("cache_write_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


class OpenAIProvider(Provider):
    type = "openai"
    supports_embeddings = True

    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=int(self.config.options.get("max_connections", 512)),
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.config.connect_timeout_s,
                sock_read=self.config.read_timeout_s,
            ),
            # No User-Agent: nothing about the caller or the client library goes upstream.
            skip_auto_headers=("User-Agent",),
            auto_decompress=True,
        )
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key:
            self._headers["Authorization"] = f"Bearer {self.config.api_key}"
        self._stream_headers = {**self._headers, "Accept": "text/event-stream"}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _session_ready(self) -> aiohttp.ClientSession:
        if self._session is None:
            await self.start()
        assert self._session is not None
        return self._session

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        session = await self._session_ready()
        try:
            async with session.post(
                self.config.base_url + path, data=orjson.dumps(body), headers=self._headers
            ) as resp:
                payload = await resp.read()
                if resp.status != 200:
                    raise UpstreamError(resp.status, f"{self.config.name}: HTTP {resp.status}")
        except TimeoutError:
            raise UpstreamTimeout(f"{self.config.name}: timed out") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(None, f"{self.config.name}: {type(exc).__name__}") from None
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamError(502, f"{self.config.name}: response is not JSON") from None
        if not isinstance(data, dict):
            raise UpstreamError(502, f"{self.config.name}: response is not an object")
        return data

    async def chat(self, request: ChatRequest) -> ChatResponse:
        data = await self._post_json("/chat/completions", request.body)
        if not isinstance(data.get("choices"), list):
            raise UpstreamError(502, f"{self.config.name}: response has no choices")
        return ChatResponse(body=data, usage=parse_usage(data.get("usage")) or Usage())

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        body = dict(request.body)
        body["stream"] = True
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        session = await self._session_ready()
        usage: Usage | None = None
        failure: UpstreamError | None = None
        try:
            async with session.post(
                self.config.base_url + "/chat/completions",
                data=orjson.dumps(body),
                headers=self._stream_headers,
            ) as resp:
                if resp.status != 200:
                    await resp.read()
                    raise UpstreamError(resp.status, f"{self.config.name}: HTTP {resp.status}")
                failure = UpstreamError(None, f"{self.config.name}: stream ended before [DONE]")
                async for _event, data in sse_events(resp.content):
                    if data == b"[DONE]":
                        failure = None
                        break
                    try:
                        chunk = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        failure = UpstreamError(502, f"{self.config.name}: bad stream data")
                        break
                    if not isinstance(chunk, dict):
                        continue
                    if "error" in chunk:
                        failure = UpstreamError(502, f"{self.config.name}: error event in stream")
                        break
                    reported = chunk.pop("usage", None)
                    if reported:
                        usage = parse_usage(reported)
                    if chunk.get("choices"):
                        yield chunk
        except TimeoutError:
            failure = UpstreamTimeout(f"{self.config.name}: stream timed out")
        except aiohttp.ClientError as exc:
            failure = UpstreamError(None, f"{self.config.name}: {type(exc).__name__}")
        # Usage known so far is reported even when the stream then broke.
        if usage is not None:
            yield usage
        if failure is not None:
            raise failure

    async def embeddings(self, request: EmbeddingsRequest) -> EmbeddingsResponse:
        data = await self._post_json("/embeddings", request.body)
        return EmbeddingsResponse(body=data, usage=parse_usage(data.get("usage")) or Usage())

    async def check(self) -> None:
        session = await self._session_ready()
        try:
            async with session.get(self.config.base_url + "/models", headers=self._headers) as r:
                await r.read()
                if r.status != 200:
                    raise UpstreamError(r.status, f"{self.config.name}: HTTP {r.status}")
        except TimeoutError:
            raise UpstreamTimeout() from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(None, type(exc).__name__) from None


@hookimpl
def register_provider_types(register):  # type: ignore[no-untyped-def]
    register("openai", OpenAIProvider)
