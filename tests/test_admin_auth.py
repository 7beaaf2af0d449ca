"""Admin login and sessions over HTTP: the cookie's flags, CSRF, rate limits, timeouts,
revocation, and the audit trail."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.admin_support import (
    ADMIN_PASSWORD,
    AdminClient,
    admin,
    admin_stack,
    model_form,
    session_cookie,
    set_admin_password,
)  # fmt: skip
from tests.harness import Stack, models_toml, running_stack

__all__ = ["admin", "admin_stack"]  # fixtures


@pytest.mark.parametrize("path", ["/admin/", "/admin", "/admin/models", "/admin/keys/1",
                                  "/admin/no-such-page", "/admin/audit"])  # fmt: skip
async def test_anonymous_visitors_are_sent_to_login(admin_stack: Stack, path: str):
    async with AdminClient(admin_stack) as c:
        r = await c.get(path)
        assert r.status_code == 303
        assert r.headers["location"].startswith("/admin/login")
        # A state-changing post without a session goes the same way and changes nothing.
        r = await c.post("/admin/models/disable", {"id": "fast-chat"}, csrf=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/admin/login")
    assert "fast-chat" in admin_stack.state.catalog.models


async def test_login_sets_one_secure_session_cookie(admin_stack: Stack):
    async with AdminClient(admin_stack) as c:
        page = await c.http.get("/admin/login")
        assert "set-cookie" not in page.headers  # no cookie before login
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        r = await c.login()
        name, value, morsel = session_cookie(r)
        assert name == "__Host-apifast_admin"
        assert morsel["httponly"] and morsel["secure"]
        assert morsel["samesite"] == "Strict" and morsel["path"] == "/"
        assert not morsel["domain"]
        assert r.headers["location"] == "/admin/"
        # The cookie holds a random token and its signature, never the password.
        assert ADMIN_PASSWORD not in value and "." in value
        assert (await c.get("/admin/")).status_code == 200
        stored = await admin_stack.pool.fetch("SELECT token_hash FROM admin_sessions")
        assert len(stored) == 1 and value.split(".")[0] not in str(stored[0]["token_hash"])


async def test_wrong_password_is_refused_without_saying_why(admin_stack: Stack):
    async with AdminClient(admin_stack) as c:
        r = await c.try_login("not the password at all")
        assert r.status_code == 401
        assert "Login failed." in r.text
        assert "set-cookie" not in r.headers
        assert "password" not in r.text.split("Login failed.")[1].split("<")[0].lower()
        r = await c.try_login("")
        assert r.status_code == 401
    actions = [r["action"] for r in await admin_stack.pool.fetch("SELECT action FROM admin_audit")]
    assert actions.count("login_failed") == 2


async def test_login_form_needs_its_token(admin_stack: Stack):
    async with AdminClient(admin_stack) as c:
        r = await c.http.post("/admin/login", data={"password": ADMIN_PASSWORD})
        assert r.status_code == 403 and "set-cookie" not in r.headers
        token = await c.login_token()
        r = await c.http.post(
            "/admin/login", data={"password": ADMIN_PASSWORD, "login_token": token},
            headers={"Origin": "https://evil.example"},
        )  # fmt: skip
        assert r.status_code == 403 and "set-cookie" not in r.headers


async def test_form_posts_need_the_csrf_token(admin: AdminClient):
    stack = admin.stack
    r = await admin.post("/admin/models/save", model_form(input_usd_per_mtok="9.00"), csrf=False)
    assert r.status_code == 403
    assert "CSRF" in r.text
    r = await admin.http.post(
        "/admin/models/save", data={**model_form(input_usd_per_mtok="9.00"), "csrf": "forged"},
        headers=admin._headers(),
    )  # fmt: skip
    assert r.status_code == 403
    assert str(stack.state.catalog.models["fast-chat"].price.input_usd_per_mtok) == "0.50"
    r = await admin.post("/admin/models/save", model_form(input_usd_per_mtok="9.00"))
    assert r.status_code == 303
    assert str(stack.state.catalog.models["fast-chat"].price.input_usd_per_mtok) == "9.00"


async def test_tampered_cookie_is_refused(admin: AdminClient):
    name, value = admin.cookie.split("=", 1)  # type: ignore[union-attr]
    token, tag = value.split(".")
    flipped = ("A" if token[0] != "A" else "B") + token[1:]
    admin.cookie = f"{name}={flipped}.{tag}"
    assert (await admin.get("/admin/")).status_code == 303


async def test_logout_ends_the_session(admin: AdminClient):
    old = admin.cookie
    r = await admin.post("/admin/logout", {})
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"
    cleared = r.headers["set-cookie"]
    assert "Max-Age=0" in cleared or "expires=" in cleared.lower()
    admin.cookie = old
    assert (await admin.get("/admin/")).status_code == 303
    assert await admin.stack.pool.fetchval("SELECT count(*) FROM admin_sessions") == 0


async def test_sign_out_everywhere(admin: AdminClient):
    async with AdminClient(admin.stack) as other:
        await other.login()
        r = await admin.post("/admin/sessions/revoke", {})
        assert r.status_code == 303
        assert (await other.get("/admin/")).status_code == 303
        assert (await admin.get("/admin/")).status_code == 303


async def test_idle_and_absolute_timeouts(admin: AdminClient):
    pool = admin.stack.pool
    await pool.execute("UPDATE admin_sessions SET last_seen_at = now() - interval '2 hours'")
    assert (await admin.get("/admin/")).status_code == 303
    await admin.login()
    await pool.execute("UPDATE admin_sessions SET expires_at = now() - interval '1 second'")
    assert (await admin.get("/admin/")).status_code == 303
    await admin.login()
    assert (await admin.get("/admin/")).status_code == 200


async def test_new_password_signs_everyone_out(admin: AdminClient):
    from apifast.admin.passwords import hash_password
    from apifast.cli.admin import store_password

    await store_password(admin.stack.settings.database_url, hash_password("another long password"))
    assert (await admin.get("/admin/")).status_code == 303
    assert (await admin.try_login(ADMIN_PASSWORD)).status_code == 401
    await admin.login("another long password")


async def test_logins_are_rate_limited(
    stack_settings_factory: Callable[..., Any], fake_openai: Any
):
    settings = stack_settings_factory(models_toml(fake_openai.url), admin_login_rate_limit=3)
    async with running_stack(settings) as stack:
        await set_admin_password(stack)
        async with AdminClient(stack) as c:
            for _ in range(3):
                assert (await c.try_login("wrong password here")).status_code == 401
            r = await c.try_login(ADMIN_PASSWORD)  # even the right one, once over the limit
            assert r.status_code == 429 and "Retry-After" in r.headers
            assert "set-cookie" not in r.headers
        # The client's address is nowhere in the database.
        dump = str(await stack.pool.fetch("SELECT * FROM admin_audit"))
        assert "127.0.0.1" not in dump


async def test_insecure_cookie_only_when_allowed_for_loopback_http(
    stack_settings_factory: Callable[..., Any], fake_openai: Any
):
    settings = stack_settings_factory(models_toml(fake_openai.url), admin_insecure_cookie=True)
    async with running_stack(settings) as stack:
        await set_admin_password(stack)
        async with AdminClient(stack) as c:
            name, _, morsel = session_cookie(await c.login())
            assert name == "apifast_admin" and not morsel["secure"] and morsel["httponly"]
            # A request addressed to a non-loopback host still gets a Secure cookie.
            token = await c.login_token()
            r = await c.http.post(
                "/admin/login", data={"password": ADMIN_PASSWORD, "login_token": token},
                headers={"Host": "admin.example.com"},
            )  # fmt: skip
            name, _, morsel = session_cookie(r)
            assert name == "__Host-apifast_admin" and morsel["secure"]


async def test_every_action_is_audited(admin: AdminClient):
    await admin.post("/admin/models/save", model_form(output_usd_per_mtok="2.00"))
    await admin.post("/admin/models/disable", {"id": "embed-small"})
    await admin.post("/admin/logout", {})
    rows = await admin.stack.pool.fetch(
        "SELECT action, target, session_id FROM admin_audit ORDER BY id"
    )
    assert [r["action"] for r in rows] == ["login", "model_updated", "model_disabled", "logout"]
    assert rows[1]["target"] == "fast-chat" and rows[1]["session_id"] == rows[0]["session_id"]


async def _stalled_post(stack: Stack, path: str, cookie: str | None) -> tuple[bytes, bytes]:
    """POST a form whose body stops after a few bytes; (status line and headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.settings.port)
    try:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 200\r\n"
            + (f"Cookie: {cookie}\r\n" if cookie else "")
            + "\r\npassword="
        )
        writer.write(head.encode())
        await writer.drain()  # then nothing more: the body stalls
        answer = await asyncio.wait_for(reader.read(), timeout=20)  # the server closes
    finally:
        writer.close()
    status, _, body = answer.partition(b"\r\n\r\n")
    return status, body


async def test_a_form_that_stalls_gets_408_in_the_panels_style(
    stack_settings_factory: Callable[..., Any], fake_openai: Any
):
    settings = stack_settings_factory(models_toml(fake_openai.url), body_read_timeout_s=0.5)
    async with running_stack(settings) as stack:
        await set_admin_password(stack)
        async with AdminClient(stack) as c:
            await c.login()
            assert c.cookie is not None
            for path, cookie in (("/admin/login", None), ("/admin/keys/find", c.cookie),
                                 ("/admin/logout", c.cookie)):  # fmt: skip
                head, body = await _stalled_post(stack, path, cookie)
                assert head.startswith(b"HTTP/1.1 408"), (path, head)
                assert b"text/html" in head.lower() and b"connection: close" in head.lower()
                assert b"The form did not arrive within 0.5 s" in body, path
            # The session is still there: the stalled logout did nothing.
            assert (await c.get("/admin/keys")).status_code == 200
