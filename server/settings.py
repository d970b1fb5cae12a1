"""Server configuration: environment variables prefixed ``SLIMSERVE_`` or ``slimserve serve`` flags.

Contradictory limits are refused at start-up, with the setting named, rather than discovered under
load.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from slimserve.models.devices import DEVICE_NAME
from slimserve.models.schema import COLUMN_NAME

# On an H200 with 16 cores one front end held 88-91% of bursty 300 req/s in a 6/8/20 ms budget mix,
# two 99.2-99.8% and three 99.4-99.9% (docs/BENCHMARKS.md, GPU): the HTTP path, not the GPU, was full.
GPU_FRONTENDS = 3


def default_frontends(device: str, cores: int, inference_process: bool) -> int:
    """Front ends when none are asked for: on the CPU one, since inference's threads want every core
    and parsing on another would take them; on a GPU inference needs one core and the HTTP path
    the rest, up to :data:`GPU_FRONTENDS`."""
    if device == "cpu" or not inference_process:
        return 1
    return max(1, min(GPU_FRONTENDS, cores - 1))


DEMO_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "demo"


class Settings(BaseSettings):
    """Every knob of ``slimserve serve``; the description is what ``--help`` prints."""

    model_config = SettingsConfigDict(env_prefix="SLIMSERVE_", frozen=True, extra="forbid")

    bundle: Path = Field(DEMO_BUNDLE, description="bundle directory (weights.safetensors, subnets.json, manifest.json)")
    host: str = Field("127.0.0.1", description="address to bind; loopback by default, set 0.0.0.0 deliberately")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    device: str = Field("cpu", description="inference device: cpu, cuda or cuda:N")
    threads: int = Field(2, ge=1, le=256, description="torch intra-op threads for inference")
    policy: str = Field("adaptive", description="subnet policy: adaptive, largest-that-fits, or static:<subnet id>")
    default_budget_ms: float = Field(
        100.0, gt=0, description="latency budget when a request sends no X-Latency-Budget-Ms"
    )
    max_budget_ms: float = Field(60_000.0, gt=0, description="largest accepted budget; larger ones get 422")
    max_batch: int = Field(32, ge=1, le=1024, description="most requests one inference call may batch")
    max_queue: int = Field(256, ge=1, description="queued requests beyond which new ones get 503 + Retry-After")
    infeasible_action: Literal["best-effort", "reject"] = Field(
        "best-effort",
        description="a request no subnet can serve in time: best-effort runs the fastest subnet and reports "
        "met=false; reject answers 504 without running the model",
    )
    # What a client on the same host adds beyond the server's own total (sending, reading, its own
    # scheduling), measured with Locust on this project's 2-core machine at 20-250 req/s: p50
    # 1.2-1.5 ms, p95 2.4-3.9 ms (docs/BENCHMARKS.md, "Time the server cannot see"). At 1 ms the
    # adaptive policy filled tight budgets to the edge and missed a third of them at light load.
    # Lower it for a dedicated client machine on a fast network, raise it for a slow one.
    safety_margin_ms: float = Field(
        3.0, ge=0, description="subtracted from every budget for time the server cannot see (client, network)"
    )
    tail_k: float = Field(
        2.0, ge=0, description="latency prediction = mean x (1 + tail_k x learned relative deviation)"
    )
    utilization: float = Field(
        0.85, gt=0, le=1, description="adaptive policy: target busy share of the inference worker"
    )
    miss_penalty: float = Field(
        3.0,
        ge=0,
        le=100,
        description="adaptive policy: what a deadline miss an upgrade causes others costs, in accuracies of the "
        "fastest subnet (1: the most expected in-time accuracy; higher: fewer misses, narrower subnets)",
    )
    split_batches: bool = Field(
        False,
        description="adaptive policy: weigh running a tight request with fewer of the looser ones behind it, "
        "leaving those to a next batch on a wider subnet, against one batch on the tight one's subnet (off: "
        "+0.03 point in simulation on a GPU, -0.2 to +0.1 on a CPU with hiccups; docs/RESULTS.md)",
    )
    load_sensitivity: float = Field(
        1.0,
        ge=0,
        le=2,
        description="how strongly CPU/GPU load from other processes inflates predicted latency (0 = ignore)",
    )
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="largest request body; larger ones get 413")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="largest request line + headers; larger ones get 431/400"
    )
    http_parser: Literal["h11", "httptools"] = Field(
        "httptools",
        description="HTTP/1.1 parser: httptools (C, several times faster; request line and headers bounded by "
        "max_header_bytes while parsing, server/http_protocol.py) or h11 (pure Python)",
    )
    max_image_pixels: int = Field(
        16 * 2**20, ge=1, description="largest decoded image (width x height); larger ones get 413"
    )
    top_k: int = Field(5, ge=1, description="classes returned with probabilities")
    pause_batches: bool = Field(
        True,
        description="pause a running batch between two of its steps (residual blocks) to run requests that would "
        "miss their deadline waiting for it, then resume it (off: every batch runs whole). CPU only: on a GPU "
        "a whole batch of the demo table takes 0.6-1.8 ms and stepping it costs 15-18 percent (docs/BENCHMARKS.md, GPU)",
    )
    count_pauses: bool = Field(
        False,
        description="adaptive policy: price the misses a wide batch causes requests arriving during it as if each "
        "waits for one step, not the whole batch (the server pauses for it when the batch leaves time; needs "
        "pause_batches). The measured collateral rate still prices the misses pausing fails to save. Off: on two "
        "cores shared with the front end it ran wider rows at 20 req/s for +0.1-0.2 point and kept 99.0 percent "
        "of budgets instead of 99.7-99.9 (docs/RESULTS.md); meant for front ends with cores of their own",
    )
    anytime: bool = Field(
        True,
        description="multi-stage bundles: answer a request with the stage it reached when the next stage would miss "
        "its deadline (off: it runs to its exit stage and may answer late)",
    )
    model_name: str | None = Field(None, description="name in the KServe v2 API (default: the bundle's manifest name)")
    drain_seconds: float = Field(10.0, ge=0, description="on SIGTERM, how long in-flight requests may take to finish")
    keep_alive_seconds: float = Field(
        75.0,
        gt=0,
        description="idle keep-alive connection timeout; keep it above the idle timeout of pooled clients and load "
        "balancers in front, or a request sent on a connection the server is just closing gets no answer",
    )
    max_connections: int = Field(1024, ge=1, description="concurrent connections; beyond this, 503 at the HTTP layer")
    listen_backlog: int = Field(
        2048, ge=1, description="connections the kernel queues before the server accepts them (capped by somaxconn)"
    )
    frontend_delay_target_ms: float = Field(
        2.0,
        ge=0,
        description="while the event loop's smallest lag over the last 100 ms exceeds this, the front end holds "
        "a standing queue and answers new requests 503 + Retry-After (CoDel's rule, server/admission.py); 0: off. "
        "Only with inference in its own process",
    )
    inference_process: bool = Field(
        True,
        description="slimserve serve: run inference in a process of its own, so HTTP parsing and decoding never "
        "share an interpreter or the GIL with it (off: a thread of the HTTP process, as create_app does)",
    )
    inference_openmp_spin: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description="slimserve serve: GOMP_SPINCOUNT of the inference process, iterations an idle OpenMP worker spins "
        "before it sleeps (~0.1 ms at 10000 on the demo machine), each thread bound to a core (OMP_PROC_BIND=true); two "
        "threads then share a batch on its main thread. Profile the table the same way (docs/BENCHMARKS.md, Threads and "
        "OpenMP waiting). 0: they sleep at once (OMP_WAIT_POLICY=PASSIVE). An OpenMP wait setting in the environment "
        "wins (needs inference_process)",
    )
    latency_column: str = Field(
        "",
        pattern=rf"^(?:{COLUMN_NAME})?$",
        description="the table's latency column to predict from and take each row's threads from (a column "
        "`slimserve profile --column` wrote, e.g. one profiled with inference_openmp_spin); empty: the column measured "
        "on this device with these threads",
    )
    inference_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="slimserve serve: niceness of the inference process; above 0 the front ends (and the rest of "
        "the machine) get a core first when they and a long batch both want one (needs inference_process)",
    )
    frontends: int = Field(
        0,
        ge=0,
        le=64,
        description="slimserve serve: HTTP front-end processes sharing the port, each parsing and decoding on its "
        "own core, all served by the one inference process (needs inference_process). 0: one where inference "
        "runs on the CPU (it wants every core), on a GPU up to 3 with a core left to inference "
        "(docs/BENCHMARKS.md, GPU)",
    )
    gil_switch_interval_ms: float = Field(
        5.0,
        gt=0,
        le=100,
        description="Python's GIL switch interval where inference runs: with inference in the HTTP process, how "
        "long the event loop may hold the GIL while the inference thread waits for it (5 ms is Python's default; "
        "see docs/BENCHMARKS.md)",
    )
    telemetry_interval: float = Field(0.25, gt=0, description="seconds between CPU/GPU utilization samples")
    verify_hashes: bool = Field(True, description="check the bundle's SHA-256 digests before serving")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")

    @property
    def frontend_processes(self) -> int:
        """How many front ends ``slimserve serve`` runs: ``frontends``, or the default for this
        device and the cores this process may use."""
        if self.frontends:
            return self.frontends
        return default_frontends(self.device, len(os.sched_getaffinity(0)), self.inference_process)

    @field_validator("policy")
    @classmethod
    def _policy_syntax(cls, value: str) -> str:
        if value in ("adaptive", "largest-that-fits") or re.fullmatch(r"static:[A-Za-z0-9_.-]{1,64}", value):
            return value
        raise ValueError(f"policy must be adaptive, largest-that-fits or static:<subnet id>, got {value!r}")

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        if re.fullmatch(DEVICE_NAME, value):  # whether this machine has it: the inference process checks
            return value
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {value!r}")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_budget_ms > self.max_budget_ms:
            raise ValueError(
                f"default_budget_ms ({self.default_budget_ms}) exceeds max_budget_ms ({self.max_budget_ms})"
            )
        if self.safety_margin_ms >= self.default_budget_ms:
            raise ValueError("safety_margin_ms must be smaller than default_budget_ms")
        if self.frontends > 1 and not self.inference_process:
            raise ValueError("frontends > 1 needs inference_process: each front end talks to the inference process")
        if self.max_queue < self.max_batch:
            raise ValueError(f"max_queue ({self.max_queue}) must be at least max_batch ({self.max_batch})")
        return self
