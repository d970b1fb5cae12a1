"""Cross-cutting limits as pure ASGI middleware (no per-request Python objects beyond the needed).

* :class:`RequestContext`: stamps the arrival time (the start of the latency budget: when the
  protocol first saw the request, where it says, else now) and a request
  id (echoed if the client sent a sane one, else generated) on every request, puts ``X-Request-Id``
  on every response, refuses oversized headers with 431, and turns any unhandled exception into a
  generic 500 - no traceback or path leaves the server; the log has them, under the request id.
* :class:`BodyLimit`: refuses bodies over the limit with 413 by counting the bytes actually
  received (a lying Content-Length or chunked encoding does not get past it), and never buffers
  more than the limit.
* :class:`LoadShedder`: answers 503 + Retry-After to inference requests while the engine's queue
  is full or the front end holds a standing queue (server/admission.py), before routing,
  validation and decoding: under overload the rejections themselves must be cheap, or they eat
  the CPU the queued requests need. It runs after :class:`BodyLimit` has read the body, so a
  refusal never closes a connection with unread bytes (which the kernel would turn into a reset).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("slimserve.requests")

_SANE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# scope["extensions"][RECEIVED]["monotonic"]: when the protocol first saw the request - its first read, or the
# accept of a connection it was already waiting on (server/http_protocol.py)
RECEIVED = "slimserve.received"


async def send_json(
    send: Send, status: int, payload: dict[str, object], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def waited(scope: Scope) -> float:
    """Seconds since the protocol first saw this request (server/http_protocol.py), 0 where it
    does not say. An age on the real clock, so it moves an injected clock's stamp back alike."""
    received = scope.get("extensions", {}).get(RECEIVED)
    if not received:
        return 0.0
    return max(0.0, time.monotonic() - received["monotonic"])


class RequestContext:
    def __init__(self, app: ASGIApp, clock: Callable[[], float], max_header_bytes: int = 16 * 1024) -> None:
        self.app = app
        self.clock = clock
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival = self.clock() - waited(scope)
        sent = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        request_id = sent.decode() if _SANE_ID.fullmatch(sent) else uuid.uuid4().hex
        scope.setdefault("state", {}).update(arrival=arrival, request_id=request_id)
        id_header = (b"x-request-id", request_id.encode())
        # The h11 parser already refuses oversized headers; this also covers httptools and other servers.
        if sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_header_bytes:
            await send_json(
                send,
                431,
                {"error": f"request headers exceed {self.max_header_bytes} bytes", "request_id": request_id},
                [id_header],
            )
            return
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unhandled error in %s %s (request id %s)", scope.get("method"), scope.get("path"), request_id
            )
            if not started:
                await send_json(send, 500, {"error": "internal server error", "request_id": request_id}, [id_header])


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        request_id = scope.get("state", {}).get("request_id", "")
        too_large = {"error": f"request body exceeds {self.max_bytes} bytes", "request_id": request_id}
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            if not declared.isdigit():
                await send_json(send, 400, {"error": "Content-Length is not a number", "request_id": request_id})
            else:
                await send_json(send, 413, too_large)
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # client left; nobody to answer
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await send_json(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class LoadShedder:
    def __init__(self, app: ASGIApp, retry_after: Callable[[], int | None], on_shed: Callable[[], None]) -> None:
        self.app = app
        self.retry_after = retry_after  # seconds to wait when the request must be shed now, else None
        self.on_shed = on_shed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        wait = self.retry_after() if scope["type"] == "http" and scope["method"] == "POST" else None
        if wait is None:
            await self.app(scope, receive, send)
            return
        self.on_shed()
        request_id = scope.get("state", {}).get("request_id", "")
        await send_json(
            send,
            503,
            {
                "error": f"server overloaded: not taking new requests (queue full or front end backlogged); retry after {wait} s",
                "request_id": request_id,
            },
            [(b"retry-after", str(wait).encode())],
        )
