"""Per-key request and token rate limits, kept in this process's memory only."""

from __future__ import annotations

import time
from collections import deque

_WINDOW_S = 60.0


class KeyRateLimiter:
    """Sliding one-minute windows of requests and tokens per key id.

    The limits come from the key's row (`rpm_limit`, `tpm_limit`; NULL means none), read by
    the same round trip that reserves its funds. Tokens are those of finished requests in
    the window. This is each router's own window; the same round trip also counts the
    request in Postgres, which holds the limits across routers (docs/billing.md, "Limits").
    """

    def __init__(self, window_s: float = _WINDOW_S) -> None:
        self.window_s = window_s
        self._requests: dict[int, deque[float]] = {}
        self._tokens: dict[int, deque[tuple[float, int]]] = {}
        self._token_sums: dict[int, int] = {}
        self._next_prune = 0.0

    def check_request(self, key_id: int, rpm: int | None, now: float | None = None) -> float:
        """0 when the request may go (and counts it); otherwise the seconds to wait."""
        if not rpm:
            return 0.0
        now = self._now(now)
        window = self._requests.setdefault(key_id, deque())
        while window and window[0] <= now - self.window_s:
            window.popleft()
        if len(window) >= rpm:
            return max(0.001, window[0] + self.window_s - now)
        window.append(now)
        return 0.0

    def check_tokens(self, key_id: int, tpm: int | None, now: float | None = None) -> float:
        """0 when the key used fewer than `tpm` tokens in the window; else the seconds until
        enough of them leave it."""
        if not tpm:
            return 0.0
        now = self._now(now)
        window = self._tokens.get(key_id)
        if not window:
            return 0.0
        used = self._expire_tokens(key_id, window, now)
        if used < tpm:
            return 0.0
        # Wait until the window drops below the limit.
        for stamp, tokens in window:
            used -= tokens
            if used < tpm:
                return max(0.001, stamp + self.window_s - now)
        return 0.001  # unreachable: the loop empties `used`

    def record_tokens(self, key_id: int, tokens: int, now: float | None = None) -> None:
        if tokens > 0:
            now = self._now(now)
            self._tokens.setdefault(key_id, deque()).append((now, tokens))
            self._token_sums[key_id] = self._token_sums.get(key_id, 0) + tokens

    def _expire_tokens(self, key_id: int, window: deque[tuple[float, int]], now: float) -> int:
        used = self._token_sums.get(key_id, 0)
        while window and window[0][0] <= now - self.window_s:
            used -= window.popleft()[1]
        self._token_sums[key_id] = used
        return used

    def _now(self, now: float | None) -> float:
        now = time.monotonic() if now is None else now
        if now >= self._next_prune:
            self._prune(now)
        return now

    def _prune(self, now: float) -> None:
        # Forget idle keys, so memory follows the keys active in the last window.
        cutoff = now - self.window_s
        for key_id in [k for k, w in self._requests.items() if not w or w[-1] <= cutoff]:
            del self._requests[key_id]
        for key_id in [k for k, w in self._tokens.items() if not w or w[-1][0] <= cutoff]:
            del self._tokens[key_id]
            self._token_sums.pop(key_id, None)
        self._next_prune = now + self.window_s
