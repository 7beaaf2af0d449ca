"""Signing in and out: /admin/login, /admin/logout and revoking every session."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from apifast.admin.passwords import verify_password
from apifast.admin.sessions import clear_cookie, create_session, end_session, set_cookie
from apifast.admin.web import (
    Ctx,
    Forbidden,
    admin_ctx,
    audit,
    check_origin,
    codec,
    field,
    form_with_csrf,
    read_form,
    redirect,
    render,
    state_of,
)  # fmt: skip
from apifast.db import Queries

router = APIRouter()
Q = Queries("apifast.admin")
FAILED = "Login failed."


def _safe_next(value: str) -> str:
    # Only a path inside the panel: never an absolute URL or a scheme-relative one.
    if value.startswith("/admin/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/admin/"


def _login_page(request: Request, status: int = 200, error: str = "",
                next_path: str = "/admin/", configured: bool = True) -> Response:  # fmt: skip
    return render(
        request, "login.html", status=status, error=error, next_path=next_path,
        login_token=codec(request).login_form_token(), configured=configured,
    )  # fmt: skip


@router.get("/admin/login")
async def login_form(request: Request, next: str = "/admin/") -> Response:
    state = state_of(request)
    configured = await state.pool.fetchval(Q.admin_password_get) is not None
    return _login_page(request, next_path=_safe_next(next), configured=configured)


@router.post("/admin/login")
async def login(request: Request) -> Response:
    state = state_of(request)
    check_origin(request)
    ip = request.client.host if request.client else "unknown"
    wait = state.login_limiter.check(ip)
    if wait:
        await audit(state.pool, None, "login_rate_limited")
        response = _login_page(request, 429, f"Too many attempts. Try again in {int(wait) + 1} s.")
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    form = await read_form(request)
    if not codec(request).login_form_token_ok(field(form, "login_token")):
        raise Forbidden("Missing or expired login form token. Reload the page and try again.")
    next_path = _safe_next(field(form, "next", "/admin/"))
    password = form.get("password")
    stored = await state.pool.fetchval(Q.admin_password_get)
    ok = isinstance(password, str) and await asyncio.to_thread(verify_password, password, stored)
    if not ok:
        await audit(state.pool, None, "login_failed")
        return _login_page(request, 401, FAILED, next_path, configured=stored is not None)
    session_id, token = await create_session(state.pool, state.settings)
    await audit(state.pool, session_id, "login")
    response = redirect(next_path)
    set_cookie(response, request, state.settings, codec(request).cookie_value(token))
    return response


@router.post("/admin/logout")
async def logout(ctx: Ctx = Depends(admin_ctx)) -> Response:
    await form_with_csrf(ctx)
    await end_session(ctx.pool, ctx.session.token)
    await audit(ctx.pool, ctx.session.id, "logout")
    response = redirect("/admin/login")
    clear_cookie(response, ctx.request, ctx.state.settings)
    return response


@router.post("/admin/sessions/revoke")
async def revoke_all(ctx: Ctx = Depends(admin_ctx)) -> Response:
    """Sign out everywhere: every session, this one included."""
    await form_with_csrf(ctx)
    await ctx.pool.execute(Q.admin_sessions_delete_all)
    await audit(ctx.pool, ctx.session.id, "sessions_revoked")
    response = redirect("/admin/login")
    clear_cookie(response, ctx.request, ctx.state.settings)
    return response
