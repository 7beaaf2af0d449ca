"""What every admin page shares: templates, security headers, the session guard, the CSRF
check and the audit trail."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import asyncpg
import jinja2
import orjson
from fastapi import FastAPI
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from apifast import __version__
from apifast.admin.sessions import AdminSession, SessionCodec, live_session, read_cookie
from apifast.admin.state import AdminState
from apifast.db import Queries
from apifast.money import format_usd

Q = Queries("apifast.admin")
PACKAGE_DIR = Path(__file__).resolve().parent

# Pages load only this origin's scripts, styles and fetches; nothing may frame them.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
    "Cache-Control": "no-store",
}


class LoginRequired(Exception):
    def __init__(self, next_path: str = "/admin/") -> None:
        super().__init__(next_path)
        self.next_path = next_path


class Forbidden(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unavailable(Exception):
    """A page whose service this server does not run (answered 503 with an error page)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FormTimeout(Exception):
    """The posted form did not arrive within APIFAST_BODY_READ_TIMEOUT_S (answered 408)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"form body timed out after {timeout_s:g} s")
        self.timeout_s = timeout_s


@dataclass(frozen=True, slots=True)
class Ctx:
    """An authenticated admin request."""

    request: Request
    state: AdminState
    session: AdminSession

    @property
    def pool(self) -> asyncpg.Pool:
        return self.state.pool


def make_templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(PACKAGE_DIR / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["usd"] = lambda v: format_usd(Decimal(v)) if v is not None else ""
    env.filters["signed_usd"] = _signed_usd
    env.filters["when"] = lambda t: t.strftime("%Y-%m-%d %H:%M:%S UTC") if t else ""
    env.globals["version"] = __version__
    return env


def _signed_usd(value: Decimal) -> str:
    return ("+" if value >= 0 else "-") + format_usd(abs(Decimal(value)))


def secure_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    env: jinja2.Environment = request.app.state.admin_templates
    html = env.get_template(template).render(request_path=request.url.path, **context)
    return secure_headers(HTMLResponse(html, status_code=status))  # type: ignore[return-value]


def redirect(url: str) -> Response:
    return secure_headers(RedirectResponse(url, status_code=303))


def state_of(request: Request) -> AdminState:
    state: AdminState = request.app.state.admin
    return state


def codec(request: Request) -> SessionCodec:
    return SessionCodec(state_of(request).secret)


async def admin_ctx(request: Request) -> Ctx:
    """FastAPI dependency: the live admin session, else off to /admin/login."""
    state = state_of(request)
    c = codec(request)
    token = c.token_from_cookie(read_cookie(request))
    session_id = None if token is None else await live_session(state.pool, state.settings, token)
    if token is None or session_id is None:
        target = request.url.path if request.method == "GET" else "/admin/"
        raise LoginRequired(target)
    return Ctx(request, state, AdminSession(session_id, token, c.csrf_for(token)))


def check_origin(request: Request) -> None:
    """Refuse a cross-site form post (defence in depth behind the CSRF token)."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise Forbidden("Cross-site request refused.")
    origin = request.headers.get("origin")
    if origin and origin != "null":
        # A cross-site form cannot set X-Forwarded-Host; a proxy in front of us may.
        allowed = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")}
        public = state_of(request).settings.public_url
        if public:
            allowed.add(urlsplit(public).netloc)
        if urlsplit(origin).netloc not in allowed:
            raise Forbidden("Cross-origin request refused.")


async def form_with_csrf(ctx: Ctx) -> FormData:
    """The posted form, once its CSRF token has been checked (403 without a good one)."""
    check_origin(ctx.request)
    form = await read_form(ctx.request)
    sent = form.get("csrf")
    if not isinstance(sent, str) or not hmac.compare_digest(sent, ctx.session.csrf):
        raise Forbidden("Missing or invalid CSRF token. Reload the page and try again.")
    return form


async def read_form(request: Request) -> FormData:
    """The posted form, read within APIFAST_BODY_READ_TIMEOUT_S like every request body
    (apifast.request_body): a client trickling its form must not hold a connection for ever."""
    timeout_s = state_of(request).settings.body_read_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await request.form()
    except TimeoutError:
        raise FormTimeout(timeout_s) from None


def field(form: FormData, name: str, default: str = "", limit: int = 10_000) -> str:
    value = form.get(name)
    return value.strip()[:limit] if isinstance(value, str) else default


async def audit(
    pool: Any, session_id: int | None, action: str, target: str = "", **detail: Any
) -> None:
    await pool.execute(
        Q.admin_audit_insert, session_id, action, target, orjson.dumps(detail, default=str).decode()
    )


def install_handlers(app: FastAPI) -> None:
    async def login_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        return redirect("/admin/login?next=" + quote(exc.next_path, safe="/"))

    async def forbidden(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Forbidden)
        return render(request, "error.html", status=403, title="Forbidden", message=exc.message)

    async def unavailable(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Unavailable)
        return render(request, "error.html", status=503, title="Unavailable", message=exc.message)

    async def form_timeout(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, FormTimeout)
        message = f"The form did not arrive within {exc.timeout_s:g} s. Go back and send it again."
        response = render(request, "error.html", status=408, title="Request timeout",
                          message=message)  # fmt: skip
        response.headers["Connection"] = "close"  # the rest of the body may still be coming
        return response

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(FormTimeout, form_timeout)
    app.add_exception_handler(Forbidden, forbidden)
    app.add_exception_handler(Unavailable, unavailable)
