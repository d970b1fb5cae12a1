"""KServe Open Inference Protocol v2 over HTTP/REST, so existing clients (tritonclient, KServe) work.

Input: one tensor of shape ``[batch, C, H, W]`` (or ``[C, H, W]``), datatype UINT8 (pixel values
0-255) or FP32 (pixel intensities in [0, 1], quantized to 8 bits like any image), as JSON ``data``
or with the binary-data extension (``Inference-Header-Content-Length``). The latency budget comes
from request ``parameters.latency_budget_ms`` or the ``X-Latency-Budget-Ms`` header. Outputs:
``probabilities`` (FP32 ``[batch, classes]``) and ``class_index`` (INT64 ``[batch]``); response
``parameters`` name the subnet(s) used and the timings. Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response

from slimserve.server.errors import ApiError
from slimserve.server.routes_common import BUDGET_HEADER, ERRORS, StateDep, budget_parameter, parse_budget
from slimserve.server.schemas import (
    ErrorBody,
    OipInferenceRequest,
    OipInferenceResponse,
    OipModelMetadata,
    OipServerMetadata,
)
from slimserve.server.state import ServerState

router = APIRouter(prefix="/v2", tags=["KServe v2 (Open Inference Protocol)"])
SERVER_VERSION = "0.1.0"
INPUT_NAME = "input"
OUTPUTS = ("probabilities", "class_index")
DATATYPES = {"UINT8": np.uint8, "FP32": np.float32}


def _model(state: ServerState, name: str) -> ServerState:
    if name != state.model_name:
        raise ApiError(404, f"unknown model {name!r}; this server serves {state.model_name!r}")
    return state


@router.get("", response_model=OipServerMetadata, summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "slimserve", "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Server live", responses={503: {"description": "inference process exited"}})
async def live(state: StateDep) -> Response:
    alive = state.engine.alive
    return Response(json.dumps({"live": alive}), status_code=200 if alive else 503, media_type="application/json")


@router.get("/health/ready", summary="Server ready", responses={503: {"description": "not ready"}})
async def ready(state: StateDep) -> Response:
    ok, _ = state.health()
    return Response(json.dumps({"ready": ok}), status_code=200 if ok else 503, media_type="application/json")


@router.get(
    "/models/{name}", response_model=OipModelMetadata, responses={404: {"model": ErrorBody}}, summary="Model metadata"
)
async def model_metadata(name: str, state: StateDep) -> dict[str, Any]:
    _model(state, name)
    channels, height, width = state.info.input_shape
    return {
        "name": state.model_name,
        "versions": [],
        "platform": "pytorch",
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, channels, height, width]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(state.info.class_names)]},
            {"name": "class_index", "datatype": "INT64", "shape": [-1]},
        ],
        "parameters": {
            "input_datatypes": "UINT8 (0-255) or FP32 (0-1)",
            "latency_budget_parameter": "latency_budget_ms",
            "class_names": ",".join(state.info.class_names),
            "subnets": ",".join(subnet.id for subnet in state.info.subnets),
        },
    }


@router.get(
    "/models/{name}/ready",
    summary="Model ready",
    responses={404: {"model": ErrorBody}, 503: {"description": "not ready"}},
)
async def model_ready(name: str, state: StateDep) -> Response:
    _model(state, name)
    return await ready(state)


async def _parse(request: Request) -> tuple[OipInferenceRequest, bytes]:
    body = await request.body()
    header_length = request.headers.get("inference-header-content-length")
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ApiError(400, "Inference-Header-Content-Length must be a byte count within the body")
        body, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        return OipInferenceRequest.model_validate_json(body), binary
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"invalid inference request: {where}: {first['msg']}") from None


def _tensor(state: ServerState, inference: OipInferenceRequest, binary: bytes) -> torch.Tensor:
    """The request's one input as uint8 ``[batch, C, H, W]``, or a 400 that says what does not fit."""
    if len(inference.inputs) != 1:
        raise ApiError(400, f"expected exactly one input tensor named {INPUT_NAME!r}, got {len(inference.inputs)}")
    tensor = inference.inputs[0]
    if tensor.datatype not in DATATYPES:
        raise ApiError(400, f"input datatype {tensor.datatype!r} is not supported; use UINT8 or FP32")
    expected = tuple(state.info.input_shape)
    shape = tuple(tensor.shape)
    if shape == expected:
        shape = (1, *shape)
    if len(shape) != 4 or shape[1:] != expected or not 1 <= shape[0] <= state.settings.max_batch:
        raise ApiError(
            400,
            f"input shape {list(tensor.shape)} does not match [batch, {', '.join(map(str, expected))}] with 1 <= batch <= {state.settings.max_batch}",
        )
    count = math.prod(shape)
    dtype = DATATYPES[tensor.datatype]
    size = (tensor.parameters or {}).get("binary_data_size")
    try:
        if size is not None:
            if not isinstance(size, int) or size != len(binary) or size != count * np.dtype(dtype).itemsize:
                raise ApiError(400, f"binary_data_size {size!r} does not match the shape and the bytes sent")
            array = np.frombuffer(binary, dtype=dtype)
        else:
            array = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ApiError(400, "input data must be numbers (a flat or nested JSON array)") from None
    if array.size != count:
        raise ApiError(400, f"input data holds {array.size} values; shape {list(tensor.shape)} needs {count}")
    if not np.all(np.isfinite(array)):
        raise ApiError(400, "input data contains NaN or infinity")
    if tensor.datatype == "FP32":
        if array.min() < 0 or array.max() > 1:
            raise ApiError(400, "FP32 input must hold pixel intensities in [0, 1]")
        array = np.rint(array * 255.0)
    elif array.min() < 0 or array.max() > 255 or not np.all(array == np.round(array)):
        raise ApiError(400, "UINT8 input must hold integers in [0, 255]")
    return torch.from_numpy(array.astype(np.uint8).reshape(shape))


