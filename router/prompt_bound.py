"""An upper bound of a chat request's prompt tokens, from its text, for the hold.

Tokenizers in use (byte-level BPE, SentencePiece with byte fallback) never make a token of
less than one byte, so a text of N UTF-8 bytes is at most N tokens. The prompt is the text of
the messages, plus whatever the upstream renders from the tool definitions and the response
format (bounded by their JSON), plus the chat template's markup per message. Media parts are
left out here: each adds the model's declared per-part bound instead (router/media.py).

The body's other fields (model, temperature, max_tokens, ...) are not prompt, so the bound
follows the text and not the size of the JSON around it: a request is held for what it can
cost, and a small balance serves as many requests as it can pay for.
"""

from __future__ import annotations

from typing import Any

import orjson

# Chat-template markup per message (role header, separators), as before.
MESSAGE_OVERHEAD_TOKENS = 8
# What a provider may add for a response format it renders as an instruction (the anthropic
# plugin does, for upstreams without native structured outputs), beyond the schema itself.
FORMAT_ALLOWANCE_TOKENS = 256
_MEDIA_PARTS = frozenset({"image_url", "input_image", "image", "input_audio", "audio", "file",
                          "input_file", "document"})  # fmt: skip
# Top-level fields rendered into the prompt by the upstream.
_PROMPT_FIELDS = ("tools", "functions", "tool_choice", "response_format")


def _json_bytes(value: Any) -> int:
    try:
        return len(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError):
        return len(str(value).encode())


def _document_text_bytes(part: dict[str, Any]) -> int:
    """An Anthropic document's text (a text or content source, title, context) counts by its
    bytes besides the per-file bound; only base64 data is left to the file bound alone."""
    source = part.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        part = {**part, "source": {k: v for k, v in source.items() if k != "data"}}
    return _json_bytes(part)


def _content_bytes(content: Any) -> int:
    if isinstance(content, str):
        return len(content.encode())
    if not isinstance(content, list):
        return 0 if content is None else _json_bytes(content)
    total = 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            if kind == "document":
                total += _document_text_bytes(part)
            continue  # bounded per part by the model's media bound
        text = part.get("text") if isinstance(part, dict) else None
        total += len(text.encode()) if isinstance(text, str) else _json_bytes(part)
    return total


def prompt_token_bound(body: dict[str, Any]) -> int:
    """At least the number of prompt tokens the upstream can bill for this chat body's text."""
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    total = MESSAGE_OVERHEAD_TOKENS * (len(messages) + 1)
    for message in messages:
        if not isinstance(message, dict):
            total += _json_bytes(message)
            continue
        for name, value in message.items():
            if name == "content":
                total += _content_bytes(value)
            elif name != "role":  # name, tool_calls, tool_call_id, reasoning, ...
                total += len(value.encode()) if isinstance(value, str) else _json_bytes(value)
    for name in _PROMPT_FIELDS:
        if body.get(name) is not None:
            total += _json_bytes(body[name])
    if body.get("response_format") is not None:
        total += FORMAT_ALLOWANCE_TOKENS
    return total
