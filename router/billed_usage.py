"""The usage a request is billed for: the upstream's counts when they are sane, else the
documented estimate from what was delivered (docs/billing.md), never beyond the hold."""

from __future__ import annotations

import math
from typing import Any

from apifast.metering.event import MAX_TOKEN_COUNT
from apifast.providers import Usage

Bounds = tuple[int, int]  # the most input and output tokens a usage is believed to count
EVENT_BOUNDS: Bounds = (MAX_TOKEN_COUNT, MAX_TOKEN_COUNT)


def count_bounds(context_window: int | None, outputs: int = 1, inputs: int = 1) -> Bounds:
    """The sane upper bound of a request's counts (docs/billing.md): no model reads more
    than its context window (for each of `inputs` embedded), nor writes more in each of its
    `outputs` choices. A count past it is no overage to record but a faulty report, billed
    the estimate. Without a declared window: what the usage event carries."""
    if not context_window:
        return EVENT_BOUNDS
    return (
        min(context_window * max(inputs, 1), MAX_TOKEN_COUNT),
        min(context_window * max(outputs, 1), MAX_TOKEN_COUNT),
    )


def sane_usage(usage: Any, bounds: Bounds = EVENT_BOUNDS) -> Usage | None:
    """`usage` if every count is a non-negative integer the usage event can carry, and the
    input and output counts are within `bounds`, else None (the caller estimates): the meter
    refuses an event with a count past MAX_TOKEN_COUNT, which would leave the request
    unbilled and its hold stuck until its TTL. Parts (cached, cache writes, reasoning) are
    clamped to the whole they belong to."""
    if not isinstance(usage, Usage):
        return None
    counts = (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_tokens,
        usage.cache_write_tokens,
        usage.reasoning_tokens,
    )
    if any(type(c) is not int or not 0 <= c <= MAX_TOKEN_COUNT for c in counts):
        return None
    if usage.input_tokens > bounds[0] or usage.output_tokens > bounds[1]:
        return None
    if (
        usage.cached_tokens + usage.cache_write_tokens > usage.input_tokens
        or usage.reasoning_tokens > usage.output_tokens
    ):
        cached = min(usage.cached_tokens, usage.input_tokens)
        return Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_tokens=cached,
            cache_write_tokens=min(usage.cache_write_tokens, usage.input_tokens - cached),
            reasoning_tokens=min(usage.reasoning_tokens, usage.output_tokens),
        )
    return usage


def completion_chars(body: Any) -> int:
    """Characters of content and tool-call arguments in a chat completion's choices."""
    total = 0
    choices = body.get("choices") if isinstance(body, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            total += delta_chars({"choices": [{"delta": message}]})
    return total


def estimate_delivered(input_bytes: int, chars: int, pieces: int, max_output: int) -> Usage:
    """The documented estimate when a stream ends without upstream usage: input is the body
    size / 4, output the larger of the content pieces delivered and delivered chars / 4, but
    never more than the max_tokens sent upstream (the hold covers no more)."""
    output = min(max(pieces, math.ceil(chars / 4)), max_output)
    return Usage(input_tokens=math.ceil(input_bytes / 4), output_tokens=output)


def delta_chars(chunk: dict[str, Any]) -> int:
    """Characters of content and tool-call arguments in one chat-completions chunk."""
    total = 0
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        content = delta.get("content")
        if isinstance(content, str):
            total += len(content)
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                total += len(fn["arguments"])
    return total
