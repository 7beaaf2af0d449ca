"""The raw-ASGI body reader's own timer: a stalled body is a 408, a cancellation from
outside stays a cancellation, and a body that arrives leaves no timer behind."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from apifast.errors import ApiError
from apifast.request_body import read_asgi_body


async def _stalls() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_a_stalled_body_is_a_408() -> None:
    with pytest.raises(ApiError) as refused:
        await read_asgi_body("10", _stalls, 100, 0.05)
    assert refused.value.status == 408 and refused.value.code == "body_timeout"


async def test_a_cancellation_from_outside_is_not_turned_into_a_408() -> None:
    task = asyncio.create_task(read_asgi_body("10", _stalls, 100, 30))
    await asyncio.sleep(0)  # let it reach the receive
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_body_in_pieces_is_joined_and_its_timer_cancelled() -> None:
    pieces = [b'{"a"', b": 1}"]

    async def receive() -> dict[str, Any]:
        body = pieces.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pieces)}

    assert await read_asgi_body(None, receive, 100, 0.05) == b'{"a": 1}'
    # Had the timer survived, it would cancel this task now, in the middle of the sleep.
    await asyncio.sleep(0.1)
    task = asyncio.current_task()
    assert task is not None and not task.cancelling()
