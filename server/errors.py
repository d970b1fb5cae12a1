"""One error shape for every route: ``{"error": "<what is wrong>", "request_id": "..."}``, and the
HTTP status of every refusal (:data:`HTTP_STATUS`).

``{"error": ...}`` is what the KServe v2 protocol prescribes; the v1 API uses the same so clients
handle one format. Validation errors name the offending field or header.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from slimserve.server.refusals import Refused, Rejected

# The one place the serving path's refusals become HTTP: 503 says "try again (maybe elsewhere)",
# 504 says "your deadline cannot be met".
HTTP_STATUS: dict[Refused, int] = {
    Refused.UNAVAILABLE: 503,
    Refused.OVERLOADED: 503,
    Refused.DRAINING: 503,
    Refused.DEADLINE: 504,
    Refused.FAILED: 503,
}


class ApiError(Exception):
    """Raised by handlers; rendered as a JSON error with ``status`` and optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    state = getattr(request.app.state, "slimserve", None)
    if state is not None and 400 <= status < 500:
        state.engine.count("invalid")  # 503/504 are counted where they are decided
    body: dict[str, Any] = {"error": message}
    request_id = request.scope.get("state", {}).get("request_id")
    if request_id:
        body["request_id"] = request_id
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> Response:
        return error_response(request, error.status, error.message, error.headers)

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, error: Rejected) -> Response:
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
        return error_response(request, HTTP_STATUS[error.reason], str(error), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> Response:
        problems = []
        for item in error.errors()[:5]:
            location = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "request"
            problems.append(f"{location}: {item.get('msg', 'invalid')}")
        return error_response(request, 422, "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> Response:
        return error_response(request, error.status_code, str(error.detail), dict(error.headers or {}))
