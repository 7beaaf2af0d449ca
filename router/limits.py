"""Per-key request and token rate limits, kept in this process's memory only."""

from __future__ import annotations

import time
from collections import deque


class KeyRateLimiter:
    """Sliding one-minute windows of requests and tokens per key id.

    Limits are per router process; with N replicas a key may reach N times its limit.
    """

    def __init__(self) -> None:
        self._requests: dict[int, deque[float]] = {}
        self._tokens: dict[int, deque[tuple[float, int]]] = {}

    def check_request(self, key_id: int, rpm: int | None, now: float | None = None) -> float:
        """0 when the request may go; otherwise the seconds to wait (Retry-After)."""
        if not rpm:
            return 0.0
        now = time.monotonic() if now is None else now
        window = self._requests.setdefault(key_id, deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) >= rpm:
            return max(0.001, window[0] + 60 - now)
        window.append(now)
        return 0.0

    def check_tokens(self, key_id: int, tpm: int | None, now: float | None = None) -> float:
        if not tpm:
            return 0.0
        now = time.monotonic() if now is None else now
        window = self._tokens.setdefault(key_id, deque())
        while window and window[0][0] <= now - 60:
            window.popleft()
        used = sum(n for _, n in window)
        if used >= tpm:
            return max(0.001, window[0][0] + 60 - now)
        return 0.0

    def record_tokens(self, key_id: int, tokens: int, now: float | None = None) -> None:
        if tokens > 0:
            now = time.monotonic() if now is None else now
            self._tokens.setdefault(key_id, deque()).append((now, tokens))
