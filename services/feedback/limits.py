"""A token bucket: the dead-letter copies of refused ratings are limited in rate and in bytes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second, at most ``capacity`` saved up (the burst).

    After ``t`` seconds idle the bucket holds ``min(capacity, held + rate * t)``; ``take(n)`` spends
    ``n`` when that many are held (True) and spends nothing otherwise (False). A rate of 0 with a
    capacity of 0 refuses everything. Thread-safe."""

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic):
        if rate < 0 or capacity < 0:
            raise ValueError("rate and capacity must not be negative")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._held = capacity
        self._at = clock()
        self._lock = threading.Lock()

    def take(self, n: float = 1.0) -> bool:
        with self._lock:
            now = self._clock()
            self._held = min(self.capacity, self._held + (now - self._at) * self.rate)
            self._at = now
            if n > self._held:
                return False
            self._held -= n
            return True
