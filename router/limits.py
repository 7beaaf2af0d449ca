"""Per-key request and token rate limits, kept in this process's memory only."""

from __future__ import annotations

import time
from collections import deque

_WINDOW_S = 60.0
_PARENT_KEEP_S = 3600.0  # longer than a request runs (its hold lives 900 s by default)


class KeyRateLimiter:
    """Sliding one-minute windows of requests and tokens per key id.

    The limits come from the key's row (`rpm_limit`, `tpm_limit`; NULL means none), read by
    the same round trip that reserves its funds. Tokens are those of finished requests in
    the window. This is each router's own window; the same round trip also counts the
    request in Postgres, which holds the limits across routers (docs/billing.md, "Limits").

    A sub-key's requests and tokens count in its parent's window too (`check_sub_key_request`):
    the parent's limits are the total of the key and its sub-keys.
    """

    def __init__(self, window_s: float = _WINDOW_S) -> None:
        self.window_s = window_s
        self._requests: dict[int, deque[float]] = {}
        self._tokens: dict[int, deque[tuple[float, int]]] = {}
        self._token_sums: dict[int, int] = {}
        # sub-key id -> (parent id, last request): where its finished tokens count too.
        self._parents: dict[int, tuple[int, float]] = {}
        self._next_prune = 0.0

    def check_request(self, key_id: int, rpm: int | None, now: float | None = None) -> float:
        """0 when the request may go (and counts it); otherwise the seconds to wait."""
        if not rpm:
            return 0.0
        now = self._now(now)
        wait = self._request_wait(key_id, rpm, now)
        if not wait:
            self._requests[key_id].append(now)
        return wait

    def check_sub_key_request(
        self,
        key_id: int,
        rpm: int | None,
        parent_id: int,
        parent_rpm: int | None,
        now: float | None = None,
    ) -> float:
        """`check_request` for a sub-key: it goes only when both its own window (`rpm`) and
        its parent's (`parent_rpm`, the family's total) have room, and then counts in both.
        Its finished tokens count toward the parent's window too (`record_tokens`)."""
        now = self._now(now)
        self._parents[key_id] = (parent_id, now)
        wait = self._request_wait(key_id, rpm, now) or self._request_wait(
            parent_id, parent_rpm, now
        )
        if not wait:
            for limited, limit in ((key_id, rpm), (parent_id, parent_rpm)):
                if limit:
                    self._requests[limited].append(now)
        return wait

    def _request_wait(self, key_id: int, rpm: int | None, now: float) -> float:
        """The seconds until the key's window has room for one more request (0: now)."""
        if not rpm:
            return 0.0
        window = self._requests.setdefault(key_id, deque())
        while window and window[0] <= now - self.window_s:
            window.popleft()
        if len(window) >= rpm:
            return max(0.001, window[0] + self.window_s - now)
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
        """Count a finished request's tokens: toward its key, and a sub-key's toward its
        parent too."""
        if tokens > 0:
            now = self._now(now)
            parent = self._parents.get(key_id)
            for counted in (key_id,) if parent is None else (key_id, parent[0]):
                self._tokens.setdefault(counted, deque()).append((now, tokens))
                self._token_sums[counted] = self._token_sums.get(counted, 0) + tokens

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
        # A sub-key's parent is kept longer than a window: a long stream's tokens come when
        # it finishes, minutes after its request was counted.
        parents_cutoff = now - _PARENT_KEEP_S
        for key_id in [k for k, (_, seen) in self._parents.items() if seen <= parents_cutoff]:
            del self._parents[key_id]
        self._next_prune = now + self.window_s
