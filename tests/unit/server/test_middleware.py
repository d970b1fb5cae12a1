"""The ASGI middleware, driven with raw ASGI messages (what a lying client can actually send)."""

import asyncio
import json

from slimserve.server.middleware import BodyLimit, LoadShedder, RequestContext


async def echo_app(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


async def crashing_app(scope, receive, send):
    raise RuntimeError("/secret/path/model.py line 42")


def call(app, headers, chunks, method="POST"):
    scope = {"type": "http", "method": method, "path": "/v1/classify", "headers": headers, "state": {}}
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    received = {"count": 0}
    sent = []

    async def receive():
        if messages:
            received["count"] += 1
            return messages.pop(0)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, body, dict(sent[0]["headers"]), received["count"]


def test_small_bodies_pass_through_untouched() -> None:
    status, body, _, _ = call(BodyLimit(echo_app, 1000), [(b"content-length", b"600")], [b"x" * 300, b"y" * 300])
    assert (status, body) == (200, b"600")


def test_declared_oversize_is_refused_without_reading_the_body() -> None:
    status, body, _, reads = call(BodyLimit(echo_app, 1000), [(b"content-length", b"5000")], [b"x" * 5000])
    assert status == 413 and b"exceeds 1000 bytes" in body and reads == 0


def test_a_lying_content_length_is_caught_by_counting_bytes() -> None:
    chunks = [b"x" * 400] * 10  # 4000 bytes behind a declared 10
    status, _, _, reads = call(BodyLimit(echo_app, 1000), [(b"content-length", b"10")], chunks)
    assert status == 413 and reads == 3  # stopped reading as soon as the limit was passed


def test_chunked_bodies_without_length_are_counted_too() -> None:
    status, _, _, reads = call(BodyLimit(echo_app, 1000), [(b"transfer-encoding", b"chunked")], [b"x" * 300] * 20)
    assert status == 413 and reads == 4


def test_non_numeric_content_length_is_a_bad_request() -> None:
    status, body, _, _ = call(BodyLimit(echo_app, 1000), [(b"content-length", b"ten")], [b"x"])
    assert status == 400 and b"Content-Length" in body


def test_request_ids_are_echoed_when_sane_and_generated_otherwise() -> None:
    app = RequestContext(echo_app, clock=lambda: 1.0)
    _, _, headers, _ = call(app, [(b"x-request-id", b"abc-123")], [b""])
    assert headers[b"x-request-id"] == b"abc-123"
    _, _, headers, _ = call(app, [(b"x-request-id", b"<script>alert(1)</script>")], [b""])
    assert len(headers[b"x-request-id"]) == 32 and b"<" not in headers[b"x-request-id"]


def test_unhandled_errors_become_generic_500s_with_the_request_id(caplog) -> None:
    status, body, headers, _ = call(
        RequestContext(crashing_app, clock=lambda: 1.0), [(b"x-request-id", b"req-7")], [b""]
    )
    payload = json.loads(body)
    assert status == 500 and payload == {"error": "internal server error", "request_id": "req-7"}
    assert b"secret" not in body and headers[b"x-request-id"] == b"req-7"
    assert "req-7" in caplog.text and "secret/path" in caplog.text  # the details stay in the server log


def test_oversized_headers_get_431() -> None:
    app = RequestContext(echo_app, clock=lambda: 1.0, max_header_bytes=2048)
    status, body, _, _ = call(app, [(b"x-pad", b"a" * 3000)], [b""])
    assert status == 431 and b"2048 bytes" in body


def test_a_full_queue_sheds_inference_posts_before_the_app_and_counts_them() -> None:
    shed: list[int] = []
    full = LoadShedder(echo_app, retry_after=lambda: 3, on_shed=lambda: shed.append(1))
    status, body, headers, reads = call(full, [], [b"image"])
    assert status == 503 and headers[b"retry-after"] == b"3" and b"queue full" in body
    assert reads == 0 and shed == [1]  # neither the body nor the app was touched
    assert call(full, [], [], method="GET")[0] == 200  # health, metadata and metrics still answer
    room = LoadShedder(echo_app, retry_after=lambda: None, on_shed=lambda: shed.append(1))
    assert call(room, [], [b"image"])[:2] == (200, b"5") and shed == [1]


def test_the_budget_starts_when_the_protocol_began_reading_the_request() -> None:
    import time

    from slimserve.server.middleware import RECEIVED

    seen = []

    async def app(scope, receive, send):
        seen.append(scope["state"]["arrival"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    context = RequestContext(app, clock=lambda: 100.0)

    async def run(scope):
        async def send(message):
            pass

        await context(scope, None, send)

    base = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": [], "state": {}}
    asyncio.run(run(dict(base)))  # a protocol that does not say: now
    # read 50 ms before the app got it (a busy event loop): the budget started then, on the injected clock
    asyncio.run(run({**base, "extensions": {RECEIVED: {"monotonic": time.monotonic() - 0.05}}}))
    assert seen[0] == 100.0
    assert 99.0 < seen[1] <= 100.0 - 0.05
