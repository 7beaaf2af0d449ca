"""The admin panel and the key holder's dashboard in a real browser (Chromium via Playwright):
login, the session cookie's flags, CSRF, a price edit priced on the next request, and the
dashboard showing a request made through the openai SDK. Also takes the README's screenshots
(set APIFAST_SCREENSHOTS=1 to write them to docs/img)."""

from __future__ import annotations

import random
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai

from apifast.keys import hash_key
from tests.admin_support import ADMIN_PASSWORD, admin_stack
from tests.harness import SECRET, Stack

__all__ = ["admin_stack"]


def sdk(stack: Stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=stack.base_url + "/v1", max_retries=0)


async def login(page: Any, stack: Stack, password: str = ADMIN_PASSWORD) -> Any:
    await page.goto(stack.base_url + "/admin/")
    await page.fill("#password", password)
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    return page


async def test_login_and_wrong_password(admin_stack: Stack, context: Any):
    page = await context.new_page()
    await page.goto(admin_stack.base_url + "/admin/models")
    assert page.url.endswith("/admin/login?next=/admin/models")
    await page.fill("#password", "definitely not it")
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    assert await page.text_content("[role=alert]") == "Login failed."
    assert await context.cookies() == []
    await page.fill("#password", ADMIN_PASSWORD)
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    assert page.url == admin_stack.base_url + "/admin/models"
    assert await page.text_content("h1") == "Models"
    # Logging out ends it: the panel asks for the password again.
    async with page.expect_navigation():
        await page.click("text=Log out")
    assert page.url.endswith("/admin/login")
    await page.goto(admin_stack.base_url + "/admin/")
    assert "/admin/login" in page.url


