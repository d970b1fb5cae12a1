"""Everything one server process holds, and its life: load, warm up, serve, drain, stop."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from models.bundle import Bundle, load_bundle
from server import imaging
from server.errors import ApiError
from server.latency_model import LatencyModel, LatencyModelConfig
from server.metrics import Metrics
from server.policy import Policy, parse_policy
from server.runtime import ModelRuntime
from server.scheduler import DeadlineMissed, Job, JobResult, Rejected, Scheduler
from server.settings import Settings
from server.telemetry import NvmlProbe, Telemetry

log = logging.getLogger(__name__)


def matching_column(bundle: Bundle, settings: Settings) -> str | None:
    """The table's latency column measured on this kind of device with the server's threads, if any."""
    for name, profile in bundle.table.devices.items():
        if profile.device.split(":")[0] == settings.device.split(":")[0] and profile.threads == settings.threads:
            return name
    return None


def latency_column(bundle: Bundle, settings: Settings) -> str:
    """The table's latency column measured on this kind of device, else the primary one (with a warning)."""
    table = bundle.table
    matching = matching_column(bundle, settings)
    if matching is not None:
        return matching
    log.warning(
        "the table has no latency column for %s with %d threads (has %s); using %s and learning the difference online",
        settings.device, settings.threads, ", ".join(table.devices), table.primary_device,
    )  # fmt: skip
    return table.primary_device


@dataclass(frozen=True)
class Answer:
    result: JobResult
    arrival: float
    enqueued: float


class ServerState:
    """Settings, metrics and telemetry exist from the start; the model parts once loaded."""

    def __init__(
        self, settings: Settings, bundle: Bundle | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()
        gpu = (
            NvmlProbe(int(settings.device.split(":")[1]) if ":" in settings.device else 0)
            if settings.device.startswith("cuda")
            else None
        )
        self.telemetry = Telemetry(settings.telemetry_interval, gpu)
        self.bundle = bundle
        self.runtime: ModelRuntime | None = None
        self.scheduler: Scheduler | None = None
        self.policy: Policy | None = None
        self.column = ""
        self.ready = False
        self.warmup_seconds = 0.0
        self.load_error: str | None = None
        self.replica_id = uuid.uuid4().hex[:8]  # tells replicas apart behind a load balancer
        self._loader: threading.Thread | None = None

    @property
    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        return self.bundle.manifest.name if self.bundle else "slimserve"

    @property
    def draining(self) -> bool:
        return self.scheduler is not None and self.scheduler.draining

    # --- lifecycle ----------------------------------------------------------------------------

    def verify(self) -> None:
        """Fast, synchronous part of start-up: read and verify the bundle (errors stop the process)."""
        if self.bundle is None:
            self.bundle = load_bundle(
                self.settings.bundle, verify=self.settings.verify_hashes, device=self.settings.device
            )
        rows = self.bundle.table.subnets
        parse_policy(self.settings.policy, [row.id for row in rows], [row.accuracy for row in rows])

    def start_loading(self) -> None:
        """Slow part in the background, so /livez answers and /readyz says 503 meanwhile."""
        self.telemetry.start()
        self._loader = threading.Thread(target=self._load, name="slimserve-loader", daemon=True)
        self._loader.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.ready

    def _load(self) -> None:
        try:
            assert self.bundle is not None
            settings = self.settings
            self.column = latency_column(self.bundle, settings)
            # Run each subnet with the threads its profile found best, when it profiled this setup.
            runtime = ModelRuntime(
                self.bundle, settings.device, settings.threads, matching_column(self.bundle, settings)
            )
            self.warmup_seconds = runtime.warm_up(settings.max_batch)
            imaging.warm_up(runtime.input_shape[0], (runtime.input_shape[2], runtime.input_shape[1]))
            rows = self.bundle.table.subnets
            profiled = [{b: stat.p50_ms for b, stat in row.latency[self.column].items()} for row in rows]
            spreads = [s.p95_ms / s.p50_ms - 1 for row in rows for s in row.latency[self.column].values()]
            latency_model = LatencyModel(
                profiled,
                settings.max_batch,
                initial_deviation=sorted(spreads)[len(spreads) // 2],
                config=LatencyModelConfig(tail_k=settings.tail_k),
            )
            self.policy = parse_policy(
                settings.policy, [row.id for row in rows], [row.accuracy for row in rows], settings.utilization
            )
            self.runtime = runtime
            self.scheduler = Scheduler(
                runtime, self.policy, latency_model, settings, self.telemetry, self.metrics, self.clock
            )
            # The inference thread needs the GIL between torch ops, which a busy event loop holds
            # for up to the switch interval at a time; a knob because the right value depends on
            # the machine (docs/BENCHMARKS.md, "GIL hand-off").
            sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
            self.scheduler.start()
            self.ready = True
            self.metrics.ready.set(1)
            log.info(
                "ready: %d subnets materialized in %.2f s, warmed up in %.2f s; policy %s; latency column %s",
                len(rows), runtime.materialize_seconds, self.warmup_seconds, self.policy.name, self.column,
            )  # fmt: skip
        except Exception as error:
            self.load_error = f"{type(error).__name__}: {error}"
            log.exception("loading the model failed")

    def begin_drain(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self.scheduler is not None:
            self.scheduler.begin_drain()

    def shutdown(self) -> None:
        self.begin_drain()
        if self.scheduler is not None and not self.scheduler.stop(self.settings.drain_seconds):
            log.warning("inference worker still busy after %.1f s of draining", self.settings.drain_seconds)
        self.telemetry.stop()

    # --- serving ------------------------------------------------------------------------------

    def shed_retry_after(self) -> int | None:
        """Retry-After seconds if a new inference request must be refused right now (queue full)."""
        scheduler = self.scheduler
        if scheduler is None or not scheduler.full:
            return None
        return scheduler.retry_after()

    def count_shed(self) -> None:
        self.metrics.requests.labels("rejected", "").inc()

    def require_scheduler(self) -> Scheduler:
        if self.draining:
            raise ApiError(503, "server is shutting down", {"Retry-After": "1"})
        if not self.ready or self.scheduler is None:
            detail = f"model failed to load: {self.load_error}" if self.load_error else "model is loading"
            raise ApiError(503, detail, {"Retry-After": "1"})
        return self.scheduler

    async def run(self, image: Tensor, arrival: float, budget_ms: float) -> Answer:
        """Queue one image and wait for its result; scheduler rejections become API errors."""
        scheduler = self.require_scheduler()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[JobResult | Rejected] = loop.create_future()

        def deliver(outcome: JobResult | Rejected) -> None:
            if not future.done():
                future.set_result(outcome)

        def resolve(outcome: JobResult | Rejected) -> None:
            loop.call_soon_threadsafe(deliver, outcome)

        job = Job(image=image, arrival=arrival, budget=budget_ms / 1000.0, resolve=resolve, cancelled=future.cancelled)
        try:
            scheduler.submit(job)
        except Rejected as rejection:
            raise self._as_api_error(rejection) from None
        outcome = await future
        if isinstance(outcome, Rejected):
            raise self._as_api_error(outcome)
        return Answer(outcome, arrival, job.enqueued)

    def _as_api_error(self, rejection: Rejected) -> ApiError:
        outcome = "deadline" if isinstance(rejection, DeadlineMissed) else "rejected"
        self.metrics.requests.labels(outcome, "").inc()
        headers = {"Retry-After": str(rejection.retry_after)} if rejection.retry_after else None
        return ApiError(rejection.status, str(rejection), headers)
