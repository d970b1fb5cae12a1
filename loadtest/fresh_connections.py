"""An open-loop generator that opens a new TCP connection for every request (``Connection: close``).

Many real clients and load balancers do this, and it is the path that keep-alive load (Locust's
pooled connections) never exercises: every request costs the server an ``accept``, and a server
whose event loop falls behind on accepting overflows the kernel's listen queue, which clients see
as connection resets. Requests are raw HTTP/1.1 over asyncio streams, so the generator's own cost
per request is small (the two cores are shared with the server).

Outcome per request: the HTTP status, or 0 with the exception's name (``ConnectionResetError``,
``TimeoutError``, ...) when no status came back. Records are loadtest.report's, so runs summarize
like Locust's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import psutil

from slimserve.loadtest.arrivals import schedule
from slimserve.loadtest.report import Record
from slimserve.loadtest.workload import BudgetMix, test_images

T = TypeVar("T")
TIMEOUT_SECONDS = 30.0
# Connections the generator holds open at most (each is a file descriptor here). At the limit it
# waits, so the send lag grows and the run is flagged as the generator's, not the server's, fault.
MAX_IN_FLIGHT = 8192


@dataclass(frozen=True)
class FreshRun:
    records: list[Record]
    errors: dict[str, int]  # "ExceptionName: message" -> count, for requests that got no HTTP status
    client_cpu_percent: float
    scheduled: int


def _request(host: str, port: int, body: bytes, budget_ms: float, content_type: str = "image/png") -> bytes:
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nX-Latency-Budget-Ms: {budget_ms:g}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def parse_response(data: bytes) -> tuple[int, dict[str, object] | None]:
    """(status, JSON body of a 200) from a whole HTTP/1.1 response; status 0 if it is not one."""
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return 0, None
    status = int(parts[1])
    if status != 200:
        return status, None
    if b"transfer-encoding: chunked" in head.lower():  # Ray Serve's proxy answers in chunks
        body = _dechunk(body)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def _dechunk(body: bytes) -> bytes:
    """The payload of a chunked body (RFC 9112 7.1); what cannot be parsed is returned as is."""
    payload, rest = [], body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return body
        if size == 0:
            break
        payload.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(payload)


async def _run(
    host: str,
    port: int,
    times: np.ndarray,
    bodies: list[bytes],
    labels: list[int],
    budgets: np.ndarray,
    content_type: str = "image/png",
) -> tuple[list[Record], dict[str, int]]:
    loop = asyncio.get_running_loop()
    records: list[Record] = []
    errors: dict[str, int] = {}
    start = loop.time() + 0.2
    # Latencies on perf_counter: uvloop's loop.time() moves in whole milliseconds.
    origin = time.perf_counter() + 0.2

    async def one(index: int, scheduled: float) -> None:
        sent = time.perf_counter()
        budget = float(budgets[index])
        status, body, writer = 0, None, None
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(_request(host, port, bodies[index], budget, content_type))
                await writer.drain()
                status, body = parse_response(await reader.read())
        except (OSError, TimeoutError) as error:
            name = f"{type(error).__name__}: {error}"[:120]
            errors[name] = errors.get(name, 0) + 1
        finally:
            if writer is not None:
                writer.close()
        latency = (time.perf_counter() - sent) * 1000.0
        subnet = body.get("subnet") if body else None
        timing = body.get("timing") if body else None
        records.append(
            Record(
                scheduled_s=scheduled,
                sent_s=sent - origin,
                latency_ms=latency if status else float("inf"),
                status=status,
                budget_ms=budget,
                label=labels[index],
                predicted=body.get("class_index") if body else None,  # type: ignore[arg-type]
                subnet=subnet.get("id") if isinstance(subnet, dict) else None,
                width=subnet.get("width") if isinstance(subnet, dict) else None,
                expected_accuracy=subnet.get("expected_accuracy") if isinstance(subnet, dict) else None,
                inference_ms=timing.get("inference_ms") if isinstance(timing, dict) else None,
                batch_size=timing.get("batch_size") if isinstance(timing, dict) else None,
                server_total_ms=timing.get("total_ms") if isinstance(timing, dict) else None,
                preprocess_ms=timing.get("preprocess_ms") if isinstance(timing, dict) else None,
                queue_ms=timing.get("queue_ms") if isinstance(timing, dict) else None,
            )
        )

    tasks = set()
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)
    for index, offset in enumerate(times):
        delay = start + float(offset) - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        task = asyncio.create_task(one(index, float(offset)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(lambda _: slots.release())
    while tasks:
        await asyncio.gather(*list(tasks))
    return records, errors


def _event_loop_run(coroutine: Coroutine[Any, Any, T]) -> T:
    """uvloop where installed (it comes with uvicorn[standard]): half the generator's CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def run(
    url: str,
    rate: float,
    seconds: float,
    budget_mix: str,
    seed: int = 7,
    arrival: str = "poisson",
    images: int = 2000,
    cv2: float = 4.0,
    trace: Sequence[float] | None = None,
    body_format: str = "raw",
) -> FreshRun:
    """Play ``arrival`` at ``rate`` req/s for ``seconds`` against ``url``, one connection per request.

    ``body_format``: "raw" (the PNG) or "json" (``{"image": "<base64>"}``, for LitServe)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    times = schedule(arrival, rate, seconds, seed, cv2, trace)
    rng = np.random.default_rng(seed + 1)
    budgets = BudgetMix.parse(budget_mix).draw(len(times), rng)
    encoded, all_labels = test_images(images)
    content_type = "image/png"
    if body_format == "json":
        encoded = [json.dumps({"image": base64.b64encode(image).decode()}).encode() for image in encoded]
        content_type = "application/json"
    order = rng.integers(0, len(encoded), len(times))
    bodies = [encoded[int(i)] for i in order]
    labels = [int(all_labels[int(i)]) for i in order]
    process = psutil.Process()
    process.cpu_percent(None)
    started = time.perf_counter()
    records, errors = _event_loop_run(_run(host, int(port), times, bodies, labels, budgets, content_type))
    cpu = process.cpu_percent(None) if time.perf_counter() > started else 0.0
    return FreshRun(sorted(records, key=lambda r: r.scheduled_s), errors, round(cpu, 1), len(times))