async def test_session_cookie_flags(admin_stack: Stack, context: Any):
    page = await login(await context.new_page(), admin_stack)
    assert page.url == admin_stack.base_url + "/admin/"
    cookies = await context.cookies()
    assert len(cookies) == 1, cookies
    (cookie,) = cookies
    assert cookie["name"] == "__Host-apifast_admin"
    assert cookie["httpOnly"] is True
    assert cookie["secure"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/"
    # HttpOnly: page scripts cannot read it.
    assert await page.evaluate("document.cookie") == ""


async def test_form_post_without_csrf_token_is_rejected(admin_stack: Stack, context: Any):
    page = await login(await context.new_page(), admin_stack)
    await page.goto(admin_stack.base_url + "/admin/models/edit?id=fast-chat")
    await page.fill("#input_usd_per_mtok", "9.99")
    await page.evaluate("document.querySelector('#model-form input[name=csrf]').remove()")
    async with page.expect_navigation():
        await page.click("#model-form button[type=submit]")
    assert await page.text_content("h1") == "Forbidden"
    assert "CSRF" in (await page.text_content(".flash.error") or "")
    price = admin_stack.state.catalog.models["fast-chat"].price
    assert price.input_usd_per_mtok == Decimal("0.50")


async def test_price_edit_prices_the_next_request(admin_stack: Stack, context: Any):
    stack = admin_stack
    key = await stack.create_key("5.00")
    page = await login(await context.new_page(), stack)
    await page.goto(stack.base_url + "/admin/models")
    async with page.expect_navigation():
        await page.click("#model-fast-chat >> text=Edit")
    await page.fill("#input_usd_per_mtok", "2.75")
    await page.fill("#output_usd_per_mtok", "11.125")
    async with page.expect_navigation():
        await page.click("#model-form button[type=submit]")
    assert "saved=fast-chat" in page.url
    assert await page.text_content("#model-fast-chat .price-input") == "2.75"

    raw = await sdk(stack, key).chat.completions.with_raw_response.create(
        model="fast-chat", messages=[{"role": "user", "content": "what does this cost?"}]
    )
    usage = raw.http_response.json(parse_float=Decimal)["usage"]
    expected = (usage["prompt_tokens"] * Decimal("2.75")
                + usage["completion_tokens"] * Decimal("11.125")) / Decimal(1_000_000)  # fmt: skip
    assert usage["cost"] == expected
    await stack.wait_metered([raw.parse().id])
    async with stack.client(key) as c:
        assert Decimal((await c.get("/v1/key")).json()["spent_usd"]) == expected


async def _history(stack: Stack, key: str, days: int, per_day: int) -> None:
    """Past usage for the screenshots, written as the meter writes it (rollups included)."""
    rng = random.Random(7)
    now_ms = int(time.time() * 1000)
    key_hash = hash_key(SECRET.encode(), key).hex()
    events = []
    for d in range(1, days):
        for i in range(rng.randint(per_day // 2, per_day)):
            model, provider, inp, out = rng.choice([
                ("fast-chat", "local", "0.50", "1.50"), ("smart-chat", "local", "3.00", "15.00"),
                ("embed-small", "local", "0.02", "0")])  # fmt: skip
            tin, tout = (
                rng.randint(200, 3000),
                0 if model == "embed-small" else rng.randint(50, 900),
            )
            cost = (tin * Decimal(inp) + tout * Decimal(out)) / 1_000_000
            events.append({
                "generation_id": f"gen-demo{d:03d}{i:04d}", "key_hash": key_hash, "model": model,
                "provider": provider, "input_tokens": tin, "output_tokens": tout,
                "cost_usd": str(cost), "upstream_cost_usd": str(cost * Decimal("0.7")),
                "latency_ms": rng.randint(150, 2500), "status": 502 if rng.random() < 0.02 else 200,
                "ts": now_ms - d * 86_400_000 - rng.randint(0, 80_000_000),
            })  # fmt: skip
    await stack.state.clickhouse.insert_new_events(events)


async def test_dashboard_shows_a_request_made_with_the_sdk(
    admin_stack: Stack, context: Any, screenshot_dir: Path
):
    stack = admin_stack
    key = await stack.create_key("10.00")
    await _history(stack, key, days=21, per_day=12)
    resp = await sdk(stack, key).chat.completions.create(
        model="fast-chat", messages=[{"role": "user", "content": "Hello from the openai SDK"}]
    )
    await stack.wait_metered([resp.id])
    requests: list[str] = []
    errors: list[str] = []
    page = await context.new_page()
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    await page.goto(stack.base_url + "/dashboard")
    await page.fill("#key", key)
    await page.click("#login button[type=submit]")
    await page.wait_for_selector(f"#generations td:text-is('{resp.id}')")
    row = page.locator("#generations tr", has_text=resp.id)
    assert "fast-chat" in await row.inner_text()
    assert await page.text_content("#balance") != "–"
    assert await page.locator("#chart-daily svg.chart-svg rect").count() > 0
    assert await page.locator("#chart-models svg.chart-svg rect").count() > 0
    # The key is kept for the tab in sessionStorage, never in a cookie or localStorage.
    assert await context.cookies() == []
    assert await page.evaluate("sessionStorage.getItem('apifast.key')") == key
    assert await page.evaluate("localStorage.length") == 0
    # Nothing but this server was asked for anything.
    assert requests and all(u.startswith(stack.base_url + "/") for u in requests), requests
    assert errors == []  # a CSP violation would be reported here
    await page.screenshot(path=str(screenshot_dir / "dashboard.png"), full_page=True)
    # Forgetting the key clears it.
    await page.click("#forget")
    assert await page.evaluate("sessionStorage.getItem('apifast.key')") is None
    assert await page.is_visible("#login")


async def test_dashboard_shows_the_sub_keys_and_their_spend(admin_stack: Stack, context: Any):
    stack = admin_stack
    parent = await stack.create_key("10.00")
    async with stack.client(parent) as c:
        made = await c.post("/v1/keys", json={"label": "nightly job", "daily_cap_usd": "2.00"})
    assert made.status_code == 201, made.text
    resp = await sdk(stack, made.json()["key"]).chat.completions.create(
        model="fast-chat", messages=[{"role": "user", "content": "Hello from a sub-key"}]
    )
    await stack.wait_metered([resp.id])
    async with stack.client(parent) as c:
        spent = (await c.get("/v1/keys")).json()["data"][0]["usage"]["spent_usd"]
    errors: list[str] = []
    page = await context.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    await page.goto(stack.base_url + "/dashboard")
    await page.fill("#key", parent)
    await page.click("#login button[type=submit]")
    await page.wait_for_selector("#sub-keys td:text-is('nightly job')")
    row = await page.locator("#sub-keys tr", has_text="nightly job").inner_text()
    assert made.json()["id"] in row and f"${spent}" in row and "$2.00" in row
    assert errors == []
    # The sub-key itself sees its own caps and spend, and no sub-keys table.
    await page.click("#forget")
    await page.fill("#key", made.json()["key"])
    await page.click("#login button[type=submit]")
    await page.wait_for_selector("#sub-key-note", state="visible")
    assert await page.text_content("#spent") == f"${spent}"
    assert not await page.is_visible("#children")
    assert errors == []


async def test_admin_overview_charts(admin_stack: Stack, context: Any, screenshot_dir: Path):
    stack = admin_stack
    keys = [await stack.create_key("20.00") for _ in range(4)]
    for n, key in enumerate(keys):
        await _history(stack, key, days=7, per_day=30 + 20 * n)
    await stack.pool.execute(
        "INSERT INTO ledger (key_id, kind, ref, amount_usd, created_at) "
        "SELECT id, 'payment', 'demo-' || id || '-' || g, 10 * g, now() - g * interval '19 hours' "
        "FROM api_keys, generate_series(1, 8) AS g"
    )
    ids = []
    for key in keys:
        resp = await sdk(stack, key).chat.completions.create(
            model="fast-chat", messages=[{"role": "user", "content": "hi"}]
        )
        ids.append(resp.id)
    await stack.wait_metered(ids)
    errors: list[str] = []
    page = await context.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    await login(page, stack)
    await page.goto(stack.base_url + "/admin/?range=7d")
    for chart in ("requests", "revenue", "spend", "active_keys", "error_rate", "latency_models",
                  "latency_providers"):  # fmt: skip
        assert await page.locator(f'[data-chart="{chart}"] svg.chart-svg').count() == 1, chart
    assert int(await page.text_content("#stat-requests") or 0) > len(ids)
    assert errors == []  # a CSP violation would be reported here
    await page.screenshot(path=str(screenshot_dir / "admin.png"), full_page=True)
