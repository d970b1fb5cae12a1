"""What both HTTP APIs share: the state dependency, the latency-budget header and the documented errors."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import Depends, Request

from slimserve.server.errors import ApiError
from slimserve.server.schemas import ErrorBody
from slimserve.server.state import ServerState

BUDGET_HEADER = "X-Latency-Budget-Ms"


# Dependencies are coroutines: FastAPI runs a plain `def` dependency in its thread pool, a thread
# hand-off per request that cost more than decoding the image (measured with py-spy under load).
async def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.slimserve
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


def parse_budget(values: list[str], default_ms: float, max_ms: float) -> float:
    """The budget in ms from the header's values; :class:`ApiError` 422 naming the header otherwise."""
    if not values:
        return default_ms
    if len(values) > 1:
        raise ApiError(422, f"{BUDGET_HEADER} was sent {len(values)} times; send it once")
    text = values[0].strip()
    try:
        budget = float(text)
    except ValueError:
        raise ApiError(422, f"{BUDGET_HEADER} must be a number of milliseconds, got {text[:40]!r}") from None
    if not math.isfinite(budget) or budget <= 0:
        raise ApiError(422, f"{BUDGET_HEADER} must be a positive, finite number of milliseconds, got {text[:40]!r}")
    if budget > max_ms:
        raise ApiError(422, f"{BUDGET_HEADER} of {budget:g} ms exceeds the server's maximum of {max_ms:g} ms")
    return budget


async def latency_budget(request: Request, state: StateDep) -> float:
    return parse_budget(
        request.headers.getlist(BUDGET_HEADER), state.settings.default_budget_ms, state.settings.max_budget_ms
    )


# Documented by hand (see budget_parameter) because the header is parsed by hand: duplicates,
# NaN and infinity must be refused with a message naming the header.
def budget_parameter(max_ms: float) -> dict[str, Any]:
    return {
        "name": BUDGET_HEADER,
        "in": "header",
        "required": False,
        "description": "Latency budget in milliseconds for this request, from arrival to response: a positive, "
        "finite number, at most the server's max_budget_ms, sent once. Missing: the server's default_budget_ms.",
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": max_ms},
    }


BudgetDep = Annotated[float, Depends(latency_budget)]

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "empty, corrupt or truncated image; malformed multipart body"},
    413: {"model": ErrorBody, "description": "body larger than max_body_bytes, or image larger than max_image_pixels"},
    415: {"model": ErrorBody, "description": "not a JPEG, PNG or WebP image (or a JSON body)"},
    422: {"model": ErrorBody, "description": f"bad {BUDGET_HEADER} header"},
    503: {"model": ErrorBody, "description": "loading, draining, or queue full (see Retry-After)"},
    504: {
        "model": ErrorBody,
        "description": "the deadline passed while queued (the model was not run), or no subnet can make it (reject mode)",
    },
}
