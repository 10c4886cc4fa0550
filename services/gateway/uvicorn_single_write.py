"""uvicorn's httptools protocol with one socket write per response instead of two, and bounds on
the request head.

uvicorn writes a response's status line and headers, then its body, each with its own
``transport.write``: two system calls and two TCP segments per response, for the client to read
twice as well. For POST /v1/feedback (a few hundred bytes each way, thousands a second on two cores)
that second write was a tenth of the gateway's CPU. Here the writes made while one task step runs
(``send(start)`` then ``send(body)`` do not yield in between) are joined and written once, at the
end of the loop iteration; streamed responses still go out chunk by chunk, each chunk as it is sent.

uvicorn bounds neither the time a client may take to send a request head (a connection that sends
nothing, or a header a byte a minute, is held forever: its keep-alive timer only runs between
requests) nor, with httptools, the head's size. ``guarded_protocol`` adds both: a head not complete
``header_timeout_s`` after the connection opened (or after the first byte of a later request on it)
closes the connection; a head (request line and headers) over ``max_header_bytes`` is answered 431
and the connection closed. The body's own timeout and size limit are the app's (middleware.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.gateway import metrics


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


class GuardedHttpToolsProtocol(CoalescingHttpToolsProtocol):
    """CoalescingHttpToolsProtocol with a time and a size bound on each request head (see the module
    docstring); made with the bounds by ``guarded_protocol``.

    A complete head is measured exactly (request target and headers) before the app sees it. An
    incomplete one is measured by the bytes received since it began (httptools holds a header until
    it is complete, so waiting for complete headers would let one endless header grow without
    bound). Past the limit either way: 431, and the connection is closed.
    """

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._in_head = True
        self._head_bytes = 0
        self._head_too_large = False
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            metrics.REFUSED_CONNECTIONS.labels("header_timeout").inc()
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # A head still incomplete after all these bytes (one that completes is measured exactly in
        # on_headers_complete: these bytes may include its body).
        if self._in_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._head_too_large = True
            self.send_400_response("")

    def on_message_begin(self) -> None:
        self._in_head = True  # a later request on a kept-alive connection: its own bounds
        self._arm_head_timer()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm_head_timer()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_header_bytes:
            self._head_too_large = True
            raise ValueError("request head too large")  # httptools stops; uvicorn calls send_400_response
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._head_too_large:
            return super().send_400_response(msg)
        metrics.REFUSED_CONNECTIONS.labels("header_too_large").inc()
        body = f"the request head is larger than {self.max_header_bytes} bytes".encode()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
            + b"content-length: "
            + str(len(body)).encode()
            + b"\r\nconnection: close\r\n\r\n"
            + body
        )
        self.transport.close()


def guarded_protocol(header_timeout_s: float, max_header_bytes: int) -> type[GuardedHttpToolsProtocol]:
    """``uvicorn.Config(http=guarded_protocol(...))``: the gateway's protocol with these head bounds."""
    return type(
        "GatewayHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes},
    )
