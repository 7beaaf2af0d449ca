"""The provider contract: everything a provider plugin needs, and nothing of the router.

A provider plugin implements the `register_provider_types` hook and registers a subclass of
`Provider` under a type name. The catalog makes one instance per configured provider.
Requests and responses use OpenAI's chat-completions wire format as plain dicts, so the
common case (an OpenAI-compatible upstream) is a near pass-through.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

__all__ = [
    "ChatRequest",
    "ChatResponse",
    "EmbeddingsRequest",
    "EmbeddingsResponse",
    "NativeRequest",
    "PartialUsage",
    "Provider",
    "ProviderConfig",
    "RegisterProviderType",
    "StreamItem",
    "UnsupportedParameter",
    "UpstreamError",
    "UpstreamTimeout",
    "Usage",
    "parse_retry_after",
    "token_count",
]


@dataclass(slots=True)
class Usage:
    """Token counts for one request. `cached_tokens` and `cache_write_tokens` are part of
    `input_tokens`; `reasoning_tokens` is part of `output_tokens`."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(slots=True)
class PartialUsage(Usage):
    """Usage a stream reports before its end (Anthropic's `message_start`): the input counts
    are final, the output only a floor. A client gone before the final `Usage` is billed
    this input, and at least the estimate of the output it was delivered."""


def token_count(value: Any) -> int | None:
    """A token count from an upstream's JSON: a non-negative integer, or a non-negative
    number truncated; None for anything else (a bool, a string, null, a negative, an object),
    which a provider reports as no usage at all, so the router bills its documented estimate
    (docs/billing.md). Never raises: a faulty upstream must not turn a served answer into an
    unbilled error."""
    if type(value) is int:
        return value if value >= 0 else None
    if type(value) is float and 0 <= value < 2**63:  # rules out NaN and infinities too
        return int(value)
    return None


@dataclass(slots=True)
class ProviderConfig:
    """One `[providers.NAME]` table of the catalog, with the API key already resolved."""

    name: str
    type: str
    base_url: str = ""
    api_key: str | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 300.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ChatRequest:
    """An OpenAI chat-completions body. `body["model"]` is already the upstream model name,
    and fields that identify the caller (`user`, ...) have been removed."""

    body: dict[str, Any]
    model: str
    stream: bool = False


@dataclass(slots=True)
class NativeRequest:
    """A request in a client protocol the provider speaks natively (one it lists in
    `Provider.native_protocols`), passed through without translation: for "messages", an
    Anthropic Messages API body, `max_tokens` already bounded and `metadata` removed; for
    "responses", an OpenAI Responses API body, `max_output_tokens` already bounded, `store`
    false and caller-identifying fields (`user`, `metadata`, `safety_identifier`,
    `prompt_cache_key`) removed. `body["model"]` is already the upstream model."""

    protocol: str
    body: dict[str, Any]
    model: str
    stream: bool = False


@dataclass(slots=True)
class ChatResponse:
    """An OpenAI `chat.completion` object (its `usage` may be absent) and the parsed usage:
    None when the upstream reported none, or none that could be believed (the router then
    bills the documented estimate, as for a stream without usage)."""

    body: dict[str, Any]
    usage: Usage | None


@dataclass(slots=True)
class EmbeddingsRequest:
    body: dict[str, Any]
    model: str


@dataclass(slots=True)
class EmbeddingsResponse:
    body: dict[str, Any]
    usage: Usage | None  # None: not reported (or not believable); the router estimates


# A stream yields OpenAI `chat.completion.chunk` dicts, and a `Usage` once it is known.
StreamItem = dict[str, Any] | Usage


class UpstreamError(Exception):
    """The upstream failed. `status` is its HTTP status, or None when no response arrived.

    `retryable` errors (connect errors, timeouts, 429, 5xx) let the router try the next
    route. The message is for operators' logs only; it never reaches a client, so it must
    not contain request or response content. `retry_after_s` is the upstream's Retry-After
    (on a 429 or 503): the router benches the route that long.
    """

    def __init__(
        self,
        status: int | None,
        message: str = "",
        *,
        retryable: bool | None = None,
        cause: str = "",
        retry_after_s: float | None = None,
    ):
        super().__init__(message or f"upstream status {status}")
        self.status = status
        self.retry_after_s = retry_after_s
        self.retryable = (
            retryable if retryable is not None else status is None or status == 429 or status >= 500
        )
        # For operators' logs, a class never a text: refused | dns | tls | timeout | reset |
        # protocol | closed | http (an HTTP error status) | unsupported (a field the
        # provider cannot express, `UnsupportedParameter`) | unknown.
        self.cause = cause or ("http" if status is not None else "unknown")


