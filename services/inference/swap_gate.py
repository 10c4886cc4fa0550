"""Admission gate that lets a weight swap happen between requests, or bounded, under them.

Every generation holds an admission while it runs. A swap closes the gate (new requests wait),
waits until the requests in flight have finished, or until its drain budget is spent, swaps, and
reopens. With an unbounded drain each completion comes entirely from one policy version, the version
recorded at its admission, and the pause new requests see is the time the slowest request in flight
still needed plus the swap itself (generations are bounded by max_tokens, so the drain always ends).
With a budget the pause is at most the budget plus the swap, and the requests still in flight then
are swapped under (the caller recomputes them on the new weights).
"""

from __future__ import annotations

import asyncio
import math
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
    async def exclusive(self, drain_s: float = math.inf) -> AsyncIterator[bool]:
        """Close the gate (new requests wait) and hold it closed; first wait at most ``drain_s``
        (inf: until done; 0: not at all) for the requests in flight to finish. Yields whether
        nothing is in flight any more (False: the swap happens under running requests)."""
        async with self._swap_lock:
            self._open.clear()
            try:
                if drain_s > 0 and not self._idle.is_set():
                    try:
                        await asyncio.wait_for(self._idle.wait(), None if math.isinf(drain_s) else drain_s)
                    except TimeoutError:
                        pass
                yield self._idle.is_set()
            finally:
                self._open.set()
