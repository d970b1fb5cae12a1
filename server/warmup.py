"""Pay the front end's one-time costs at start-up instead of on the first requests.

The first request of a fresh server was measured 1.5-3x slower in the front end (arrival to
enqueue: 2.7-4.5 ms instead of 1.2-1.8 on 2 cores), enough to miss a 5 ms budget. Two costs were
found, both paid once per process:

* Pillow loads its format plugins and codecs on the first decode (:func:`imaging.warm_up`);
* FastAPI builds an included router's routes (dependency models, pydantic adapters) on the first
  request that is matched against it, and reads each endpoint's source file for error context on
  its first call.

:func:`warm_front_end` sends one in-process request to every inference route *before the engine
starts*, so each is routed, reaches its endpoint and is refused with "model is loading" (503):
nothing runs, nothing is counted, no socket is involved.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message

from slimserve.server import imaging

log = logging.getLogger(__name__)


async def request_in_process(app: ASGIApp, method: str, path: str) -> int:
    """Send one bodiless request through ``app`` (its whole middleware stack); return the status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"warm-up"), (b"content-length", b"0")],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    status = 0

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def warm_front_end(
    app: ASGIApp, routes: list[tuple[str, str]], channels: int, size: tuple[int, int]
) -> dict[str, int]:
    """Warm image decoding and every ``(method, path)`` in ``routes``; call before the engine
    starts. Returns each route's status (503 when it reached its endpoint, as intended)."""
    imaging.warm_up(channels, size)
    statuses = {f"{method} {path}": await request_in_process(app, method, path) for method, path in routes}
    unexpected = {route: status for route, status in statuses.items() if status != 503}
    if unexpected:  # the route moved, or the engine was ready already: warm-up did less than meant
        log.warning("front-end warm-up: expected 503 (model is loading), got %s", unexpected)
    return statuses
