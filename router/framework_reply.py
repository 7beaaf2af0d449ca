"""A core `Reply` as a Starlette response, for the FastAPI routes (the fast path writes
replies to ASGI itself, router/fast_path.py)."""

from __future__ import annotations

from starlette.responses import Response, StreamingResponse

from apifast.router.core_types import Reply


def framework_response(reply: Reply) -> Response:
    if reply.stream is not None:
        return StreamingResponse(
            reply.stream, media_type="text/event-stream", headers=reply.headers
        )
    return Response(reply.content, media_type="application/json", headers=reply.headers)
