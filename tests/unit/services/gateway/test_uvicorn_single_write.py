"""CoalescingHttpToolsProtocol on a real uvicorn server over loopback, read with raw sockets: one
write per plain response, and nothing is lost or reordered on keep-alive,
streamed and closing responses."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from services.gateway.uvicorn_single_write import CoalescingHttpToolsProtocol
from tests.conftest import free_port, wait_until


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": f"chunk-{i};".encode(), "more_body": True})
            await asyncio.sleep(0.05)  # yields: each chunk goes out on its own
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    body = f"hello {scope['path']}".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server():
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            http=CoalescingHttpToolsProtocol,
            lifespan="off",
        )
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, 30, "uvicorn did not start")
    yield port
    srv.should_exit = True
    thread.join(10)


def read_response(sock: socket.socket) -> tuple[bytes, int]:
    """One complete Content-Length response, and how many recv calls it took."""
    data, reads = b"", 0
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data, reads = data + chunk, reads + 1
    return data, reads


def content_length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]) if b"content-length: " in head else 0


def writes_so_far() -> int:
    """Write system calls of this process (the server's; the client's send() calls are not counted)."""
    with open("/proc/self/io") as io:
        for line in io:
            if line.startswith("syscw"):
                return int(line.split()[1])
    raise AssertionError("no syscw in /proc/self/io")


def test_one_write_per_response_on_a_keep_alive_connection(server):
    # uvicorn's own httptools protocol makes 2 writes per response here (measured: 2.0).
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        before = writes_so_far()
        for i in range(40):
            sock.sendall(f"GET /r{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data, _ = read_response(sock)
            assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(f"hello /r{i}".encode())
        assert (writes_so_far() - before) / 40 < 1.5


def test_pipelined_requests_are_answered_in_order(server):
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        sock.sendall(b"".join(f"GET /p{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5)))
        data = b""
        deadline = time.monotonic() + 5
        while data.count(b"hello /p") < 5 and time.monotonic() < deadline:
            data += sock.recv(65536)
        assert [int(part.split(b"hello /p", 1)[1][:1]) for part in data.split(b"HTTP/1.1 200")[1:]] == list(range(5))


def test_streamed_chunks_all_arrive(server):
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        assert b"transfer-encoding: chunked" in data.lower()
        assert [c for c in (b"chunk-0;", b"chunk-1;", b"chunk-2;") if c in data] == [
            b"chunk-0;",
            b"chunk-1;",
            b"chunk-2;",
        ]


def test_response_before_close_is_not_lost(server):
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        sock.sendall(b"GET /bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):  # until the server closes
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"hello /bye")


def test_malformed_request_gets_its_400_before_the_close(server):
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 400")
