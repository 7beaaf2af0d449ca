"""Limits on the size of request headers and declared bodies, checked on the raw ASGI scope
before any routing, for every endpoint (the fast chat path included).

uvicorn's httptools parser, the one `apifast serve` uses, has no header size limit of its
own, so this is the only one. Bodies sent without a Content-Length are limited where they
are read (`apifast.request_body.read_body`).
"""

from __future__ import annotations

from starlette.types import Scope

from apifast.errors import ApiError


def oversize_refusal(scope: Scope, max_header_bytes: int, max_body_bytes: int) -> ApiError | None:
    """The error to answer with when the request's headers or declared body are too large."""
    total = 0
    declared = None
    for name, value in scope["headers"]:
        total += len(name) + len(value) + 4  # ": " and CRLF, as on the wire
        if name == b"content-length" and declared is None:
            declared = value
    if total > max_header_bytes:
        return ApiError(
            431,
            f"request headers are larger than {max_header_bytes} bytes",
            code="headers_too_large",
        )
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        return ApiError(
            413, f"request body is larger than {max_body_bytes} bytes", code="body_too_large"
        )
    return None
