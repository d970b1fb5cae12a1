"""The fresh-connection generator's response parsing, and the kernel counters the overload bench reads."""

from __future__ import annotations

import json

import pytest

from slimserve.loadtest import benchmarks
from slimserve.loadtest.fresh_connections import parse_response


def test_a_200_yields_its_status_and_json_body() -> None:
    body = json.dumps({"class_index": 3, "subnet": {"id": "s1"}}).encode()
    raw = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    assert parse_response(raw) == (200, {"class_index": 3, "subnet": {"id": "s1"}})


def test_a_chunked_200_is_reassembled_as_ray_serve_sends_it() -> None:
    body = json.dumps({"class_index": 3, "subnet": {"id": "s1"}}).encode()
    chunked = b"%x\r\n%s\r\n%x;ext=1\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    assert parse_response(raw) == (200, {"class_index": 3, "subnet": {"id": "s1"}})
    assert parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}") == (200, None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\n\r\n{}", (503, None)),  # refusals keep no body
        (b"HTTP/1.0 504 Gateway Timeout\r\n\r\n", (504, None)),
        (b"HTTP/1.1 200 OK\r\n\r\nnot json", (200, None)),  # a status, even with a broken body
        (b"", (0, None)),  # the connection closed without a byte: no HTTP status at all
        (b"garbage", (0, None)),
        (b"HTTP/1.1 abc\r\n\r\n", (0, None)),
    ],
)
def test_anything_else_is_its_status_or_no_status(raw: bytes, expected: tuple[int, None]) -> None:
    assert parse_response(raw) == expected


def test_kernel_counters_are_read_from_the_tcpext_table(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    netstat = tmp_path / "netstat"
    netstat.write_text(
        "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPAbortOnData\n"
        "TcpExt: 0 17 17 2\n"
        "IpExt: InNoRoutes\nIpExt: 0\n"
    )
    original = benchmarks.Path

    def fake_path(name: str):
        return netstat if name == "/proc/net/netstat" else original(name)

    monkeypatch.setattr(benchmarks, "Path", fake_path)
    assert benchmarks._tcp_counters() == {"ListenOverflows": 17, "ListenDrops": 17, "TCPAbortOnData": 2}
