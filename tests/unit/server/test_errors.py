"""Refusals become HTTP in one place: every reason has a status, and the handler renders it."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from slimserve.server.errors import HTTP_STATUS, install_error_handlers
from slimserve.server.refusals import DeadlineMissed, Draining, QueueFull, Refused, Rejected

pytestmark = pytest.mark.unit


def test_every_reason_has_a_status_and_only_a_deadline_is_504() -> None:
    assert set(HTTP_STATUS) == set(Refused)
    assert {reason for reason, status in HTTP_STATUS.items() if status == 504} == {Refused.DEADLINE}
    assert set(HTTP_STATUS.values()) == {503, 504}


@pytest.mark.parametrize(
    ("refusal", "status", "retry_after"),
    [
        (QueueFull(64, 2), 503, "2"),
        (Draining(), 503, "1"),
        (DeadlineMissed("deadline of 5.0 ms passed while queued"), 504, None),
        (Rejected("model is loading", Refused.UNAVAILABLE, 1), 503, "1"),
        (Rejected("inference failed: RuntimeError", Refused.FAILED), 503, None),
    ],
)
def test_a_refusal_raised_in_a_route_is_answered_with_its_status_message_and_retry_after(
    refusal: Rejected, status: int, retry_after: str | None
) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/refuse")
    async def refuse() -> None:
        raise refusal

    response = TestClient(app).get("/refuse")
    assert response.status_code == status
    assert response.json() == {"error": str(refusal)}
    assert response.headers.get("retry-after") == retry_after
