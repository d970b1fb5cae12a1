"""Reliability against a real `slimserve serve` process: shutdown, overload, abuse, model files."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from slimserve.loadtest.runner import ServerProcess, http_status
from slimserve.models.bundle import load_bundle
from slimserve.models.schema import sha256_file
from tests.helpers import bomb_png

BUDGET = "X-Latency-Budget-Ms"


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


async def fire(
    url: str, bodies: list[bytes], budgets: list[float], answered: list[int] | None = None
) -> list[httpx.Response | Exception]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def one(index: int) -> httpx.Response | Exception:
            try:
                return await client.post(
                    "/v1/classify",
                    content=bodies[index],
                    headers={BUDGET: f"{budgets[index]:g}", "X-Request-Id": f"req-{index}"},
                )
            except httpx.HTTPError as error:
                return error
            finally:
                if answered is not None:
                    answered.append(index)

        return await asyncio.gather(*(one(i) for i in range(len(bodies))))


def test_concurrent_mixed_budgets_each_response_belongs_to_its_request(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    bodies = [png_bytes(i) for i in range(200)]
    # The loose budget is room for everyone: the whole burst's front-end work counts against it
    # (its server-side total), which reached 330 ms here with three
    # busy loops beside it, and more than 500 ms on CI once.
    budgets = [(2.0, 20.0, 5000.0)[i % 3] for i in range(200)]
    # On a loaded machine the front end's lag shedding may refuse part of a 200-connection burst,
    # loose budgets included (CI did once); this test is about the engine's queue, so that is off.
    with ServerProcess(
        tiny_bundle_dir, "adaptive", log_path=tmp_path / "log", extra_env={"SLIMSERVE_FRONTEND_DELAY_TARGET_MS": "0"}
    ) as server:
        responses = asyncio.run(fire(server.url, bodies, budgets))
    bundle = load_bundle(tiny_bundle_dir)
    modules = {row.id: bundle.materialize(row) for row in bundle.table.subnets}
    mean, std = bundle.manifest.input.mean[0], bundle.manifest.input.std[0]
    answered = 0
    for index, response in enumerate(responses):
        assert isinstance(response, httpx.Response), response
        assert response.status_code in (200, 503, 504)
        assert response.headers["x-request-id"] == f"req-{index}"
        if response.status_code != 200:
            continue
        answered += 1
        body = response.json()
        assert body["timing"]["budget_ms"] == budgets[index]
        image = torch.from_numpy(np.asarray(Image.open(io.BytesIO(bodies[index])), dtype=np.float32)).reshape(
            1, 1, 28, 28
        )
        with torch.inference_mode():
            expected = torch.softmax(modules[body["subnet"]["id"]]((image / 255 - mean) / std), 1)[0]
        assert body["class_index"] == int(expected.argmax())
        assert body["top_k"][0]["probability"] == pytest.approx(float(expected.max()), abs=1e-4)
    loose = [r for i, r in enumerate(responses) if budgets[i] == 5000.0]
    refused = [(r.status_code, r.text) for r in loose if isinstance(r, httpx.Response) and r.status_code != 200]
    assert not refused  # room for everyone
    assert answered >= len(loose)


def test_overload_sheds_with_503_and_every_request_is_accounted_for(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    with ServerProcess(
        tiny_bundle_dir,
        "static:s2",
        log_path=tmp_path / "log",
        # The front end's own shedding (by its event loop's lag) may refuse a whole 300-connection
        # burst on a loaded machine before one request reaches the queue (CI did so once); this
        # test is about the queue's shedding, so that one is off here.
        extra_env={"SLIMSERVE_MAX_QUEUE": "8", "SLIMSERVE_MAX_BATCH": "1", "SLIMSERVE_FRONTEND_DELAY_TARGET_MS": "0"},
    ) as server:
        rss_before = psutil.Process(server.process.pid).memory_info().rss
        responses = asyncio.run(fire(server.url, [png_bytes(i) for i in range(300)], [5000.0] * 300))
        rss_after = psutil.Process(server.process.pid).memory_info().rss
    statuses = [r.status_code for r in responses if isinstance(r, httpx.Response)]
    assert len(statuses) == 300, [r for r in responses if not isinstance(r, httpx.Response)][:3]  # no resets, no drops
    bodies = {r.text for r in responses if isinstance(r, httpx.Response) and r.status_code != 200}
    assert set(statuses) <= {200, 503, 504} and statuses.count(503) > 0 and statuses.count(200) > 0, bodies
    shed = [r for r in responses if isinstance(r, httpx.Response) and r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 and "overloaded" in r.json()["error"] for r in shed)
    assert rss_after - rss_before < 50 * 2**20


def test_sigterm_answers_every_accepted_request_and_exits_in_time(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    env = {"SLIMSERVE_MAX_BATCH": "1", "SLIMSERVE_DRAIN_SECONDS": "10", "SLIMSERVE_MAX_QUEUE": "1000"}
    server = ServerProcess(tiny_bundle_dir, "static:s2", log_path=tmp_path / "log", extra_env=env).start()
    assert server.process is not None

    answered: list[int] = []

    async def scenario() -> list[httpx.Response | Exception]:
        task = asyncio.ensure_future(fire(server.url, [png_bytes(i) for i in range(150)], [30_000.0] * 150, answered))
        while len(answered) < 10:  # the pipeline is flowing: the rest are queued, running or connecting
            await asyncio.sleep(0.005)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        results = await task
        await asyncio.to_thread(server.process.wait, 15)
        results.append(RuntimeError(f"exit after {time.monotonic() - signalled:.1f} s"))  # type: ignore[arg-type]
        return results

    results = asyncio.run(scenario())
    server.stop()
    exit_note = results.pop()
    responses = [r for r in results if isinstance(r, httpx.Response)]
    failures = [r for r in results if not isinstance(r, httpx.Response)]
    # Requests that reached the server before SIGTERM are answered (200); ones arriving during the
    # drain are refused with 503 or at connect time - never cut off mid-way.
    assert all(r.status_code in (200, 503) for r in responses)
    assert sum(r.status_code == 200 for r in responses) > 10  # work queued before the signal was finished
    assert all(isinstance(f, httpx.ConnectError) for f in failures), failures[:3]
    assert server.process.returncode is not None, exit_note
    assert float(str(exit_note).split()[2]) < 12
    assert http_status(f"{server.url}/livez") is None  # the port is closed


def serve_expecting_failure(bundle: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "slimserve", "serve", "--bundle", str(bundle)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_tampered_bundle_stops_start_up_naming_the_file(bundle_copy: Path) -> None:
    with (bundle_copy / "weights.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    result = serve_expecting_failure(bundle_copy)
    assert result.returncode == 1
    assert "weights.safetensors" in result.stderr and "SHA-256" in result.stderr


def test_a_malformed_table_stops_start_up_naming_the_field(bundle_copy: Path) -> None:
    raw = json.loads((bundle_copy / "subnets.json").read_text())
    raw["subnets"][1]["accuracy"] = "high"
    (bundle_copy / "subnets.json").write_text(json.dumps(raw))
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["sha256"]["subnets.json"] = sha256_file(
        bundle_copy / "subnets.json"
    )  # re-signed: only the content is wrong
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    result = serve_expecting_failure(bundle_copy)
    assert result.returncode == 1
    assert "subnets.json" in result.stderr and "subnets.1.accuracy" in result.stderr


def test_decompression_bombs_are_refused_fast_with_flat_memory(server: ServerProcess) -> None:
    process = psutil.Process(server.process.pid)  # type: ignore[union-attr]
    before = process.memory_info().rss
    started = time.perf_counter()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for size in (30_000, 50_000, 65_000):
            response = client.post("/v1/classify", content=bomb_png(size, size))
            assert response.status_code == 413 and "pixels" in response.json()["error"]
    assert time.perf_counter() - started < 2.0
    assert process.memory_info().rss - before < 20 * 2**20


def raw_exchange(port: int, payload: bytes, wait: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(payload)
        chunks = []
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except (TimeoutError, ConnectionResetError):  # the server may refuse and close mid-request
            pass
    return b"".join(chunks)


def test_raw_http_abuse_leaves_the_server_serving(server: ServerProcess) -> None:
    port = server.port
    assert raw_exchange(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    huge_headers = (
        b"GET /livez HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(200))
        + b"\r\n"
    )
    answer = raw_exchange(port, huge_headers)
    assert answer == b"" or answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431"))
    lying = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n" + b"z" * 5000
    assert raw_exchange(port, lying).startswith(b"HTTP/1.1 400")
    # slow clients: connections that never finish their headers
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    for sock in slow:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    with httpx.Client(base_url=server.url, timeout=5) as client:
        for seed in range(5):
            assert client.post("/v1/classify", content=png_bytes(seed)).status_code == 200
    for sock in slow:
        sock.close()
    assert http_status(f"{server.url}/readyz") == 200


def test_two_front_end_processes_serve_one_port_and_leave_no_process_behind(
    tiny_bundle_dir: Path, tmp_path: Path
) -> None:
    server = ServerProcess(
        tiny_bundle_dir, "adaptive", log_path=tmp_path / "log", extra_env={"SLIMSERVE_FRONTENDS": "2"}
    ).start()
    assert server.process is not None
    family = psutil.Process(server.process.pid).children(recursive=True)
    commands = [" ".join(child.cmdline()) for child in family]
    assert sum("slimserve.server.engine_host" in c for c in commands) == 1 and len(family) == 2, commands
    responses = asyncio.run(fire(server.url, [png_bytes(i) for i in range(60)], [5000.0] * 60))
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in responses), responses[:3]
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(20) is not None
    server.stop()
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
