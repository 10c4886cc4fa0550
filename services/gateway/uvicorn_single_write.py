"""uvicorn's httptools protocol with one socket write per response instead of two.

uvicorn writes a response's status line and headers, then its body, each with its own
``transport.write``: two system calls and two TCP segments per response, for the client to read
twice as well. For POST /v1/feedback (a few hundred bytes each way, thousands a second on two cores)
that second write was a tenth of the gateway's CPU. Here the writes made while one task step runs
(``send(start)`` then ``send(body)`` do not yield in between) are joined and written once, at the
end of the loop iteration; streamed responses still go out chunk by chunk, each chunk as it is sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """An asyncio transport whose writes within one loop iteration reach the socket as one write.

    Everything else goes straight to the wrapped transport; ``close`` and ``write_eof`` write what
    is pending first, so nothing written before them is lost.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=CoalescingHttpToolsProtocol)``: httptools with coalesced writes."""

    # Both ignores are deliberate: uvicorn narrows asyncio.Protocol's BaseTransport to Transport (with
    # the same ignore), and CoalescingTransport is a duck-typed proxy of one, not a subclass.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
