"""OpenAI's Responses API (`POST {base_url}/responses`) for the `openai` provider, when its
catalog table says `native_responses = true`: most OpenAI-compatible servers (vLLM, Ollama,
...) have no such endpoint, so it is opt-in per provider.

The body ApiFast hands over is the client's own, cleaned (`NativeRequest`); the answer is
the upstream's Response object, or its typed events up to `response.completed` (or
`.incomplete`), with the usage read from the Responses usage object. `response.failed` and
`error` events end the stream with an `UpstreamError`; like every error, they carry no
upstream text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from apifast.plugins.providers.http1 import Http1Client, HttpError, HttpTimeout
from apifast.plugins.providers.sse import sse_data
from apifast.plugins.providers.upstream_json import loads
from apifast.providers import (
    StreamItem,
    UpstreamError,
    UpstreamTimeout,
    Usage,
    parse_retry_after,
    token_count,
)

OPTION = "native_responses"
_TERMINAL = ("response.completed", "response.incomplete")
_FAILED = ("response.failed", "error")


def transport_failure(exc: HttpError, name: str, what: str = "") -> UpstreamError:
    """The http1 client's failure as the plugin contract's error (the openai provider's
    requests and streams); its message names the failure only, never content."""
    if isinstance(exc, HttpTimeout):
        return UpstreamTimeout(f"{name}: {what}timed out")
    return UpstreamError(None, f"{name}: {exc}", cause=exc.cause)


def native_responses(options: dict[str, Any]) -> bool:
    """The provider's `native_responses` option (the catalog checks it is a boolean)."""
    return options.get(OPTION) is True


def _count(value: Any, missing: int = -1) -> int:
    """A count as chat's and Anthropic's are read (`token_count`: a float truncated); -1,
    which the router does not believe, for one that is not a count."""
    if value is None:
        return missing
    count = token_count(value)
    return -1 if count is None else count


def responses_usage(raw: Any) -> Usage:
    """A Responses usage object as `Usage`: the router bills the documented estimate instead
    when a count is missing or not a count (-1). A missing or null part counts as 0."""
    if not isinstance(raw, dict):
        return Usage(input_tokens=-1, output_tokens=-1)
    inputs = raw.get("input_tokens_details")
    inputs = inputs if isinstance(inputs, dict) else {}
    outputs = raw.get("output_tokens_details")
    outputs = outputs if isinstance(outputs, dict) else {}
    return Usage(
        input_tokens=_count(raw.get("input_tokens")),
        output_tokens=_count(raw.get("output_tokens")),
        cached_tokens=_count(inputs.get("cached_tokens"), 0),
        cache_write_tokens=_count(inputs.get("cache_write_tokens"), 0),
        reasoning_tokens=_count(outputs.get("reasoning_tokens"), 0),
    )


def checked_response(data: dict[str, Any], name: str) -> dict[str, Any]:
    """A non-streamed Response object, or the error a failed one is."""
    if data.get("object") != "response" or not isinstance(data.get("output"), list):
        raise UpstreamError(502, f"{name}: not a Response object")
    if data.get("status") == "failed":
        raise UpstreamError(502, f"{name}: the response failed")
    return data


async def stream_events(
    client: Callable[[], Awaitable[Http1Client]], headers: bytes, body: dict[str, Any], name: str
) -> AsyncIterator[StreamItem]:
    """The upstream's events as dicts, through the terminal one, and its `Usage` just before
    that (a client gone at the end is billed it, not a guess)."""
    failure: UpstreamError | None = None
    response = None
    http = await client()
    try:
        response = await http.request(
            b"POST", "/responses", orjson.dumps(body), headers, stream=True
        )
        if response.status != 200:
            retry_after = response.retry_after
            await response.read()
            raise UpstreamError(
                response.status, f"{name}: HTTP {response.status}",
                retry_after_s=parse_retry_after(retry_after) if retry_after else None,
            )  # fmt: skip
        failure = UpstreamError(None, f"{name}: stream ended before its end", cause="reset")
        async for data in sse_data(response.chunks()):
            try:
                event = loads(data)
            except ValueError:
                failure = UpstreamError(502, f"{name}: bad stream data")
                break
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            if kind in _FAILED:
                failed = event.get("response")
                if isinstance(failed, dict) and isinstance(failed.get("usage"), dict):
                    yield responses_usage(failed["usage"])  # what it cost before failing
                failure = UpstreamError(502, f"{name}: {kind} event in stream")
                break
            if kind in _TERMINAL:
                done = event.get("response")
                if isinstance(done, dict) and isinstance(done.get("usage"), dict):
                    yield responses_usage(done["usage"])
                yield event
                failure = None
                break
            yield event
    except HttpError as exc:
        failure = transport_failure(exc, name, "stream ")
    finally:
        if response is not None:
            response.close()
    if failure is not None:
        raise failure
