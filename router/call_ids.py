"""ApiFast's own ids for the tool calls of an answer, in place of the upstream's: their form
tells which upstream served the request (`toolu_01...` is Anthropic's, `chatcmpl-tool-...`
vLLM's, OpenAI's `call_` ids have their own length and alphabet). The client sends an id
back with the call and its result, in the same conversation, so no upstream ever needs its
own id again: any id the client's history holds consistently is one the upstream accepts."""

from __future__ import annotations

from typing import Any


def call_id(prefix: str, generation_id: str, n: int) -> str:
    """The `n`th call of a generation: unique (the generation id is random), at most 40
    characters (OpenAI's limit on a tool call id) and of Anthropic's id alphabet."""
    return f"{prefix}{generation_id.removeprefix('gen-')}{n:02d}"


def own_chat_call_ids(
    choices: Any, field: str, ids: dict[tuple[Any, Any], str], generation_id: str
) -> None:
    """Rename, in place, the tool calls of chat `choices` (their `message`, or a stream
    chunk's `delta`, as `field` says). `ids` maps (choice index, call index) to the id given,
    across one stream's chunks: a call's id comes in its first chunk (some upstreams repeat
    it in every one), and each of its chunks gets the same id."""
    if not isinstance(choices, list):
        return
    for choice in choices:
        holder = choice.get(field) if isinstance(choice, dict) else None
        calls = holder.get("tool_calls") if isinstance(holder, dict) else None
        if not isinstance(calls, list):
            continue
        for position, call in enumerate(calls):
            if not isinstance(call, dict) or not call.get("id"):
                continue
            key = (choice.get("index", 0), call.get("index", position))
            given = ids.get(key)
            if given is None:
                given = ids[key] = call_id("call_", generation_id, len(ids))
            call["id"] = given
