"""router/fast_path.py answers POST /v1/chat/completions without the framework. The FastAPI
route stays (OpenAPI, and any request the fast path passes on): both must answer alike."""

from __future__ import annotations

import json
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from tests.harness import Stack


class FrameworkOnly:
    """The same app, entered through FastAPI's own __call__: the fast path is skipped."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await FastAPI.__call__(self.app, scope, receive, send)


def shape(value: Any) -> Any:
    """The structure of a JSON value, ids and numbers aside."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items() if k != "id"}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def events(text: str) -> list[Any]:
    out: list[Any] = []
    for line in text.split("\n"):
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else shape(json.loads(data)))
    return out


async def test_fast_path_and_framework_route_answer_alike(stack: Stack) -> None:
    key = await stack.create_key("5.00")
    auth = {"Authorization": f"Bearer {key}"}
    chat = {"model": "fast-chat", "messages": [{"role": "user", "content": "hello"}]}
    streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    cases: list[tuple[dict[str, str], bytes]] = [
        (auth, json.dumps(chat).encode()),
        (auth, json.dumps(streamed).encode()),
        ({}, json.dumps(chat).encode()),  # no key
        ({"Authorization": "Bearer af-typo"}, json.dumps(chat).encode()),
        (auth, b"{not json"),
        (auth, json.dumps({**chat, "model": "nope"}).encode()),
        (auth, json.dumps({**chat, "max_tokens": 0}).encode()),
    ]
    framework = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=FrameworkOnly(stack.app)), base_url="http://test"
    )
    async with stack.client() as fast, framework:
        for headers, body in cases:
            answers = []
            for client in (fast, framework):
                r = await client.post(
                    "/v1/chat/completions",
                    content=body,
                    headers={**headers, "Content-Type": "application/json"},
                )
                answers.append(r)
            a, b = answers
            assert a.status_code == b.status_code, body
            assert a.headers["content-type"] == b.headers["content-type"]
            if a.headers["content-type"].startswith("text/event-stream"):
                assert events(a.text) == events(b.text)
                assert a.headers["cache-control"] == b.headers["cache-control"] == "no-cache"
            elif a.status_code == 200:
                assert shape(a.json()) == shape(b.json())
                assert a.headers["content-length"] == str(len(a.content))
            else:
                assert a.json() == b.json()  # errors are identical, byte for byte
                assert a.content == b.content
