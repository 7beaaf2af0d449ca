"""Per-client-IP request limits for the unauthenticated endpoints (orders, recovery, admin
login).

Held in this process's memory only, and not even the IP itself: entries are keyed by an
HMAC of it under a random per-process key, so no IP is stored anywhere, and entries idle for
a whole window are forgotten. With N router replicas a client may make N times the limit.

    limiter = IpRateLimiter(10)            # 10 requests per minute per IP
    wait = limiter.check(ip)               # 0.0: allowed (and counted); else seconds to wait
    limiter.enforce(request)               # or: raise a 429 with Retry-After
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections import deque

from starlette.requests import Request

from apifast.errors import ApiError


class IpRateLimiter:
    def __init__(
        self,
        limit: int,
        window_s: float = 60.0,
        *,
        name: str = "",
        max_entries: int = 100_000,
    ) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("limit must be >= 1 and window_s > 0")
        self.limit = limit
        self.window_s = window_s
        self.name = name
        self.max_entries = max_entries
        self._salt = os.urandom(32)
        self._hits: dict[bytes, deque[float]] = {}
        self._next_prune = 0.0

    def _token(self, ip: str) -> bytes:
        return hmac.new(self._salt, ip.encode(), hashlib.sha256).digest()[:16]

    def check(self, ip: str, now: float | None = None) -> float:
        """0 when the request may go (and counts it); otherwise the seconds to wait."""
        now = time.monotonic() if now is None else now
        if now >= self._next_prune or len(self._hits) >= self.max_entries:
            self._prune(now)
        hits = self._hits.setdefault(self._token(ip), deque())
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        if len(hits) >= self.limit:
            return max(0.001, hits[0] + self.window_s - now)
        hits.append(now)
        return 0.0

    def _prune(self, now: float) -> None:
        cutoff = now - self.window_s
        for token in [t for t, hits in self._hits.items() if not hits or hits[-1] <= cutoff]:
            del self._hits[token]
        if len(self._hits) >= self.max_entries:
            # Flooded from very many addresses: forget the least recently seen half rather
            # than grow without bound.
            by_last = sorted(self._hits, key=lambda t: self._hits[t][-1])
            for token in by_last[: len(by_last) // 2 + 1]:
                del self._hits[token]
        self._next_prune = now + self.window_s

    def enforce(self, request: Request) -> None:
        """Raise a 429 in OpenAI's error shape, with Retry-After, when the IP is over."""
        ip = request.client.host if request.client else "unknown"
        wait = self.check(ip)
        if wait:
            raise rate_limited(wait, f"Too many {self.name + ' ' if self.name else ''}requests "
                               "from this address")  # fmt: skip


def rate_limited(wait_s: float, what: str) -> ApiError:
    """The 429 every limiter answers with: whole seconds in Retry-After, never 0."""
    seconds = max(1, math.ceil(wait_s))
    return ApiError(
        429,
        f"{what}; retry in {seconds}s.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(seconds)},
    )
