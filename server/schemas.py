"""Response shapes: what the engine reports (status, the subnets as served) and what the API answers;
for the OpenAPI document (/docs), the engine <-> front end replies and schema-conformance tests."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str = Field(description="what went wrong, naming the field or header at fault")
    request_id: str | None = Field(None, description="matches the X-Request-Id response header and the server log")


class ClassScore(BaseModel):
    index: int
    name: str
    probability: float


class ExitUsed(BaseModel):
    stage: int = Field(description="the stage that answered, 1-based")
    stages: int = Field(description="stages of the multi-stage network")
    confidence: float = Field(description="that stage's top softmax probability")
    anytime: bool = Field(
        description="true: answered before its confidence sufficed, because the next stage would have missed the budget"
    )


class GatesUsed(BaseModel):
    blocks_run: int = Field(description="residual blocks whose branch ran for this image")
    blocks: int = Field(description="residual blocks of the gated network")
    channel_groups_run: float = Field(
        description="share of the blocks' channel groups computed for this image (skipped blocks count as 0)"
    )


class SubnetUsed(BaseModel):
    id: str = Field(description="row id in the subnet table (also in the X-Subnet-Id header)")
    channels: list[int] = Field(description="channel count per prunable unit (0: that residual block is skipped)")
    depths: list[int] = Field(description="residual blocks run per stage")
    resolution: int = Field(description="input width the subnet ran at (the image is shrunk to it first)")
    expected_accuracy: float = Field(description="top-1 of this subnet on the bundle's test split")
    width: float = Field(description="mean share of channels kept (1.0 = full network)")
    exit: ExitUsed | None = Field(
        None, description="multi-stage (S2DNAS) bundles only: how the request left the network"
    )
    gates: GatesUsed | None = Field(None, description="gated (LC-Net) bundles only: what this image's gates ran")


class Timing(BaseModel):
    preprocess_ms: float = Field(description="reading and decoding the body")
    queue_ms: float = Field(description="waiting in the deadline-ordered queue")
    inference_ms: float = Field(description="the batched forward pass this request was part of")
    total_ms: float = Field(description="server-side, from arrival (the request's first bytes read) to response")
    budget_ms: float = Field(description="the budget applied (header or default)")
    met: bool = Field(description="total_ms <= budget_ms")
    batch_size: int = Field(description="requests in the same forward pass")


class ClassifyResponse(BaseModel):
    request_id: str
    class_index: int
    class_name: str
    top_k: list[ClassScore]
    subnet: SubnetUsed
    timing: Timing


class LatencyEstimate(BaseModel):
    batch_size: int
    profiled_p50_ms: float
    predicted_ms: float = Field(
        description="what the scheduler assumes now: profiled x learned corrections x load, with tail margin"
    )


class SubnetInfo(BaseModel):
    id: str
    channels: list[int]
    depths: list[int]
    resolution: int = Field(description="input width the subnet runs at (the image is shrunk to it first)")
    origin: str
    flops: int
    params: int
    accuracy: float
    accuracy_split: str
    width: float
    correction: float = Field(description="learned multiplier on the profiled latency")
    latency: list[LatencyEstimate]


class SubnetsResponse(BaseModel):
    device_profile: str = Field(description="which latency column of the table this server uses")
    subnets: list[SubnetInfo]


class StatusResponse(BaseModel):
    ready: bool
    draining: bool
    policy: str
    queue_depth: int
    arrival_rate_per_s: float
    cpu_percent: float
    process_cpu_percent: float
    gpu_percent: float | None
    gpu_memory_used_mb: float | None
    gpu_memory_total_mb: float | None
    load_factor: float
    latency_drift: float
    latency_deviation: float
    post_overhead_ms: float
    safety_margin_ms: float = Field(description="taken off every budget for time the server cannot see")
    inference_busy_fraction: float
    dispatches: int
    corrections: dict[str, float]


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None


class OipServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OipTensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class OipModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[OipTensorMetadata]
    outputs: list[OipTensorMetadata]
    parameters: dict[str, Any] = {}


class OipRequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class OipRequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class OipInferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[OipRequestInput] = Field(min_length=1)
    outputs: list[OipRequestOutput] | None = None


class OipResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class OipInferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any]
    outputs: list[OipResponseOutput]
