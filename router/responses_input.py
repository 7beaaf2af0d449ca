"""OpenAI's Responses API request, read into the chat-completions body the providers speak.

ApiFast is stateless by promise (it stores no prompt or response), so whatever needs a stored
response is refused with a 400 that says why, as are built-in tools ApiFast cannot run.
Every refusal names the field; nothing is silently dropped.
"""

from __future__ import annotations

from typing import Any

from apifast.errors import ApiError, bad
from apifast.router.validation import check_service_tier

_STATELESS = (
    "ApiFast never stores prompts or responses, so it cannot continue a stored "
    "conversation: send the whole conversation in `input` instead"
)
# Fields that need server-side state, and why they are refused.
_NEEDS_STATE = {
    "previous_response_id": _STATELESS,
    "conversation": _STATELESS,
    "prompt": "stored prompt templates need state ApiFast does not keep; send `instructions`",
}
_BUILTIN_TOOLS = {
    "web_search": "web search",
    "web_search_preview": "web search",
    "web_search_preview_2025_03_11": "web search",
    "file_search": "file search",
    "code_interpreter": "the code interpreter",
    "computer_use_preview": "computer use",
    "computer_use": "computer use",
    "image_generation": "image generation",
    "mcp": "remote MCP servers",
    "local_shell": "the local shell tool",
    "shell": "the shell tool",
    "apply_patch": "the apply_patch tool",
    "custom": "custom (free-form) tools",
}
_MESSAGE_ROLES = ("user", "assistant", "system", "developer")
# The Responses API's request fields (OpenAI's, as its SDK lists them) and ApiFast's own
# routing preferences. Any other is refused as OpenAI refuses it: ignored, a chat-ism such as
# `max_tokens` would leave the answer unbounded by what the client meant (and billed so).
KNOWN_FIELDS = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
    "max_output_tokens", "max_tool_calls", "temperature", "top_p", "top_logprobs", "text",
    "reasoning", "include", "truncation", "stream", "stream_options", "store", "background",
    "background_options", "previous_response_id", "conversation", "prompt", "metadata",
    "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
    "prompt_cache_options", "service_tier", "context_management", "access_programs", "image",
    "moderation", "models", "route",
})  # fmt: skip
_INSTEAD = {
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "messages": "input",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
    "verbosity": "text.verbosity",
}


def _refuse_unknown_fields(body: dict[str, Any]) -> None:
    for name in body:
        if name not in KNOWN_FIELDS:
            instead = _INSTEAD.get(name)
            hint = f" (the Responses API's is `{instead}`)" if instead else ""
            raise ApiError(400, f"Unknown parameter: '{name}'{hint}.", param=name,
                           code="unknown_parameter")  # fmt: skip


def _number(body: dict[str, Any], name: str, low: float, high: float, out: dict[str, Any]) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad(name, f"must be a number from {low:g} to {high:g}")
    out[name] = value


