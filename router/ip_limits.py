"""Per-client-IP request limits for the unauthenticated endpoints (orders, recovery).

Held in this process's memory only, and not even the IP itself: entries are keyed by an
HMAC of it under a random per-process key, so no IP is stored anywhere. With N router
replicas a client may make N times the limit.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import deque

from starlette.requests import Request

from router.errors import ApiError


class IpRateLimiter:
    def __init__(self, limit: int, window_s: float, *, name: str) -> None:
        self.limit = limit
        self.window_s = window_s
        self.name = name
        self._salt = os.urandom(32)
        self._hits: dict[bytes, deque[float]] = {}
        self._next_prune = 0.0

    def _token(self, ip: str) -> bytes:
        return hmac.new(self._salt, ip.encode(), hashlib.sha256).digest()[:16]

    def check(self, ip: str, now: float | None = None) -> float:
        """0 when the request may go (and counts it); otherwise the seconds to wait."""
        now = time.monotonic() if now is None else now
        if now >= self._next_prune:
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
        self._next_prune = now + self.window_s

    def enforce(self, request: Request) -> None:
        """Raise 429 when the caller's IP is over the limit."""
        ip = request.client.host if request.client else "unknown"
        wait = self.check(ip)
        if wait:
            seconds = max(1, int(wait + 0.999))
            raise ApiError(
                429,
                f"Too many {self.name} requests from this address; retry in {seconds}s.",
                code="rate_limited",
                headers={"Retry-After": str(seconds)},
            )
