"""The bounded httptools protocol on a real uvicorn server: oversized headers get 431 while parsing."""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from uvicorn.server import ServerState

from slimserve.server.http_protocol import bounded_httptools
from slimserve.server.middleware import RECEIVED


async def hello(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/age":  # how long ago the protocol began reading this request
        age = time.monotonic() - scope["extensions"][RECEIVED]["monotonic"]
        body = f"{age:.6f}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def port() -> Iterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    config = uvicorn.Config(hello, http=bounded_httptools(2048), log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield listener.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        return received


def test_headers_within_the_limit_pass_and_the_connection_is_reused(port: int) -> None:
    answer = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1500 + b"\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4000 + b"\r\n\r\n",  # one long header
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: vvvvvvvv\r\n" % i for i in range(300)) + b"\r\n",  # many
        b"GET /" + b"p" * 4000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a long request line
    ],
)
def test_oversized_request_heads_get_431_and_the_connection_closes(port: int, request_bytes: bytes) -> None:
    answer = exchange(port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 431") and b"exceed 2048 bytes" in answer
    assert answer.count(b"HTTP/1.1") == 1  # exactly one answer, no 400 after it


def test_an_endless_header_is_cut_off_without_buffering_it(port: int) -> None:
    """A server that buffered the header would take all 64 MB (or stall the sender until the
    timeout); this one answers and closes after ~2 KB, so the sender's writes fail."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(1000):
                connection.sendall(b"z" * 65536)


def test_every_request_says_when_its_first_bytes_were_read(port: int) -> None:
    # two requests on one connection: each has its own stamp, taken before the app ran
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        for _ in range(2):
            connection.sendall(b"GET /age HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _, body = connection.recv(65536).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert 0.0 <= float(body) < 5.0


class Readings:
    """A clock for the protocol's stamps that remembers every reading; each is a second after the last."""

    def __init__(self) -> None:
        self.taken: list[float] = []

    def __call__(self) -> float:
        self.taken.append(100.0 + len(self.taken))
        return self.taken[-1]


def stamps_of_one_connection(waiting_at_accept: bool, clock: Readings) -> list[float]:
    """The stamps of two requests on one connection, handed to the protocol as an accepted socket
    with the first request already in the kernel's buffer, or sent only after the hand-over."""
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    stamps: list[float] = []

    async def app(scope, receive, send) -> None:
        stamps.append(scope["extensions"][RECEIVED]["monotonic"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        config = uvicorn.Config(app, http=bounded_httptools(2048, clock), log_level="error", lifespan="off")
        config.load()
        loop = asyncio.get_running_loop()
        with (
            socket.create_server(("127.0.0.1", 0)) as listener,
            socket.create_connection(listener.getsockname()) as client,
        ):
            accepted, _ = listener.accept()
            client.setblocking(False)
            if waiting_at_accept:
                await loop.sock_sendall(client, request)
                assert select.select([accepted], [], [], 5)[0]  # the bytes are in the accepted socket's buffer
            protocol_class = config.http_protocol_class
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol_class(config, ServerState(), {}), accepted
            )
            for number in range(2):
                if number or not waiting_at_accept:
                    await loop.sock_sendall(client, request)
                answer = b""
                while not answer.endswith(b"ok"):
                    answer += await asyncio.wait_for(loop.sock_recv(client, 65536), 5)
            transport.close()

    asyncio.run(main())
    return stamps


def test_a_request_already_waiting_when_its_connection_is_accepted_starts_at_the_accept() -> None:
    clock = Readings()
    first, second = stamps_of_one_connection(waiting_at_accept=True, clock=clock)
    assert first == clock.taken[0]  # the accept's reading, taken before the first read
    assert second > first  # the next request on the connection starts at its own first read


def test_a_connection_opened_ahead_of_its_request_starts_at_the_first_read() -> None:
    clock = Readings()
    first, second = stamps_of_one_connection(waiting_at_accept=False, clock=clock)
    assert first > clock.taken[0]  # not charged for the time the connection sat idle
    assert second > first
