"""Admission gate that lets a weight swap happen between requests, never inside one.

Every generation holds an admission while it runs. A swap closes the gate (new requests wait),
waits until the requests in flight have finished, swaps, and reopens. So each completion comes
entirely from one policy version, the version recorded at its admission. The pause new requests
see is the time the slowest request in flight still needed plus the swap itself; generations are
bounded by max_tokens, so the drain always ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class SwapGate:
    def __init__(self) -> None:
        self._in_flight = 0
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._swap_lock = asyncio.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def swapping(self) -> bool:
        return not self._open.is_set()

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold an admission for one request; waits while a swap is under way."""
        while not self._open.is_set():
            await self._open.wait()
        # No await between the check and the increment: a swap cannot slip in between.
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait, without closing the gate, until no request is in flight; False after ``timeout_s``
        with requests still running (a rolling swap drains this way while its replica reports
        NOT_SERVING, so that the few requests still arriving are admitted, not held)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @asynccontextmanager
    async def exclusive(self, drain: bool = True) -> AsyncIterator[None]:
        """Close the gate (new requests wait) and hold it closed; with ``drain``, first wait for
        the requests in flight to finish."""
        async with self._swap_lock:
            self._open.clear()
            try:
                if drain:
                    await self._idle.wait()
                yield
            finally:
                self._open.set()
