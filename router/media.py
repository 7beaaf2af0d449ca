"""The prompt-token bound of non-text input in a chat body (image, audio and file parts).

Text is bounded by its bytes (a token covers at least one byte); a media part is not: an
image URL of 40 bytes can cost a thousand tokens. Each part therefore adds the model's
declared per-part bound, and a kind of part the model declares no bound for is refused
before any hold, since the hold could not cover it.
"""

from __future__ import annotations

from typing import Any

from apifast.catalog.toml import Model
from apifast.errors import bad

# Content-part types by kind, as OpenAI's chat format names them.
_IMAGE = frozenset({"image_url", "input_image", "image"})
_AUDIO = frozenset({"input_audio", "audio"})
_FILE = frozenset({"file", "input_file", "document"})


def media_token_bound(model: Model, messages: Any) -> int:
    """Tokens to add to the text bound for the media parts of `messages`; 400 for a kind of
    part this model takes no bound for."""
    if not isinstance(messages, list):
        return 0
    images = audio = files = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue  # a string: text only
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _IMAGE:
                images += 1
            elif kind in _AUDIO:
                audio += 1
            elif kind in _FILE:
                files += 1
    if audio and model.audio_input_tokens is None:
        raise bad("messages", f"the model '{model.id}' does not take audio input")
    if files and model.file_input_tokens is None:
        raise bad("messages", f"the model '{model.id}' does not take file input")
    return (
        images * model.image_input_tokens
        + audio * (model.audio_input_tokens or 0)
        + files * (model.file_input_tokens or 0)
    )
