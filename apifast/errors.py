"""Errors in OpenAI's shape, {"error": {"message", "type", "code", "param"}}, or in
Anthropic's, {"type": "error", "error": {"type", "message"}}, for the Anthropic endpoints."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("apifast")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


# Anthropic's error types by status; 402 (insufficient balance) is ours.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> bytes:
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def speaks_anthropic(scope: Any) -> bool:
    """Whether a request's errors are answered in Anthropic's shape: the Messages API, and
    the models list when an anthropic SDK (which always sends anthropic-version) asks."""
    path: str = scope["path"]
    if path.startswith("/v1/messages"):
        return True
    if path.startswith("/v1/models"):
        return any(name == b"anthropic-version" for name, _ in scope["headers"])
    return False


class ApiError(Exception):
    """Raise anywhere in a request to answer with this status and OpenAI-shaped body."""

    # True once the request it answers is in the request metrics already (a request that was
    # finished, then failed upstream), so the error path does not count it twice.
    counted = False

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        anthropic_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        # The status in Anthropic's shape when it differs (an upstream rate limit or
        # overload: 429 / 529, which its SDK retries; OpenAI's shape keeps 502).
        self.anthropic_status = anthropic_status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }

    def client_status(self, anthropic: bool = False) -> int:
        """The status the client gets: in Anthropic's shape, its own meanings (the usage
        event records this one, what the client saw)."""
        status = self.status
        if anthropic and self.anthropic_status is not None:
            status = self.anthropic_status
        if anthropic and status == 503:
            # Anthropic says "busy, retry" with 529 overloaded_error (its SDK's
            # OverloadedError): upstreams overloaded, or metering backed up.
            status = 529
        return status

    def response(self, anthropic: bool = False) -> Response:
        status = self.client_status(anthropic)
        return Response(
            anthropic_error_body(status, self.message) if anthropic else orjson.dumps(self.body()),
            status_code=status,
            media_type="application/json",
            headers=self.headers,
        )


def bad(param: str, message: str) -> ApiError:
    """A 400 naming the field at fault."""
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def internal_error(exc: BaseException, method: str, path: str) -> ApiError:
    """The one answer to an unexpected exception: a log line naming only its type (its text
    could echo request content) and a bare 500."""
    log.error("unhandled %s on %s %s", type(exc).__name__, method, path)
    return ApiError(500, "internal error", type="api_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return exc.response(speaks_anthropic(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param, code="invalid_request").response(
            speaks_anthropic(request.scope)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        if exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        error = ApiError(exc.status_code, message, headers=dict(exc.headers or {}))
        return error.response(speaks_anthropic(request.scope))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        error = internal_error(exc, request.method, request.url.path)
        return error.response(speaks_anthropic(request.scope))


class ContainUnhandledErrors:
    """Innermost-but-one ASGI layer: an unhandled exception becomes a 500 in OpenAI's shape
    and a log line naming only its type. Without it Starlette re-raises after the handler,
    and uvicorn logs the exception text and traceback, which could echo request content."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            error = internal_error(exc, scope.get("method", ""), scope["path"])
            if not started:
                await error.response(speaks_anthropic(scope))(scope, receive, send)
