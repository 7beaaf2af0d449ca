"""What a protocol adapter hands the request core (`Generation`, and a `Renderer` for its
answer) and what the core hands back (`Reply`). Adapters, `core.py`, `streaming.py` and
`fast_path.py` share these; this module imports nothing else of the router's but the prompt
bound."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from apifast.providers import Provider, Usage
from apifast.router.prompt_bound import prompt_token_bound


@dataclass(slots=True)
class Generation:
    """A chat generation as the providers speak it (OpenAI chat completions), plus what the
    adapter learnt while reading the client's request."""

    body: dict[str, Any]  # validated; caller-identifying fields already stripped
    stream: bool
    input_bound: int  # an upper bound of prompt tokens (router/prompt_bound.py)
    max_output: int | None  # what the client asked for, if anything
    n: int = 1
    endpoint: str = "chat"  # the usage event's endpoint label
    api: str = "chat"  # the client protocol: chat | messages | responses
    input_bytes: int = 0  # the client's body size, for the estimate when usage is missing
    # The client's own body (cleaned), for a route whose provider speaks `api` natively:
    # it then passes through untranslated, and the renderer's native_* methods write it.
    native: dict[str, Any] | None = None
    # (field, why) of the client's fields only a native route can honour (Anthropic's
    # `top_k`): a translating route is passed over, and without a native one, a 400.
    native_only: tuple[tuple[str, str], ...] = ()
    native_bound: str = "max_tokens"  # the native body's output bound, set to the hold's
    # The least bound the native API takes (OpenAI's Responses API refuses max_output_tokens
    # below 16): a request bounded lower is translated instead, unless it needs the native
    # route (`native_only`).
    native_min: int = 1

    @classmethod
    def translated(
        cls, chat: dict[str, Any], api: str, input_bytes: int,
        native: dict[str, Any] | None = None, native_bound: str = "max_tokens",
        native_only: tuple[tuple[str, str], ...] = (), native_min: int = 1,
    ) -> Generation:  # fmt: skip
        """A generation read from another protocol's request (`chat` is its translation)."""
        return cls(
            body=chat,
            stream=bool(chat.get("stream")),
            input_bound=prompt_token_bound(chat),
            max_output=chat.get("max_tokens"),
            api=api,
            input_bytes=input_bytes,
            native=native,
            native_only=native_only,
            native_bound=native_bound,
            native_min=native_min,
        )


class Renderer(Protocol):
    """Writes the provider's (OpenAI-shaped) answer in one client protocol's shape. One
    instance per request, so a streaming renderer may keep state between chunks. The core
    sets `generation_id` (ApiFast's own id for the request) before rendering anything."""

    generation_id: str
    model: str  # the public model answering (the core sets it for each of `models`)

    def completion(self, upstream: dict[str, Any], usage: Usage, cost: Decimal) -> bytes: ...

    def chunk(self, chunk: dict[str, Any]) -> bytes: ...

    def stream_end(self, usage: Usage, cost: Decimal) -> bytes: ...

    def stream_error(self, status: int) -> bytes: ...

    # A renderer may also have `keepalive` (bytes, b"" for none yet): its protocol's
    # keep-alive event, sent after settings.stream_ping_s without upstream data.


class NativeRenderer(Renderer, Protocol):
    """A renderer that can also relay its protocol's own answer from a native route."""

    def native_completion(self, upstream: dict[str, Any], usage: Usage, cost: Decimal) -> bytes: ...

    def native_chunk(self, event: dict[str, Any]) -> bytes: ...

    def native_chars(self, item: dict[str, Any]) -> int: ...


def speaks_native(provider: Provider, gen: Generation) -> bool:
    return gen.native is not None and gen.api in provider.native_protocols


@dataclass(slots=True)
class Reply:
    """A 200 answer: a JSON body, or an SSE stream (`stream` is set). Iterating `stream` to
    its end or closing it settles the request; `finished` is set before its last piece."""

    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    finished: bool = False