class UpstreamTimeout(UpstreamError):
    def __init__(self, message: str = "upstream timed out"):
        super().__init__(None, message, retryable=True, cause="timeout")


class UnsupportedParameter(UpstreamError):
    """The request uses a field (`param`, e.g. "temperature" or "n") that this provider has
    no equivalent for. The client gets a 400 naming `param`, with `reason` (ApiFast's own
    words, never request content); ApiFast never silently drops such a field. Raised by
    `Provider.check_request` before the hold (the route is then passed over for the
    model's other routes), or by `chat` / `stream_chat` as a last resort."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(400, f"unsupported parameter {param}", retryable=False,
                         cause="unsupported")  # fmt: skip
        self.param = param
        self.reason = reason


def parse_retry_after(value: bytes | str | None, cap_s: float = 3600.0) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), at most `cap_s`;
    None when absent or unreadable."""
    if not value:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
            if when.tzinfo is None:
                # An HTTP date is always GMT (RFC 9110 5.6.7); asctime's form says no zone,
                # and a naive datetime would be read in the router's local time.
                when = when.replace(tzinfo=UTC)
            seconds = when.timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if seconds != seconds or seconds < 0:  # NaN or in the past
        return 0.0 if seconds == seconds else None
    return min(seconds, cap_s)


class Provider:
    """Base class for provider types. Subclasses set `type` and override what they support."""

    type: ClassVar[str] = ""
    supports_embeddings: ClassVar[bool] = False
    # Client protocols this provider speaks natively ("messages": Anthropic's Messages API;
    # "responses": OpenAI's Responses API). ApiFast passes such a request through with
    # `native` / `stream_native` instead of translating it to chat completions, so
    # protocol-only features survive. A class attribute, or set per instance from the
    # provider's config (the `openai` type: `native_responses = true`).
    native_protocols: frozenset[str] = frozenset()

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    async def start(self) -> None:
        """Open connection pools; called once from the application's lifespan."""

    async def close(self) -> None:
        """Close what `start` opened."""

    def check_request(self, request: ChatRequest) -> None:
        """Raise `UnsupportedParameter` for a field of this chat body the provider cannot
        express. Called before the hold for each route of the model, so it must be cheap and
        do no I/O; `request.model` may still be empty. The default accepts everything."""

    async def chat(self, request: ChatRequest) -> ChatResponse:
        raise NotImplementedError

    def stream_chat(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        raise NotImplementedError

    async def native(self, request: NativeRequest) -> ChatResponse:
        """The protocol's own response object (for "messages", an Anthropic message; for
        "responses", a Response object) as `body`, and its usage."""
        raise UpstreamError(400, f"{self.type} speaks no native protocol", retryable=False)

    def stream_native(self, request: NativeRequest) -> AsyncIterator[StreamItem]:
        """The protocol's own stream events as dicts (for "messages", Anthropic's events
        without `ping`; for "responses", the typed events through the terminal
        `response.completed` or `.incomplete`), and one `Usage` once known, as `stream_chat`
        does. A failed stream (`response.failed`, `error`) raises `UpstreamError`."""
        raise UpstreamError(400, f"{self.type} speaks no native protocol", retryable=False)

    async def count_tokens(self, request: ChatRequest) -> int | None:
        """The upstream's own count of the request's prompt tokens, free of charge, or None
        when it has no such endpoint (ApiFast then answers with its documented estimate)."""
        return None

    async def count_tokens_native(self, request: NativeRequest) -> int | None:
        """The upstream's count for a request in a protocol it speaks natively (one of
        `native_protocols`), the client's body as `native` would get it, so that what no
        translation carries (for messages: thinking, cache_control) counts too. None: ApiFast
        counts the translated body with `count_tokens` instead."""
        return None

    async def embeddings(self, request: EmbeddingsRequest) -> EmbeddingsResponse:
        raise UpstreamError(400, f"{self.type} does not support embeddings", retryable=False)

    async def check(self) -> None:
        """Raise `UpstreamError` if the upstream cannot be reached (the admin's test button)."""


# What the `register_provider_types` hook is given: `register(type_name, ProviderSubclass)`.
RegisterProviderType = Callable[[str, type[Provider]], None]