@router.post(
    "/models/{name}/infer",
    response_model=OipInferenceResponse,
    responses={
        **ERRORS,
        400: {"model": ErrorBody, "description": "malformed inference request"},
        404: {"model": ErrorBody},
    },
    summary="Inference (Open Inference Protocol)",
    openapi_extra={"parameters": [budget_parameter(60_000.0)]},
)
async def infer(name: str, request: Request, state: StateDep) -> Response:
    _model(state, name)
    state.require_ready()
    arrival = request.scope["state"]["arrival"]
    inference, binary = await _parse(request)
    parameters = inference.parameters or {}
    budget_value = parameters.get("latency_budget_ms")
    if budget_value is not None and (isinstance(budget_value, bool) or not isinstance(budget_value, (int, float, str))):
        raise ApiError(422, "parameters.latency_budget_ms must be a number of milliseconds")
    budget_ms = parse_budget(
        [str(budget_value)] if budget_value is not None else request.headers.getlist(BUDGET_HEADER),
        state.settings.default_budget_ms,
        state.settings.max_budget_ms,
    )
    wanted = [o.name for o in inference.outputs] if inference.outputs else list(OUTPUTS)
    unknown = [n for n in wanted if n not in OUTPUTS]
    if unknown:
        raise ApiError(400, f"unknown output(s) {unknown}; available: {list(OUTPUTS)}")
    state.require_feasible(budget_ms)
    images = _tensor(state, inference, binary)
    done = await asyncio.gather(*(state.classify(image, arrival, budget_ms) for image in images))
    answers = [d.answer for d in done]
    probabilities = torch.stack([a.probabilities for a in answers])
    outputs = {
        "probabilities": {
            "name": "probabilities",
            "shape": list(probabilities.shape),
            "datatype": "FP32",
            "data": probabilities.flatten().tolist(),
        },
        "class_index": {
            "name": "class_index",
            "shape": [len(answers)],
            "datatype": "INT64",
            "data": probabilities.argmax(1).tolist(),
        },
    }
    subnet_ids = [d.subnet.id for d in done]
    subnet_id = subnet_ids[0] if len(set(subnet_ids)) == 1 else ",".join(subnet_ids)
    body: dict[str, Any] = {
        "model_name": state.model_name,
        "id": inference.id,
        "parameters": {
            "subnet_id": subnet_id,
            "latency_budget_ms": budget_ms,
            "queue_ms": max(d.timing.queue_ms for d in done),
            "inference_ms": max(d.timing.inference_ms for d in done),
            "total_ms": max(d.timing.total_ms for d in done),
            "met": all(d.timing.met for d in done),
            **({"exit_stages": [a.stage + 1 for a in answers]} if answers[0].stage >= 0 else {}),
            **({"blocks_run": [a.blocks_run for a in answers]} if answers[0].blocks_run >= 0 else {}),
        },
        "outputs": [outputs[n] for n in wanted],
    }
    if body["id"] is None:
        del body["id"]
    return Response(
        json.dumps(body), media_type="application/json", headers={"X-Subnet-Id": body["parameters"]["subnet_id"]}
    )
