"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for reading each request and a bound on
its headers.

uvicorn bounds idle keep-alive connections, but not a client that sends its headers or body
slowly (slowloris), nor a new connection that sends nothing: each holds a connection for as
long as it likes. Here a request must arrive whole, headers and body, within `read_timeout_s`
of the connection opening or of the previous response; otherwise the client gets 408 and the
connection closes. Headers over `max_header_bytes` get 431 at once (h11's own bound only
applies to headers that arrive in pieces). WebSocket upgrades leave this protocol at once.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

def error_response(status: bytes, code: str, message: str) -> bytes:
    """A whole HTTP response, written as bytes: h11 cannot answer a request it has not parsed."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args, read_timeout_s: float, max_header_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s
        self.max_header_bytes = max_header_bytes
        self.header_bytes = 0  # of the request whose headers are still arriving
        self.read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # still in the request line and headers
            end = data.find(b"\r\n\r\n")
            self.header_bytes += len(data) if end < 0 else end
            if self.header_bytes > self.max_header_bytes:
                message = f"request headers over {self.max_header_bytes} bytes"
                return self.hang_up(error_response(b"431 Request Header Fields Too Large", "headers_too_large", message))
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self.header_bytes = 0
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            self.disarm()  # the request has arrived whole: the app may now take its time

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self.disarm()
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.arm()  # the next request on this connection has the same time to arrive

    def arm(self) -> None:
        self.disarm()
        self.read_deadline = self.loop.call_later(self.read_timeout_s, self.expire)

    def disarm(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def expire(self) -> None:
        self.read_deadline = None
        self.hang_up(error_response(b"408 Request Timeout", "request_timeout",
                                    f"the request did not arrive within {self.read_timeout_s:g}s"))

    def hang_up(self, response: bytes) -> None:
        """Close the connection; with `response` first if nothing was sent on this request yet."""
        self.disarm()
        if self.transport.is_closing():
            return
        if self.conn.our_state is h11.IDLE:
            self.transport.write(response)
        self.transport.close()
