"""What a public endpoint needs before auth: bounded headers, requests that must arrive in time,
a bound on open connections. Against a real `ddpm-serve` process on a loopback port."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.server.api.live_server import run_server

READ_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    flags = ("--read-timeout-s", str(READ_TIMEOUT_S), "--max-connections", "4", "--max-header-bytes", "8192")
    with run_server(tiny_weights, tmp_path_factory.mktemp("logs"), *flags) as live:
        yield live


def open_socket(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_connection_that_sends_nothing_gets_408_and_is_closed(server):
    with open_socket(server) as sock:
        began = time.monotonic()
        answer = read_all(sock)
        waited = time.monotonic() - began
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer
    assert READ_TIMEOUT_S - 0.5 < waited < READ_TIMEOUT_S + 2


def test_headers_sent_slowly_get_408_however_long_the_trickle(server):
    with open_socket(server) as sock:
        began = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(20):  # one header every 0.25 s: 5 s in all, if the server let it
                sock.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.25)
        except OSError:
            pass  # the server hung up
        answer = read_all(sock)
        waited = time.monotonic() - began
    assert answer.startswith(b"HTTP/1.1 408 ") and waited < READ_TIMEOUT_S + 2


def test_oversized_headers_are_refused_at_once(server):
    with open_socket(server) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
        except OSError:
            pass
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in answer


def test_a_kept_alive_connection_serves_requests_that_arrive_in_time(server):
    with httpx.Client(base_url=server.url) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            time.sleep(READ_TIMEOUT_S / 4)


def test_connections_beyond_the_limit_get_503(server):
    idle = [open_socket(server) for _ in range(4)]
    try:
        refused = httpx.get(server.url + "/healthz")
    finally:
        for sock in idle:
            sock.close()
    assert refused.status_code == 503
    time.sleep(0.2)  # the server sees the closes
    assert httpx.get(server.url + "/healthz").status_code == 200
