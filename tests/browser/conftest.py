"""Browser fixtures: Playwright for Python driving Debian's Chromium (/usr/bin/chromium).

Playwright's own browser download cannot work here and is never used (`playwright install`
is not run). Without /usr/bin/chromium these tests skip, saying so; CI installs it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def chromium_path() -> Path:
    if not CHROMIUM.exists():
        pytest.skip("Debian's Chromium is not installed: apt-get install -y chromium")
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium_path: Path) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def context(browser: Any) -> AsyncIterator[Any]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(20_000)
    try:
        yield ctx
    finally:
        await ctx.close()


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    """docs/img when APIFAST_SCREENSHOTS=1 (to refresh the README's pictures), else a temp dir."""
    if os.environ.get("APIFAST_SCREENSHOTS") == "1":
        target = Path(__file__).resolve().parents[2] / "docs" / "img"
        target.mkdir(parents=True, exist_ok=True)
        return target
    return tmp_path
