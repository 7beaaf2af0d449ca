"""A small JSON-over-HTTP client shared by the built-in processors.

Responses are parsed with exact decimals, so amounts never pass through a float.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from apifast.payments import PaymentError
from apifast.plugins.payments.js_json import loads_exact


class JsonClient:
    def __init__(self, base_url: str, headers: dict[str, str], *, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            # No User-Agent: say nothing about ourselves that the processor does not need.
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, skip_auto_headers=("User-Agent",)
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        """The parsed JSON answer; `PaymentError` for a network error or a non-2xx answer."""
        await self.start()
        assert self._session is not None
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method, self.base_url + path, data=body, params=params, headers=headers
            ) as response:
                raw = await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise PaymentError(f"{method} {path}: {type(exc).__name__}") from exc
        try:
            parsed = loads_exact(raw) if raw else None
        except ValueError:
            parsed = None
        if status >= 400:
            code = ""
            if isinstance(parsed, dict):
                code = str(parsed.get("code") or parsed.get("message") or "")[:200]
            raise PaymentError(f"{method} {path}: HTTP {status} {code}".rstrip(), status=status)
        if parsed is None and raw:
            raise PaymentError(f"{method} {path}: answer is not JSON", status=status)
        return parsed
