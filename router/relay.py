"""Stepping an async iterator without a coroutine frame per item, and closing it safely.

A relayed stream costs mostly per-chunk overhead; `next_step` takes an item that is already
there without awaiting, and hands back a `Waiting` to await only when the upstream has to be
waited on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from typing import Any

import anyio


class Waiting:
    """An `__anext__()` step that was started and is waiting on something (`signal`, what it
    yielded to the event loop). Awaiting this carries on exactly where it stopped."""

    __slots__ = ("signal", "step")

    def __init__(self, step: Any, signal: Any) -> None:
        self.step = step
        self.signal = signal

    def __await__(self) -> Generator[Any, Any, Any]:
        # `yield from step`, minus its first yield, which `next_step` already took.
        step, signal = self.step, self.signal
        while True:
            try:
                sent = yield signal
            except BaseException as exc:  # cancellation and the like go into the step
                try:
                    signal = step.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    signal = step.send(sent)
                except StopIteration as stop:
                    return stop.value

    def abandon(self) -> None:
        """Unwind the step (its generator's `finally` blocks run); needed before `aclose()`."""
        try:
            self.step.throw(GeneratorExit)
        except BaseException:  # whatever it ends with, it has ended
            pass


def next_step(iterator: AsyncIterator[Any]) -> tuple[bool, Any]:
    """Start `iterator.__anext__()`: (True, item) if it produced one without waiting, else
    (False, a `Waiting` to await). StopAsyncIteration and upstream errors propagate."""
    step = iterator.__anext__()
    try:
        signal = step.send(None)  # type: ignore[attr-defined]
    except StopIteration as done:
        return True, done.value
    return False, Waiting(step, signal)


async def close_quietly(iterator: AsyncIterator[Any], *, shield: bool = False) -> None:
    """Close the upstream stream. With `shield`, a cancellation cannot cut the close short;
    a close that finishes without waiting (the usual case) needs no shield, which is costly."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    try:
        step = aclose()
        try:
            signal = step.send(None)
        except (StopIteration, StopAsyncIteration):
            return
        if shield:
            with anyio.CancelScope(shield=True):
                await Waiting(step, signal)
        else:
            await Waiting(step, signal)
    except Exception:  # the upstream connection is being dropped anyway
        pass
