"""`demo`: an offline provider with canned replies, so a newcomer can try the whole flow
(key, request, metering, balance) with no upstream and no network."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from apifast import hookimpl
from apifast.providers import ChatRequest, ChatResponse, Provider, StreamItem, Usage

_REPLY = (
    "Hello from the ApiFast demo model. This reply is canned and no upstream was called; "
    "point APIFAST_MODELS_FILE at a catalog to serve real models."
)


def _estimate_tokens(body: dict[str, Any]) -> int:
    # Roughly 4 characters a token: the demo only needs plausible, deterministic counts.
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    return max(1, chars // 4) + 4


def _reply_words(limit: int | None) -> list[str]:
    words = _REPLY.split(" ")
    return words[: max(1, limit)] if limit else words


class DemoProvider(Provider):
    type = "demo"

    def _limit(self, body: dict[str, Any]) -> int | None:
        value = body.get("max_completion_tokens") or body.get("max_tokens")
        return int(value) if isinstance(value, int) else None

    async def chat(self, request: ChatRequest) -> ChatResponse:
        words = _reply_words(self._limit(request.body))
        text = " ".join(words)
        usage = Usage(input_tokens=_estimate_tokens(request.body), output_tokens=len(words))
        finish = "stop" if len(words) == len(_REPLY.split(" ")) else "length"
        body = {
            "id": "demo",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
            ],
        }
        return ChatResponse(body=body, usage=usage)

    async def stream_chat(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        words = _reply_words(self._limit(request.body))
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "demo",
                "object": "chat.completion.chunk",
                "created": created,
                "model": request.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        yield chunk({"role": "assistant", "content": ""})
        for i, word in enumerate(words):
            yield chunk({"content": word if i == 0 else " " + word})
        finish = "stop" if len(words) == len(_REPLY.split(" ")) else "length"
        yield chunk({}, finish)
        yield Usage(input_tokens=_estimate_tokens(request.body), output_tokens=len(words))


@hookimpl
def register_provider_types(register):  # type: ignore[no-untyped-def]
    register("demo", DemoProvider)
