"""The native API: classify an encoded image under a latency budget; inspect subnets and status; health."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile
from starlette.responses import Response

from server.errors import ApiError
from server.imaging import ImageError, decode_image
from server.schemas import ClassifyResponse, ErrorBody, HealthResponse, StatusResponse, SubnetsResponse
from server.state import Answer, ServerState

BUDGET_HEADER = "X-Latency-Budget-Ms"
INLINE_DECODE_BYTES = 256 * 1024  # smaller bodies decode on the event loop; larger ones in a thread

router = APIRouter()


def get_state(request: Request) -> ServerState:
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


def latency_budget(request: Request, state: StateDep) -> float:
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
    assert state.runtime is not None
    channels, height, width = state.runtime.input_shape
    try:
        if len(data) <= INLINE_DECODE_BYTES:
            return decode_image(data, channels, (width, height), state.settings.max_image_pixels)
        return await asyncio.to_thread(decode_image, data, channels, (width, height), state.settings.max_image_pixels)
    except ImageError as error:
        raise ApiError(error.status, str(error)) from None


def result_fields(
    state: ServerState, answer: Answer, budget_ms: float, now: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The classification and the timing of one answered request (shared with the v2 API)."""
    result = answer.result
    top = torch.topk(result.probabilities, min(state.settings.top_k, result.probabilities.shape[0]))
    names = state.runtime.class_names if state.runtime else ()
    ranked = [
        {"index": int(i), "name": names[int(i)], "probability": round(float(p), 6)}
        for p, i in zip(top.values, top.indices, strict=True)
    ]
    total_ms = (now - answer.arrival) * 1000.0
    timing = {
        "preprocess_ms": round((answer.enqueued - answer.arrival) * 1000.0, 3),
        "queue_ms": round(result.queued * 1000.0, 3),
        "inference_ms": round(result.inference * 1000.0, 3),
        "total_ms": round(total_ms, 3),
        "budget_ms": budget_ms,
        "met": total_ms <= budget_ms,
        "batch_size": result.batch_size,
    }
    return {"top_k": ranked}, timing


def record(state: ServerState, answer: Answer, timing: dict[str, Any], now: float) -> None:
    metrics = state.metrics
    metrics.requests.labels("ok", answer.result.subnet.row.id).inc()
    metrics.budget.labels(str(timing["met"]).lower()).inc()
    metrics.queue_seconds.observe(answer.result.queued)
    metrics.total_seconds.observe(timing["total_ms"] / 1000.0)
    if state.scheduler is not None:
        state.scheduler.observe_post_overhead(now - answer.result.finished)


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
    state.require_scheduler()
    arrival = request.scope["state"]["arrival"]
    image = await decode(state, await image_bytes(request, state.settings.max_body_bytes))
    answer = await state.run(image, arrival, budget_ms)
    now = state.clock()
    classes, timing = result_fields(state, answer, budget_ms, now)
    subnet = answer.result.subnet
    best = classes["top_k"][0]
    body = {
        "request_id": request.scope["state"]["request_id"],
        "class_index": best["index"],
        "class_name": best["name"],
        **classes,
        "subnet": {
            "id": subnet.row.id,
            "channels": list(subnet.row.channels),
            "depths": list(subnet.depths),
            "expected_accuracy": subnet.row.accuracy,
            "width": round(subnet.width, 4),
        },
        "timing": timing,
    }
    record(state, answer, timing, now)
    headers = {
        "X-Subnet-Id": subnet.row.id,
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
    scheduler = state.require_scheduler()
    assert state.runtime is not None
    load = scheduler.load()
    corrections = scheduler.latency_model.corrections()
    rows = []
    for served in state.runtime.subnets:
        row = served.row
        profiled = row.latency[state.column]
        rows.append(
            {
                **row.model_dump(include={"id", "origin", "flops", "params", "accuracy", "accuracy_split"}),
                "channels": list(row.channels),
                "depths": list(served.depths),
                "width": round(served.width, 4),
                "correction": round(corrections[served.index], 4),
                "latency": [
                    {
                        "batch_size": batch,
                        "profiled_p50_ms": stat.p50_ms,
                        "predicted_ms": round(
                            scheduler.latency_model.predict(served.index, min(batch, state.settings.max_batch), load)
                            * 1000,
                            4,
                        ),
                    }
                    for batch, stat in sorted(profiled.items())
                ],
            }
        )
    return {"device_profile": state.column, "subnets": rows}


@router.get("/v1/status", response_model=StatusResponse, summary="Queue, load signals and learned corrections")
async def status(state: StateDep) -> dict[str, Any]:
    sample = state.telemetry.latest
    scheduler = state.scheduler
    model = scheduler.latency_model if scheduler else None
    ids = [s.row.id for s in state.runtime.subnets] if state.runtime else []
    return {
        "ready": state.ready,
        "draining": state.draining,
        "policy": state.settings.policy,
        "queue_depth": scheduler.depth if scheduler else 0,
        "arrival_rate_per_s": round(scheduler.arrivals.rate(state.clock()), 3) if scheduler else 0.0,
        "cpu_percent": round(sample.cpu_percent, 2),
        "process_cpu_percent": round(sample.process_cpu_percent, 2),
        "gpu_percent": sample.gpu_percent,
        "gpu_memory_used_mb": sample.gpu_memory_used_mb,
        "gpu_memory_total_mb": sample.gpu_memory_total_mb,
        "load_factor": round(scheduler.load(), 4) if scheduler else 1.0,
        "latency_drift": round(model.drift, 4) if model else 1.0,
        "latency_deviation": round(model.deviation, 4) if model else 0.0,
        "post_overhead_ms": round(scheduler.post_overhead * 1000, 4) if scheduler else 0.0,
        "inference_busy_fraction": round(scheduler.busy_fraction, 4) if scheduler else 0.0,
        "dispatches": scheduler.dispatches if scheduler else 0,
        "corrections": {i: round(c, 4) for i, c in zip(ids, model.corrections(), strict=True)} if model else {},
    }


@router.get("/livez", response_model=HealthResponse, summary="Liveness: the process serves HTTP")
async def livez() -> dict[str, Any]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "loading, failed or draining"}},
    summary="Readiness: bundle verified, every subnet materialized and warmed up, not draining",
)
async def readyz(state: StateDep) -> Response:
    if state.ready and not state.draining:
        return Response(json.dumps({"status": "ready"}), media_type="application/json")
    status_text = "draining" if state.draining else ("failed" if state.load_error else "loading")
    return Response(
        json.dumps({"status": status_text, "detail": state.load_error}), status_code=503, media_type="application/json"
    )
