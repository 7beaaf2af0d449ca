"""Helpers for the admin panel's tests: set the password, and an HTTP client that logs in
and posts forms the way a browser does (the session cookie is Secure, so it is sent by hand
over the tests' plain-http loopback connection)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from http.cookies import SimpleCookie
from typing import Any

import httpx
import pytest
from aiohttp import web

from apifast.admin.passwords import hash_password
from apifast.db import Queries
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import Stack, models_toml, running_stack

ADMIN_PASSWORD = "correct horse battery staple"
Q = Queries("apifast.admin")
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_LOGIN_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')


async def set_admin_password(stack: Stack, password: str = ADMIN_PASSWORD) -> None:
    hashed = await asyncio.to_thread(hash_password, password)
    await stack.pool.execute(Q.admin_password_set, hashed)


def session_cookie(response: httpx.Response) -> tuple[str, str, Any]:
    """(name, value, morsel) of the one Set-Cookie in `response`."""
    headers = response.headers.get_list("set-cookie")
    assert len(headers) == 1, headers
    jar: SimpleCookie = SimpleCookie()
    jar.load(headers[0])
    ((name, morsel),) = jar.items()
    return name, morsel.value, morsel


class AdminClient:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.http = httpx.AsyncClient(base_url=stack.base_url, timeout=30, follow_redirects=False)
        self.cookie: str | None = None  # "name=value"

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    def _headers(self) -> dict[str, str]:
        return {"Cookie": self.cookie} if self.cookie else {}

    async def login_token(self) -> str:
        page = await self.http.get("/admin/login")
        match = _LOGIN_TOKEN.search(page.text)
        assert match, page.text
        return match.group(1)

    async def try_login(self, password: str) -> httpx.Response:
        token = await self.login_token()
        return await self.http.post(
            "/admin/login", data={"password": password, "login_token": token, "next": "/admin/"}
        )

    async def login(self, password: str = ADMIN_PASSWORD) -> httpx.Response:
        response = await self.try_login(password)
        assert response.status_code == 303, response.text
        name, value, _ = session_cookie(response)
        self.cookie = f"{name}={value}"
        return response

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.http.get(path, headers=self._headers(), **kw)

    async def csrf(self, page: str = "/admin/models") -> str:
        match = _CSRF.search((await self.get(page)).text)
        assert match, "no CSRF token on " + page
        return match.group(1)

    async def post(self, path: str, data: dict[str, Any], *, csrf: bool = True) -> httpx.Response:
        body = dict(data)
        if csrf:
            body["csrf"] = await self.csrf()
        return await self.http.post(path, data=body, headers=self._headers())


class GuardedFakeOpenAI(FakeOpenAI):
    """The fake upstream, with GET /models refusing a wrong key as OpenAI's does."""

    async def _models(self, request: web.Request) -> web.Response:
        return self._auth_failed(request) or await super()._models(request)


@pytest.fixture
async def admin_stack(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> AsyncIterator[Stack]:
    settings = stack_settings_factory(models_toml(fake_openai.url), catalog_poll_s=0.5)
    async with running_stack(settings) as running:
        await set_admin_password(running)
        yield running


@pytest.fixture
async def admin(admin_stack: Stack) -> AsyncIterator[AdminClient]:
    async with AdminClient(admin_stack) as client:
        await client.login()
        yield client


def model_form(model_id: str = "fast-chat", **overrides: str) -> dict[str, str]:
    form = {
        "id": model_id, "type": "chat", "description": "", "input_usd_per_mtok": "0.50",
        "output_usd_per_mtok": "1.50", "cached_input_usd_per_mtok": "",
        "cache_write_usd_per_mtok": "", "request_usd": "", "max_output_tokens": "",
        "context_window": "", "routes": "local upstream-model-a", "enabled": "on", "is_new": "0",
    }  # fmt: skip
    form.update(overrides)
    return form
