"""Idle keep-alive connections: the server keeps them longer than a proxy would.

A client or proxy that reuses a keep-alive connection the server has just closed gets no
answer at all (the request is written, the socket then reads end-of-file). uvicorn closes
idle connections after 5 s by default; a load generator with a pool of connections lost
a few requests per run to it, and a proxy in front would answer 502."""

from __future__ import annotations

import socket
import time

from server.launcher import ServerProcess
from tests.server.live import LiveServer


def _get(connection: socket.socket, path: str) -> bytes:
    """One HTTP/1.1 GET on an open connection; the answer's head and body (b'' when the
    server closed the connection instead of answering)."""
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = connection.recv(65536)
        if not chunk:
            return answer
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def test_an_idle_connection_outlives_uvicorns_default_keep_alive(server: LiveServer):
    with _connect(server) as connection:
        assert _get(connection, "/healthz").startswith(b"HTTP/1.1 200")
        time.sleep(6.5)  # uvicorn's default closes the connection after 5 s
        assert _get(connection, "/healthz").startswith(b"HTTP/1.1 200")


def test_the_keep_alive_setting_closes_idle_connections(tmp_path):
    short = ServerProcess(tmp_path, keep_alive_s=1, default_tasks=False).start()
    try:
        with _connect(short) as connection:
            assert _get(connection, "/healthz").startswith(b"HTTP/1.1 200")
            time.sleep(0.2)
            assert _get(connection, "/healthz").startswith(b"HTTP/1.1 200")
            time.sleep(2.5)
            assert connection.recv(1) == b""  # the server closed it
    finally:
        short.stop()
