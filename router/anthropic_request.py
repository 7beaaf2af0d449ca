"""Anthropic's Messages API request, read into the chat-completions body the providers speak
(`translate`, `chat_body`), and the part of it a native (Anthropic) route gets
(`native_body`). Every refusal is Anthropic's API's own, before any hold, and names the
field; nothing that identifies the caller is carried over. The answer side is
router/anthropic_answer.py."""

from __future__ import annotations

from typing import Any

import orjson

from apifast.errors import bad

_ROLES = ("user", "assistant")


def _text_of(blocks: Any, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise bad(where, "must be a string or an array of text blocks")
    texts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise bad(f"{where}[{i}]", "must be a text block")
        texts.append(_text(block, f"{where}[{i}]"))
    return "\n\n".join(texts)


def _text(block: dict[str, Any], where: str) -> str:
    # Anthropic's API refuses any other; a native route would send it on to be refused there
    # (an upstream 400 that cannot name the field), a translating one would make it a string.
    text = block.get("text")
    if not isinstance(text, str):
        raise bad(f"{where}.text", "required, a string")
    if not text:  # Anthropic's API refuses an empty text block anywhere (messages, system)
        raise bad(f"{where}.text", "text content blocks must be non-empty")
    return text


def _check_not_blank(content: Any, where: str) -> None:
    """Anthropic's API refuses a turn or a system prompt whose only content is whitespace
    text ("text content blocks must contain non-whitespace text"), but takes whitespace text
    beside other text, an image or a tool call, and in a tool_result; an empty string is
    the callers' own check. A translating route's upstream would take it and answer oddly."""
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if content == "" or not isinstance(blocks, list) or not blocks:
        return
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") != "text":
            return
        text = block.get("text")
        if not isinstance(text, str) or text.strip():
            return
    raise bad(where, "text content blocks must contain non-whitespace text")


def _string(block: dict[str, Any], name: str, where: str) -> str:
    value = block.get(name)
    if not isinstance(value, str) or not value:
        raise bad(f"{where}.{name}", "required, a non-empty string")
    return value


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise bad(where, "an image block needs a source")
    if source.get("type") == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise bad(where, "a base64 image source needs media_type and data")
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise bad(where, "image source type must be base64 or url")


_NATIVE_ONLY = "has no equivalent on this model's provider (an Anthropic route takes it)"
NativeOnly = list[tuple[str, str]]  # (field, why) that only a native route can honour


def _tool_result(
    content: Any, where: str, native_only: NativeOnly
) -> tuple[str, list[dict[str, Any]]]:
    """A tool_result's content as (the tool message's text, its images). Chat tool messages
    take text only, so images follow as a user turn's image parts; so do the blocks only a
    native route takes (see `_passed_through`)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad(where, "tool_result content must be a string or an array of blocks")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for k, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text(block, f"{where}[{k}]"))
        elif kind == "image":
            images.append(_image_part(block, f"{where}[{k}]"))
        else:
            native_only.append((f"{where}[{k}].type", f"{kind!r} {_NATIVE_ONLY}"))
            images.append(_passed_through(block))
    return "\n\n".join(texts), images


def _passed_through(block: dict[str, Any]) -> dict[str, Any]:
    """A block only a native route takes, kept in the translation for the hold's bound alone
    (a translating route is passed over: router/route_fit.py): the upstream bills it, so
    the hold must cover it. A document counts as a file part (the model's file bound, or a
    400) plus its text; any other block (search_result, ...) by its JSON's bytes."""
    if block.get("type") == "document":
        return block
    return {"type": "passed_through", "block": block}


def _check_prefill(content: Any, where: str) -> None:
    """A final assistant turn is a prefill, the start of the answer: Anthropic's API refuses
    one that ends with whitespace (a chat upstream would take it and answer oddly)."""
    at, text = f"{where}.content", content
    if isinstance(content, list) and content and isinstance(content[-1], dict):
        at, text = f"{where}.content[{len(content) - 1}].text", content[-1].get("text")
        if content[-1].get("type") != "text":
            return
    if isinstance(text, str) and text != text.rstrip():
        raise bad(at, "final assistant content cannot end with trailing whitespace")


def _message(message: Any, i: int, last: bool, native_only: NativeOnly) -> list[dict[str, Any]]:
    """One Anthropic turn as chat messages (a user turn's tool results become tool messages,
    and the images in them a user message after them)."""
    where = f"messages[{i}]"
    if not isinstance(message, dict) or message.get("role") not in _ROLES:
        raise bad(f"{where}.role", "must be 'user' or 'assistant'")
    role, content = message["role"], message.get("content")
    if content in ("", []) and not (last and role == "assistant"):
        # As Anthropic's API answers it; only a final assistant turn (a prefill) may be empty.
        raise bad(f"{where}.content", "all messages must have non-empty content except for "
                  "the optional final assistant message")  # fmt: skip
    if last and role == "assistant":
        _check_prefill(content, where)
    if isinstance(content, str):
        _check_not_blank(content, f"{where}.content")
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content", "must be a string or an array of content blocks")
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    result_images: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        # cache_control on a block is a caching hint: a translating route's provider caches
        # prompt prefixes by itself (OpenAI does), so it is not carried over.
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "image":
            parts.append(_image_part(block, at))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("input"), dict):
                raise bad(f"{at}.input", "required, an object")
            calls.append({
                "id": _string(block, "id", at), "type": "function",
                "function": {"name": _string(block, "name", at),
                             "arguments": orjson.dumps(block["input"]).decode()},
            })  # fmt: skip
        elif kind == "tool_result" and role == "user":
            call = _string(block, "tool_use_id", at)
            text, images = _tool_result(block.get("content"), f"{at}.content", native_only)
            results.append({"role": "tool", "tool_call_id": call, "content": text})
            result_images.extend(images)
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier reasoning: not something a chat upstream takes back
        elif kind in ("tool_use", "tool_result", "thinking", "redacted_thinking", None):
            raise bad(at, f"unsupported content block {kind!r} in a {role} turn")
        else:
            # document, search_result, ...: passed through on a native route only.
            native_only.append((f"{at}.type", f"{kind!r} {_NATIVE_ONLY}"))
            parts.append(_passed_through(block))
    _check_not_blank(content, f"{where}.content")  # after each block's own checks
    out: list[dict[str, Any]] = list(results)
    if role == "assistant":
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        turn: dict[str, Any] = {"role": "assistant", "content": text or None}
        passed = [p for p in parts if p["type"] not in ("text", "image_url")]
        if passed:  # only for the hold's bound: no translating route takes this turn
            turn["content"] = [{"type": "text", "text": text}, *passed]
        if calls:
            turn["tool_calls"] = calls
        out.append(turn)
    elif parts or result_images:
        out.append({"role": "user", "content": result_images + parts})
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad("tools", "must be an array")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise bad(f"tools[{i}]", "needs a name")
        if tool.get("type") not in (None, "custom"):
            raise bad(f"tools[{i}]", f"server tool {tool.get('type')!r} is not supported")
        if not isinstance(tool.get("input_schema"), dict):
            # Anthropic's API requires it of a custom tool; a chat upstream would get `{}`.
            raise bad(f"tools[{i}].input_schema", "required, an object (the tool's JSON Schema)")
        fn: dict[str, Any] = {"name": tool["name"], "parameters": tool["input_schema"]}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> tuple[Any, bool]:
    """(chat tool_choice, whether parallel tool calls are disabled)."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    disable = choice.get("disable_parallel_tool_use") if isinstance(choice, dict) else None
    if disable is not None and not isinstance(disable, bool):
        raise bad("tool_choice.disable_parallel_tool_use", "must be a boolean")
    if kind == "auto":
        return "auto", bool(disable)
    if kind == "any":
        return "required", bool(disable)
    if kind == "none":
        return "none", False
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, bool(disable)
    raise bad("tool_choice", "must be {type: auto | any | none | tool}")


def _effort(thinking: Any, native_only: NativeOnly) -> str | None:
    """Extended thinking as chat's reasoning_effort: a budget below 4096 tokens is low, below
    16384 medium, else high (the inverse of the anthropic provider's mapping)."""
    if not isinstance(thinking, dict):
        raise bad("thinking", "must be an object")
    kind = thinking.get("type")
    if kind == "disabled":
        return None
    if kind != "enabled":
        native_only.append(("thinking.type", f"{kind!r} {_NATIVE_ONLY}"))
        return None
    budget = thinking.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise bad("thinking.budget_tokens", "required, a positive integer")
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


def _output_format(config: Any) -> dict[str, Any] | None:
    """`output_config.format` (structured outputs, what the SDK's `messages.parse` sends) as
    chat's `response_format`. `effort` is a hint of how much to spend, billed by the tokens
    used either way: a native route takes it, a translating one does without."""
    if not isinstance(config, dict):
        raise bad("output_config", "must be an object")
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise bad("output_config.format", "must be {type: json_schema, schema}")
    if not isinstance(fmt.get("schema"), dict):
        raise bad("output_config.format.schema", "required, an object (a JSON Schema)")
    # Not `strict`: OpenAI's strict mode refuses schemas Anthropic's accepts (a property
    # left out of `required`); without it the upstream still answers JSON to the schema.
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


# Fields Anthropic's API takes that ApiFast refuses on every route, and why.
_REFUSED = {
    "mcp_servers": "remote MCP servers are run by the model provider; ApiFast does not "
    "forward them: declare their tools as client tools instead",
    "container": "code-execution containers are kept by the model provider between requests "
    "and shared by all of ApiFast's users of that provider; ApiFast does not forward them",
}
_SERVICE_TIERS = ("auto", "standard_only")


# What a native (Anthropic) route receives of the client's body: `metadata` (its user_id
# identifies the caller) and `service_tier` (it changes the upstream's price) never.
_NATIVE_FIELDS = ("max_tokens", "messages", "system", "stop_sequences", "temperature",
                  "top_p", "top_k", "tools", "tool_choice", "thinking",
                  "output_config")  # fmt: skip


def native_body(body: dict[str, Any]) -> dict[str, Any]:
    """The client's Messages body as a native route gets it (already validated by
    `chat_body`, which refuses server tools the catalog price does not cover)."""
    return {name: body[name] for name in _NATIVE_FIELDS if name in body}


def chat_body(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(chat-completions body, number of messages) for a Messages API body; 400s name the
    field. `metadata` (its user_id identifies the caller) is never carried over."""
    chat, count, _ = translate(body)
    return chat, count


def translate(body: dict[str, Any]) -> tuple[dict[str, Any], int, tuple[tuple[str, str], ...]]:
    """`chat_body`, plus the (field, why) of what only a native route can honour (`top_k`, a
    document block, ...): a translating route is then passed over (router/route_fit.py)."""
    native_only: NativeOnly = []
    for name, why in _REFUSED.items():
        if body.get(name) is not None:
            raise bad(name, f"not supported: {why}")
    tier = body.get("service_tier")
    if tier is not None and tier not in _SERVICE_TIERS:
        raise bad("service_tier", "must be auto or standard_only")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad("max_tokens", "required, a positive integer")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "required, a non-empty array of messages")
    chat: list[dict[str, Any]] = []
    if body.get("system") is not None:
        chat.append({"role": "system", "content": _text_of(body["system"], "system")})
        _check_not_blank(body["system"], "system")
    for i, message in enumerate(messages):
        chat.extend(_message(message, i, i == len(messages) - 1, native_only))
    out: dict[str, Any] = {"messages": chat, "max_tokens": max_tokens}
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            # Anthropic's range for both; chat's temperature would go to 2.
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 <= value <= 1:
                raise bad(name, "must be a number from 0 to 1")
            out[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise bad("top_k", "must be a non-negative integer")
        native_only.append(("top_k", _NATIVE_ONLY))
    if body.get("thinking") is not None:
        effort = _effort(body["thinking"], native_only)
        if effort is not None:
            out["reasoning_effort"] = effort
    if body.get("output_config") is not None:
        response_format = _output_format(body["output_config"])
        if response_format is not None:
            out["response_format"] = response_format
    if body.get("stop_sequences") is not None:
        stops = body["stop_sequences"]
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad("stop_sequences", "must be an array of strings")
        out["stop"] = stops
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        out["tool_choice"], serial = _tool_choice(body["tool_choice"])
        if serial and "tools" in out:
            out["parallel_tool_calls"] = False  # disable_parallel_tool_use's equivalent
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "must be a boolean")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out, len(chat), tuple(native_only)
