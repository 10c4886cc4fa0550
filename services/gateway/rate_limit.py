"""Per-principal rate limits: one token bucket per principal, in a bounded LRU map.

A bucket holds up to ``burst`` tokens and gains ``rate_per_min / 60`` tokens a second; a request
takes one token, or is refused (HTTP 429) with the seconds until one is there (Retry-After). The
map keeps the ``max_principals`` most recently seen principals; a principal pushed out starts again
with a full bucket, which a principal sending steadily never is (it is always recent).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from services.gateway import metrics


def refill(tokens: float, elapsed_s: float, rate_per_s: float, burst: float) -> float:
    """Tokens after ``elapsed_s`` seconds: min(burst, tokens + elapsed_s * rate_per_s)."""
    return min(burst, tokens + max(0.0, elapsed_s) * rate_per_s)


def wait_for_token(tokens: float, rate_per_s: float) -> float:
    """Seconds until a bucket holding ``tokens`` (< 1) holds one: (1 - tokens) / rate_per_s."""
    return max(0.0, 1.0 - tokens) / rate_per_s


def retry_after_header(wait_s: float) -> str:
    """Retry-After in whole seconds, rounded up and at least 1: ceil(wait_s), min 1."""
    return str(max(1, math.ceil(wait_s)))


class TokenBuckets:
    """The buckets of one limit (``name``: "chat", "feedback"), one per principal."""

    def __init__(self, name: str, rate_per_min: float, burst: int, max_principals: int):
        self.name = name
        self.rate_per_s = rate_per_min / 60.0
        self.burst = float(burst)
        self.max_principals = max_principals
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # principal -> [tokens, at]
        self._allowed = metrics.RATE_LIMIT.labels(name, "allowed")
        self._refused = metrics.RATE_LIMIT.labels(name, "refused")
        self._evicted = metrics.RATE_LIMIT_EVICTIONS.labels(name)
        self._size = metrics.RATE_LIMIT_PRINCIPALS.labels(name)

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, principal: str, now: float | None = None) -> float:
        """Take a token for ``principal``: 0.0 when it had one, else the seconds to wait (refused)."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(principal)
        if bucket is None:
            bucket = self._buckets[principal] = [self.burst, now]
            if len(self._buckets) > self.max_principals:
                self._buckets.popitem(last=False)
                self._evicted.inc()
            self._size.set(len(self._buckets))
        else:
            self._buckets.move_to_end(principal)
            bucket[0] = refill(bucket[0], now - bucket[1], self.rate_per_s, self.burst)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            self._allowed.inc()
            return 0.0
        self._refused.inc()
        return wait_for_token(bucket[0], self.rate_per_s)
