"""uvicorn's httptools protocol with a bound on the request line and headers, enforced while parsing,
and the moment a request's first bytes were read, for the start of its latency budget.

httptools (llhttp, in C) parses a request several times faster than h11, which is what lets one
front-end process accept a new connection per request at 3x capacity without overflowing the
kernel's listen queue (docs/BENCHMARKS.md, "Overload"). Unlike uvicorn's h11 protocol it has no
limit on the header block, so a client could stream one endless header into memory; this
subclass counts the bytes as the parser hands them over and answers 431 (then closes) past the
limit, before the request reaches the app.

The app is called from a task the event loop starts after the whole head is parsed, behind whatever
else the loop is doing; on a busy front end that wait is time the client counts and the budget
would not. The protocol puts when the request was first seen in the scope's extensions
(``RECEIVED``, ``time.monotonic()``), and the middleware starts the budget there: when the protocol
began reading it or, for a connection's first request whose bytes were already waiting when the
connection was accepted, the accept. A client that opens a connection per request is mostly
accepted late on a busy front end, and the loop's turns between the accept and the first read are
time it counts too (p99 2.5 ms, up to 4.3 for late answers under load: docs/RESULTS.md). A
connection opened ahead of its request (nothing waiting at the accept) starts at the first read, so
an idle connection is never charged to a budget.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from slimserve.server.middleware import RECEIVED


def bytes_waiting(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel holds unread on the transport's socket (0 where it cannot say)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


class HeadersTooLarge(Exception):
    """Raised inside a parser callback to stop parsing: the 431 has been sent."""


def bounded_httptools(max_header_bytes: int, clock: Callable[[], float] = time.monotonic) -> type[HttpToolsProtocol]:
    """An :class:`HttpToolsProtocol` that refuses request lines and headers over ``max_header_bytes``
    and stamps each request's first sight on ``clock`` (``time.monotonic``, which the middleware reads)."""

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes = 0  # request line and headers the parser has handed over
        _raw_bytes = 0  # bytes received while a request head is still open
        _in_head = False
        _refused = False
        _accepted: float | None = None  # the accept, while the connection's first request had bytes waiting at it

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            accepted = clock()
            super().connection_made(transport)
            if bytes_waiting(transport):
                self._accepted = accepted

        def _refuse(self) -> None:
            self._refused = True
            body = f'{{"error": "request headers exceed {max_header_bytes} bytes"}}'.encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
            )
            self.transport.close()

        def _count(self, size: int) -> None:
            self._head_bytes += size
            if self._head_bytes > max_header_bytes and not self._refused:
                self._refuse()
                raise HeadersTooLarge  # stops the parser; its error handler stays quiet (send_400_response)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            seen = clock() if self._accepted is None else self._accepted
            self._accepted = None  # later requests on this connection start at their own first read
            self.scope.setdefault("extensions", {})[RECEIVED] = {"monotonic": seen}
            self._head_bytes, self._raw_bytes, self._in_head = 0, 0, True

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            if not self._refused:  # the parser error we raised ourselves: already answered
                super().send_400_response(msg)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            # The parser holds a header it has not finished (one endless line) without calling back:
            # count what arrived while a head is still open, so that is bounded too.
            if self._in_head and not self._refused:
                self._raw_bytes += len(data)
                if self._raw_bytes > max_header_bytes:
                    self._refuse()

    return BoundedHttpToolsProtocol


def http_implementation(parser: str, max_header_bytes: int) -> Any:
    """What uvicorn's ``http`` option should get for the ``http_parser`` setting."""
    return bounded_httptools(max_header_bytes) if parser == "httptools" else "h11"