def _input_part(part: Any, where: str, role: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text"):
        text = part.get("text")
        if not isinstance(text, str):
            raise bad(f"{where}.text", "must be a string")
        return {"type": "text", "text": text}
    if kind == "refusal" and role == "assistant":
        return {"type": "text", "text": str(part.get("refusal") or "")}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            if part.get("file_id") is not None:
                raise bad(f"{where}.file_id", "uploaded files are not kept; send image_url")
            raise bad(f"{where}.image_url", "required, an https or data: URL")
        image: dict[str, Any] = {"url": url}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        data = part.get("file_data")
        if not isinstance(data, str) or not data:
            raise bad(f"{where}.file_data", "required: uploaded files and file URLs are not kept")
        file: dict[str, Any] = {"file_data": data}
        if isinstance(part.get("filename"), str):
            file["filename"] = part["filename"]
        return {"type": "file", "file": file}
    raise bad(f"{where}.type", f"unsupported content part {kind!r} in a {role} message")


def _message_content(content: Any, where: str, role: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(where, "must be a string or an array of content parts")
    parts = [_input_part(p, f"{where}[{i}]", role) for i, p in enumerate(content)]
    if role != "user" and all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)  # system and assistant turns take text
    if role != "user":
        raise bad(where, f"a {role} message may hold text only")
    return parts


def _output_text(output: Any, where: str) -> str:
    """A function_call_output's `output`: a string, or text parts."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts = []
        for i, part in enumerate(output):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
                raise bad(f"{where}[{i}]", "a function_call_output may hold text parts only")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise bad(where, "must be a string or an array of input_text parts")


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("instructions", "must be a string")
        out.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        out.append({"role": "user", "content": items})
        return out
    if not isinstance(items, list) or not items:
        raise bad("input", "required, a string or a non-empty array of input items")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(where, "must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise bad(f"{where}.role", f"must be one of {', '.join(_MESSAGE_ROLES)}")
            content = _message_content(item.get("content"), f"{where}.content", role)
            out.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise bad(where, "a function_call needs call_id and name")
            arguments = item.get("arguments")
            call = {
                "id": call_id, "type": "function",
                "function": {"name": name,
                             "arguments": arguments if isinstance(arguments, str) else "{}"},
            }  # fmt: skip
            last = out[-1] if out else None
            # Consecutive calls (and the text before them) are one assistant turn in chat.
            if (
                last is not None
                and last["role"] == "assistant"
                and not isinstance(last.get("content"), list)
            ):
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise bad(f"{where}.call_id", "required, the call_id of the function_call")
            output = _output_text(item.get("output"), f"{where}.output")
            out.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            continue  # earlier reasoning: a chat upstream takes none back
        elif kind == "item_reference":
            raise bad(f"{where}.type", _STATELESS)
        else:
            raise bad(f"{where}.type", f"unsupported input item {kind!r}")
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad("tools", "must be an array")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind in _BUILTIN_TOOLS:
            raise bad(
                f"tools[{i}].type",
                f"built-in tool {kind!r} is not supported: ApiFast cannot run "
                f"{_BUILTIN_TOOLS[kind]}; declare a function tool instead",
            )
        if kind != "function" or not isinstance(tool.get("name"), str):
            raise bad(f"tools[{i}]", "must be a function tool with a name")
        fn: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("parameters") or {}}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        if isinstance(tool.get("strict"), bool):
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind in _BUILTIN_TOOLS:
        raise bad("tool_choice", f"built-in tool {kind!r} is not supported")
    raise bad("tool_choice", "must be auto, none, required or {type: function, name}")


def _text_format(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, dict):
        raise bad("text", "must be an object")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise bad("text.format", "a json_schema format needs a name and a schema")
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise bad("text.format.type", "must be text, json_object or json_schema")


def chat_body(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(chat-completions body, number of messages) for a Responses API body; 400s name the
    field. Caller-identifying fields (`user`, `metadata`, `safety_identifier`,
    `prompt_cache_key`) are never carried over; `store` is accepted and has no effect."""
    _refuse_unknown_fields(body)
    for name, why in _NEEDS_STATE.items():
        if body.get(name) is not None:
            raise bad(name, f"not supported: {why}")
    if body.get("background") is True:
        raise bad(
            "background",
            "not supported: a background response must be stored to be fetched later, and "
            "ApiFast stores none; use stream: true for long generations",
        )
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise bad("store", "must be a boolean")
    messages = _messages(body)
    out: dict[str, Any] = {"messages": messages}
    max_output = body.get("max_output_tokens")
    if max_output is not None:
        if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 1:
            raise bad("max_output_tokens", "must be a positive integer")
        out["max_tokens"] = max_output
    _number(body, "temperature", 0, 2, out)
    _number(body, "top_p", 0, 1, out)
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        out["tool_choice"] = _tool_choice(body["tool_choice"])
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise bad("parallel_tool_calls", "must be a boolean")
        if "tools" in out:
            out["parallel_tool_calls"] = parallel
    if body.get("text") is not None:
        response_format = _text_format(body["text"])
        if response_format is not None:
            out["response_format"] = response_format
        verbosity = body["text"].get("verbosity")
        if verbosity is not None:
            if verbosity not in ("low", "medium", "high"):
                raise bad("text.verbosity", "must be low, medium or high")
            out["verbosity"] = verbosity  # chat's own equivalent
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise bad("reasoning", "must be an object")
        effort = reasoning.get("effort")
        if effort is not None:
            if effort not in ("minimal", "low", "medium", "high", "none", "xhigh"):
                raise bad("reasoning.effort", "must be minimal, low, medium or high")
            out["reasoning_effort"] = effort
    _logprobs_asked(body, out)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", "must be a boolean")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out, len(messages)


def _logprobs_asked(body: dict[str, Any], out: dict[str, Any]) -> None:
    """`top_logprobs` / include `message.output_text.logprobs` as chat's logprobs (checked
    in `native_only_fields`)."""
    top = body.get("top_logprobs")
    include = body.get("include")
    asked = isinstance(include, list) and "message.output_text.logprobs" in include
    if type(top) is int and top > 0:
        out["logprobs"], out["top_logprobs"] = True, top
    elif asked:
        out["logprobs"] = True


# include values a translated route honours: logprobs (chat's own), and encrypted reasoning:
# a chat upstream gives none and stateless ApiFast keeps none to replay, so reasoning items
# carry none, and the request works the same (agents such as Codex always ask for it).
_INCLUDE_HONOURED = ("reasoning.encrypted_content", "message.output_text.logprobs")
_NO_EQUIVALENT = "has no equivalent when this model's route translates to chat completions"


def native_only_fields(body: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(field, why) of the Responses fields a translating route cannot honour: with no
    route that speaks the Responses API natively, a 400 naming the first, before the hold
    (router/route_fit.py). Fields with no effect on a translated route (`max_tool_calls`,
    which bounds built-in tools, refused anyway) are accepted; malformed ones are 400s."""
    out: list[tuple[str, str]] = []
    include = body.get("include")
    if include is not None:
        if not isinstance(include, list) or not all(isinstance(v, str) for v in include):
            raise bad("include", "must be an array of strings")
        for i, value in enumerate(include):
            # No route honours the others: they ask for built-in tools' results (refused)
            # or for echoes of the input, which a native route's reply leaves out too.
            if value not in _INCLUDE_HONOURED:
                raise bad(f"include[{i}]", f"{value!r} is not supported by ApiFast")
    truncation = body.get("truncation")
    if truncation not in (None, "disabled", "auto"):
        raise bad("truncation", "must be auto or disabled")
    if truncation == "auto":
        out.append(("truncation", "'auto' " + _NO_EQUIVALENT + ": ApiFast does not drop input "
                    "items to fit the context; send truncation: disabled"))  # fmt: skip
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None:
        if (
            isinstance(top_logprobs, bool)
            or not isinstance(top_logprobs, int)
            or not (0 <= top_logprobs <= 20)
        ):
            raise bad("top_logprobs", "must be an integer from 0 to 20")
    max_tool_calls = body.get("max_tool_calls")
    if max_tool_calls is not None and (
        isinstance(max_tool_calls, bool) or not isinstance(max_tool_calls, int)
        or max_tool_calls < 1
    ):  # fmt: skip
        raise bad("max_tool_calls", "must be a positive integer")
    check_service_tier(body.get("service_tier"))  # as chat answers it
    return tuple(out)
