"""`loadtest run` derives its default budget mix from the latency column the target server uses."""

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from slimserve.loadtest.cli import served_mix
from slimserve.loadtest.runner import free_port, served_column
from slimserve.loadtest.workload import default_mix

DEMO = Path("models/demo")


@contextmanager
def answering(body: bytes, status: int = 200) -> Iterator[str]:
    """A local HTTP server that answers every GET with ``body``; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_gpu_server_gets_the_mix_of_its_own_column() -> None:
    with answering(json.dumps({"device_profile": "cuda0", "subnets": []}).encode()) as url:
        assert served_column(url) == "cuda0"
        mix = served_mix(url, DEMO)
    assert mix == default_mix(DEMO / "subnets.json", column="cuda0")
    assert mix != default_mix(DEMO / "subnets.json")  # the CPU column's budgets are several times looser


@pytest.mark.parametrize("body, status", [(b"{}", 200), (b"not json", 200), (b"{}", 404), (b"[1, 2]", 200)])
def test_a_server_that_does_not_name_a_column_gets_the_primary_one(
    body: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    with answering(body, status) as url:
        assert served_column(url) is None
        assert served_mix(url, DEMO) == default_mix(DEMO / "subnets.json")
    assert "derived from the table's primary one" in caplog.text


def test_nothing_listening_and_a_column_the_table_lacks_fall_back_too(caplog: pytest.LogCaptureFixture) -> None:
    assert served_column(f"http://127.0.0.1:{free_port()}") is None
    with answering(json.dumps({"device_profile": "tpu-v9"}).encode()) as url:
        assert served_mix(url, DEMO) == default_mix(DEMO / "subnets.json")
    assert "(tpu-v9)" in caplog.text
