"""Admin sessions: a random token in one signed cookie, and its SHA-256 in Postgres.

The cookie is `<token>.<HMAC(secret, token)>`: a forged or altered cookie is refused before
any database work. Postgres holds only the token's hash, with an absolute expiry and a
last-seen time for the idle limit; deleting the row revokes the session. The CSRF token of a
session is an HMAC of its token, so it needs no storage and dies with the session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass

import asyncpg
from starlette.requests import Request
from starlette.responses import Response

from apifast.db import Queries
from apifast.settings import Settings

Q = Queries("apifast.admin")
SECURE_COOKIE = "__Host-apifast_admin"  # __Host-: Secure, Path=/, no Domain, set by us only
INSECURE_COOKIE = "apifast_admin"
LOGIN_FORM_TTL_S = 2 * 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, label: bytes, data: bytes) -> bytes:
    return hmac.new(secret, b"apifast-admin-" + label + b":" + data, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class AdminSession:
    id: int
    token: bytes
    csrf: str


class SessionCodec:
    """Signs cookies and derives CSRF tokens under the server secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def cookie_value(self, token: bytes) -> str:
        return f"{_b64(token)}.{_b64(_mac(self._secret, b'session', token))}"

    def token_from_cookie(self, value: str | None) -> bytes | None:
        if not value or value.count(".") != 1 or len(value) > 200:
            return None
        token_text, tag_text = value.split(".")
        try:
            token, tag = _unb64(token_text), _unb64(tag_text)
        except ValueError:
            return None
        if len(token) != 32 or not hmac.compare_digest(tag, _mac(self._secret, b"session", token)):
            return None
        return token

    def csrf_for(self, token: bytes) -> str:
        return _b64(_mac(self._secret, b"csrf", token))

    def login_form_token(self, now: float | None = None) -> str:
        """The login form's CSRF token: a signed timestamp (there is no session yet, and the
        panel sets no cookie but the session's)."""
        stamp = str(int(time.time() if now is None else now)).encode()
        return f"{stamp.decode()}.{_b64(_mac(self._secret, b'login', stamp))}"

    def login_form_token_ok(self, value: str, now: float | None = None) -> bool:
        stamp, _, tag = value.partition(".")
        if not stamp.isdigit() or not tag:
            return False
        try:
            good = hmac.compare_digest(_unb64(tag), _mac(self._secret, b"login", stamp.encode()))
        except ValueError:
            return False
        age = (time.time() if now is None else now) - int(stamp)
        return good and -60 <= age <= LOGIN_FORM_TTL_S


def token_hash(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def new_token() -> bytes:
    return secrets.token_bytes(32)


async def create_session(pool: asyncpg.Pool, settings: Settings) -> tuple[int, bytes]:
    token = new_token()
    async with pool.acquire() as conn:
        await conn.execute(Q.admin_sessions_delete_expired, settings.admin_session_idle_s)
        row = await conn.fetchrow(
            Q.admin_session_create, token_hash(token), settings.admin_session_max_s
        )
    assert row is not None
    return int(row["id"]), token


async def live_session(pool: asyncpg.Pool, settings: Settings, token: bytes) -> int | None:
    """The session's id if it is live (and mark it used now), else None."""
    row = await pool.fetchrow(
        Q.admin_session_touch, token_hash(token), settings.admin_session_idle_s
    )
    return None if row is None else int(row["id"])


async def end_session(pool: asyncpg.Pool, token: bytes) -> None:
    await pool.execute(Q.admin_session_delete, token_hash(token))


# --- the cookie ----------------------------------------------------------------------------

_LOOPBACK_NAMES = {"localhost"}


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cookie_is_secure(request: Request, settings: Settings) -> bool:
    """Secure, except when explicitly allowed for plain http to a loopback host."""
    insecure_ok = (
        settings.admin_insecure_cookie
        and request.url.scheme == "http"
        and _is_loopback(request.url.hostname or "")
    )
    return not insecure_ok


def cookie_name(secure: bool) -> str:
    return SECURE_COOKIE if secure else INSECURE_COOKIE


def read_cookie(request: Request) -> str | None:
    return request.cookies.get(SECURE_COOKIE) or request.cookies.get(INSECURE_COOKIE)


def set_cookie(response: Response, request: Request, settings: Settings, value: str) -> None:
    secure = cookie_is_secure(request, settings)
    response.set_cookie(
        cookie_name(secure),
        value,
        max_age=settings.admin_session_max_s,
        path="/",
        secure=secure,
        httponly=True,
        samesite="Strict",  # type: ignore[arg-type]  # the usual spelling; any case is valid
    )


def clear_cookie(response: Response, request: Request, settings: Settings) -> None:
    secure = cookie_is_secure(request, settings)
    response.delete_cookie(
        cookie_name(secure),
        path="/",
        secure=secure,
        httponly=True,
        samesite="Strict",  # type: ignore[arg-type]
    )
