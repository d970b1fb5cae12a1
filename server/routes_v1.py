"""The native API: classify an encoded image under a latency budget; inspect subnets and status; health."""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import json
from typing import Any

import torch
from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.responses import Response

from slimserve.server.engine import Answer
from slimserve.server.errors import ApiError
from slimserve.server.imaging import ImageError, decode_image
from slimserve.server.routes_common import BUDGET_HEADER, ERRORS, BudgetDep, StateDep, budget_parameter
from slimserve.server.schemas import ClassifyResponse, ErrorBody, HealthResponse, StatusResponse, SubnetsResponse
from slimserve.server.state import ServerState

INLINE_DECODE_BYTES = 256 * 1024  # smaller bodies decode on the event loop; larger ones in a thread

router = APIRouter()


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


def top_k(state: ServerState, probabilities: torch.Tensor) -> list[dict[str, Any]]:
    """The ``top_k`` most likely classes, most likely first."""
    # Plain Python on one list: torch.topk and iterating its result tensors took about a third of
    # the front end's time per request (py-spy), for ten numbers.
    values: list[float] = probabilities.tolist()
    best = heapq.nlargest(state.settings.top_k, range(len(values)), key=values.__getitem__)
    names = state.info.class_names
    return [{"index": i, "name": names[i], "probability": round(values[i], 6)} for i in best]


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
    done = await state.classify(image, arrival, budget_ms)
    ranked = top_k(state, done.answer.probabilities)
    subnet, timing = done.subnet, done.timing
    body = {
        "request_id": request.scope["state"]["request_id"],
        "class_index": ranked[0]["index"],
        "class_name": ranked[0]["name"],
        "top_k": ranked,
        "subnet": {
            "id": subnet.id,
            "channels": list(subnet.channels),
            "depths": list(subnet.depths),
            "resolution": subnet.resolution,
            "expected_accuracy": subnet.accuracy,
            "width": round(subnet.width, 4),
            **per_input_fields(state, done.answer),
        },
        "timing": dataclasses.asdict(timing),
    }
    headers = {
        "X-Subnet-Id": subnet.id,
        "X-Replica-Id": state.replica_id,
        "Server-Timing": f"queue;dur={timing.queue_ms}, inference;dur={timing.inference_ms}, total;dur={timing.total_ms}",
    }
    return Response(json.dumps(body), media_type="application/json", headers=headers)


@router.get(
    "/v1/subnets",
    response_model=SubnetsResponse,
    responses={503: {"model": ErrorBody}},
    summary="The subnet table as served",
)
async def subnets(state: StateDep) -> SubnetsResponse:
    state.require_ready()
    return await state.subnets()


@router.get("/v1/status", response_model=StatusResponse, summary="Queue, load signals and learned corrections")
async def status(state: StateDep) -> StatusResponse:
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
