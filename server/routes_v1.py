"""The native API: classify an encoded image under a latency budget; inspect subnets and status; health."""

from __future__ import annotations

import asyncio
import heapq
import json
import math
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile
from starlette.responses import Response

from slimserve.server.engine import Answer
from slimserve.server.errors import ApiError
from slimserve.server.imaging import ImageError, decode_image
from slimserve.server.schemas import ClassifyResponse, ErrorBody, HealthResponse, StatusResponse, SubnetsResponse
from slimserve.server.state import ServerState

BUDGET_HEADER = "X-Latency-Budget-Ms"
INLINE_DECODE_BYTES = 256 * 1024  # smaller bodies decode on the event loop; larger ones in a thread

router = APIRouter()


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

IMAGE_BODY = {
    "parameters": [budget_parameter(60_000.0)],
    "requestBody": {
        "required": True,
        "description": "One encoded image (JPEG, PNG or WebP), as the raw body or as the single file of a multipart form.",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    },
}


async def image_bytes(request: Request, max_bytes: int) -> bytes:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async with request.form(max_files=1, max_fields=8, max_part_size=max_bytes) as form:
            files = [value for value in form.values() if isinstance(value, UploadFile)]
            if len(files) != 1:
                raise ApiError(400, "multipart body must contain exactly one file part (the image)")
            return await files[0].read()
    if content_type in ("application/json", "application/x-ndjson"):
        raise ApiError(
            415, "send the encoded image bytes (JPEG/PNG/WebP), not JSON; tensors go to /v2/models/{name}/infer"
        )
    return await request.body()


async def decode(state: ServerState, data: bytes) -> torch.Tensor:
    channels, height, width = state.info.input_shape
    try:
        if len(data) <= INLINE_DECODE_BYTES:
            return decode_image(data, channels, (width, height), state.settings.max_image_pixels)
        return await asyncio.to_thread(decode_image, data, channels, (width, height), state.settings.max_image_pixels)
    except ImageError as error:
        raise ApiError(error.status, str(error)) from None


def result_fields(
    state: ServerState, answer: Answer, arrival: float, budget_ms: float, now: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The classification and the timing of one answered request (shared with the v2 API)."""
    # Plain Python on one list: torch.topk and iterating its result tensors took about a third of
    # the front end's time per request (py-spy), for ten numbers.
    probabilities: list[float] = answer.probabilities.tolist()
    best = heapq.nlargest(state.settings.top_k, range(len(probabilities)), key=probabilities.__getitem__)
    names = state.info.class_names
    ranked = [{"index": i, "name": names[i], "probability": round(probabilities[i], 6)} for i in best]
    total_ms = (now - arrival) * 1000.0
    timing = {
        "preprocess_ms": round((answer.enqueued - arrival) * 1000.0, 3),
        "queue_ms": round(answer.queued * 1000.0, 3),
        "inference_ms": round(answer.inference * 1000.0, 3),
        "total_ms": round(total_ms, 3),
        "budget_ms": budget_ms,
        "met": total_ms <= budget_ms,
        "batch_size": answer.batch_size,
    }
    return {"top_k": ranked}, timing


def per_input_fields(state: ServerState, answer: Answer) -> dict[str, Any]:
    """Multi-stage bundles: which stage answered, how sure it was, and whether the deadline cut it short.
    Gated bundles: the residual blocks and the share of channel groups the image's gates ran."""
    if answer.blocks_run >= 0:
        return {
            "gates": {
                "blocks_run": answer.blocks_run,
                "blocks": state.info.gated_blocks,
                "channel_groups_run": round(answer.groups_run, 6),
            }
        }
    if answer.stage < 0:
        return {}
    return {
        "exit": {
            "stage": answer.stage + 1,
            "stages": state.info.stages,
            "confidence": round(float(answer.probabilities.max()), 6),
            "anytime": answer.cut_short,
        }
    }


def record(state: ServerState, answer: Answer, timing: dict[str, Any], now: float) -> None:
    """Tell the engine what the client got (its metrics, and the post-inference time it learns)."""
    state.engine.record_answer(
        answer.subnet, timing["met"], timing["total_ms"] / 1000.0, answer.queued, now - answer.finished
    )


@router.post(
    "/v1/classify",
    summary="Classify one image within a latency budget",
    description=f"The server picks, for this request, the most accurate subnet predicted to answer within "
    f"`{BUDGET_HEADER}` given the queue and the machine's load, batching with other queued requests when "
    "that helps. The subnet used comes back in the body and in `X-Subnet-Id`; timings in `Server-Timing`.",
    responses={200: {"model": ClassifyResponse, "description": "classification"}, **ERRORS},
    openapi_extra=IMAGE_BODY,
)
async def classify(request: Request, state: StateDep, budget_ms: BudgetDep) -> Response:
    state.require_ready()
    state.require_feasible(budget_ms)
    arrival = request.scope["state"]["arrival"]
    image = await decode(state, await image_bytes(request, state.settings.max_body_bytes))
    answer = await state.run(image, arrival, budget_ms)
    now = state.clock()
    classes, timing = result_fields(state, answer, arrival, budget_ms, now)
    subnet = state.info.subnets[answer.subnet]
    best = classes["top_k"][0]
    body = {
        "request_id": request.scope["state"]["request_id"],
        "class_index": best["index"],
        "class_name": best["name"],
        **classes,
        "subnet": {
            "id": subnet.id,
            "channels": list(subnet.channels),
            "depths": list(subnet.depths),
            "expected_accuracy": subnet.accuracy,
            "width": round(subnet.width, 4),
            **per_input_fields(state, answer),
        },
        "timing": timing,
    }
    record(state, answer, timing, now)
    headers = {
        "X-Subnet-Id": subnet.id,
        "X-Replica-Id": state.replica_id,
        "Server-Timing": f"queue;dur={timing['queue_ms']}, inference;dur={timing['inference_ms']}, total;dur={timing['total_ms']}",
    }
    return Response(json.dumps(body), media_type="application/json", headers=headers)


@router.get(
    "/v1/subnets",
    response_model=SubnetsResponse,
    responses={503: {"model": ErrorBody}},
    summary="The subnet table as served",
)
async def subnets(state: StateDep) -> dict[str, Any]:
    state.require_ready()
    return await state.subnets()


@router.get("/v1/status", response_model=StatusResponse, summary="Queue, load signals and learned corrections")
async def status(state: StateDep) -> dict[str, Any]:
    return await state.status()


def health_response(ok: bool, status: str, detail: str | None = None) -> Response:
    body = {"status": status} if ok else {"status": status, "detail": detail}
    return Response(json.dumps(body), status_code=200 if ok else 503, media_type="application/json")


@router.get(
    "/livez",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "the inference process has exited: restart the server"}},
    summary="Liveness: the server serves HTTP and its inference engine is running",
)
async def livez(state: StateDep) -> Response:
    alive = state.engine.alive
    return health_response(alive, "alive" if alive else "dead", state.engine.load_error)


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "loading, failed or draining"}},
    summary="Readiness: bundle verified, every subnet materialized and warmed up, not draining",
)
async def readyz(state: StateDep) -> Response:
    ready, status = state.health()
    return health_response(ready, status, state.engine.load_error)
