"""The inference engine of one device: the materialized subnets, the scheduler, the metrics.

It is everything the server holds that is not HTTP, and it runs either in the HTTP process (a
worker thread; tests, Ray Serve, ``uvicorn --factory``) or in a process of its own behind
``slimserve serve`` (server/engine_host.py), where the inference loop has the interpreter, the
GIL and OpenMP's main-thread team to itself. The front end talks to it through a handle
(server/engine_client.py) that is the same in both cases, and sees only plain data: the
:class:`ModelInfo` it needs to validate and answer requests, and an :class:`Answer` per request.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import generate_latest
from torch import Tensor

from slimserve.models.bundle import Bundle, load_bundle
from slimserve.models.devices import device_problem
from slimserve.models.schema import BundleError, SubnetRow
from slimserve.server.latency_model import LatencyModel, LatencyModelConfig
from slimserve.server.metrics import Metrics
from slimserve.server.policy import Policy, parse_policy
from slimserve.server.refusals import Refused, Rejected
from slimserve.server.runtime import ModelRuntime
from slimserve.server.scheduler import Job, JobResult, Scheduler
from slimserve.server.schemas import LatencyEstimate, StatusResponse, SubnetsResponse
from slimserve.server.schemas import SubnetInfo as SubnetView
from slimserve.server.settings import Settings
from slimserve.server.telemetry import NvmlProbe, Telemetry

log = logging.getLogger(__name__)


def matching_column(bundle: Bundle, settings: Settings) -> str | None:
    """The table's latency column measured on this kind of device, if any: the one the setting
    ``latency_column`` names, else on a CPU the one with the server's threads (they set its speed),
    on a GPU the one whatever threads it was profiled with."""
    kind = settings.device.split(":")[0]
    of_kind = {name: p for name, p in bundle.table.devices.items() if p.device.split(":")[0] == kind}
    if settings.latency_column:
        if settings.latency_column not in of_kind:
            raise BundleError(
                f"{bundle.path}: latency_column {settings.latency_column!r} is not a {kind} column of its table "
                f"(its {kind} columns: {', '.join(of_kind) or 'none'})"
            )
        return settings.latency_column
    for name, profile in of_kind.items():
        if kind == "cuda" or profile.threads == settings.threads:
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
class SubnetInfo:
    """What a response says about the subnet that answered it."""

    index: int  # position in the table: 0 is the fastest
    id: str
    channels: tuple[int, ...]
    depths: tuple[int, ...]
    width: float  # mean share of channels kept
    accuracy: float
    resolution: int  # the input width it runs at (elastic resolution; the input's own otherwise)


@dataclass(frozen=True)
class ModelInfo:
    """What the front end needs to know about the model to validate requests and build responses."""

    name: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]  # C, H, W
    column: str  # the table's latency column the scheduler starts from
    subnets: tuple[SubnetInfo, ...]
    stages: int = 0  # a multi-stage bundle's stage count; 0 = a subnet table
    gated_blocks: int = 0  # a gated bundle's residual blocks (each may be skipped per image); 0 = not gated

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        subnets = tuple(
            SubnetInfo(**{**s, "channels": tuple(s["channels"]), "depths": tuple(s["depths"])}) for s in data["subnets"]
        )
        channels, height, width = data["input_shape"]
        return cls(
            data["name"], tuple(data["class_names"]), (channels, height, width), data["column"], subnets, data["stages"],
            data["gated_blocks"],
        )  # fmt: skip

    @classmethod
    def of(cls, bundle: Bundle, settings: Settings) -> ModelInfo:
        manifest, space = bundle.manifest, bundle.supernet.space
        subnets = tuple(
            SubnetInfo(
                index,
                row.id,
                tuple(row.channels),
                tuple(space.depths(row.channels)),
                float(space.width_of(row.channels)),
                row.accuracy,
                row.resolution or manifest.input.width,
            )
            for index, row in enumerate(bundle.table.subnets)
        )
        return cls(
            settings.model_name or manifest.name,
            tuple(manifest.class_names),
            (manifest.input.channels, manifest.input.height, manifest.input.width),
            latency_column(bundle, settings),
            subnets,
            bundle.staged.num_stages if bundle.staged is not None else 0,
            len(bundle.gated.block_list) if bundle.gated is not None else 0,
        )


@dataclass(frozen=True)
class Answer:
    """The outcome of one request that ran: plain numbers, the same in and across processes."""

    probabilities: Tensor  # [classes], float32
    subnet: int  # index into ModelInfo.subnets
    batch_size: int
    enqueued: float  # clock when queued
    queued: float  # seconds from enqueue to dispatch
    inference: float  # seconds the batch took
    finished: float  # clock when the batch ended
    predicted: float  # seconds the policy expected the batch to take
    stage: int = -1  # multi-stage bundles: the stage (0-based) that answered; -1 otherwise
    cut_short: bool = False  # answered before its exit stage because its deadline forbade the next
    blocks_run: int = -1  # gated bundles: residual blocks whose branch ran for this image; -1 otherwise
    groups_run: float = -1.0  # gated bundles: share of the blocks' channel groups computed for it

    @classmethod
    def of(cls, result: JobResult, enqueued: float) -> Answer:
        return cls(
            result.probabilities, result.subnet.index, result.batch_size, enqueued, result.queued, result.inference,
            result.finished, result.predicted, result.stage, result.cut_short, result.blocks_run, result.groups_run,
        )  # fmt: skip


Deliver = Callable[[Answer | Rejected], None]


def profiled_ms(rows: Sequence[SubnetRow], column: str) -> list[dict[int, float]]:
    """Each row's median latency (ms) per profiled batch size, from the table's ``column``."""
    return [{b: stat.p50_ms for b, stat in row.latency[column].items()} for row in rows]


def scheduling(settings: Settings, rows: Sequence[SubnetRow], column: str) -> tuple[Policy, LatencyModel]:
    """The policy and the latency model that ``settings`` schedule ``rows`` with, from the table's
    latency ``column`` (the server's and the simulator's, server/simulation.py)."""
    profiled = profiled_ms(rows, column)
    spreads = [s.p95_ms / s.p50_ms - 1 for row in rows for s in row.latency[column].values()]
    latency_model = LatencyModel(
        profiled,
        settings.max_batch,
        initial_deviation=sorted(spreads)[len(spreads) // 2],
        config=LatencyModelConfig(tail_k=settings.tail_k),
    )
    policy = parse_policy(
        settings.policy,
        [row.id for row in rows],
        [row.accuracy for row in rows],
        settings.utilization,
        settings.miss_penalty,
        settings.split_batches,
    )
    return policy, latency_model


class Engine:
    """One device's model and scheduler. :meth:`open` verifies (fast, fails loudly); :meth:`load`
    materializes and warms up (slow); then :meth:`submit` queues requests."""

    def __init__(self, settings: Settings, bundle: Bundle, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.bundle = bundle
        self.clock = clock
        rows = bundle.table.subnets
        parse_policy(settings.policy, [row.id for row in rows], [row.accuracy for row in rows])
        self.info = ModelInfo.of(bundle, settings)
        self.metrics = Metrics()
        gpu = (
            NvmlProbe(int(settings.device.split(":")[1]) if ":" in settings.device else 0)
            if settings.device.startswith("cuda")
            else None
        )
        self.telemetry = Telemetry(settings.telemetry_interval, gpu)
        self.runtime: ModelRuntime | None = None
        self.scheduler: Scheduler | None = None
        self.policy: Policy | None = None
        self.ready = False
        self.warmup_seconds = 0.0
        self.load_error: str | None = None

    @classmethod
    def open(
        cls, settings: Settings, bundle: Bundle | None = None, clock: Callable[[], float] = time.monotonic
    ) -> Engine:
        """Read and verify the bundle and the policy. Raises BundleError or ValueError naming the problem."""
        problem = device_problem(settings.device)
        if problem:
            raise ValueError(f"SLIMSERVE_DEVICE: {problem}")
        if bundle is None:
            bundle = load_bundle(settings.bundle, verify=settings.verify_hashes, device=settings.device)
        return cls(settings, bundle, clock)

    @property
    def draining(self) -> bool:
        return self.scheduler is not None and self.scheduler.draining

    # --- lifecycle ----------------------------------------------------------------------------

    def load(self) -> None:
        """Materialize and warm up every subnet, then build the scheduler (its worker is not started).
        A failure is kept in ``load_error`` (and logged), not raised: the server stays up to report it."""
        try:
            settings = self.settings
            self.telemetry.start()
            # Run each subnet with the threads its profile found best, when it profiled this setup.
            runtime = ModelRuntime(
                self.bundle, settings.device, settings.threads, matching_column(self.bundle, settings)
            )
            self.warmup_seconds = runtime.warm_up(settings.max_batch)
            rows = self.bundle.table.subnets
            column = self.info.column
            self.policy, latency_model = scheduling(settings, rows, column)
            self.runtime = runtime
            self.scheduler = Scheduler(
                runtime, self.policy, latency_model, settings, self.telemetry, self.metrics, self.clock
            )
            # With inference in the HTTP process, the inference thread needs the GIL between torch
            # ops, which a busy event loop holds for up to the switch interval at a time
            # (docs/BENCHMARKS.md, "GIL hand-off").
            sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
            log.info(
                "loaded: %d subnets materialized in %.2f s, warmed up in %.2f s; policy %s; latency column %s",
                len(rows), runtime.materialize_seconds, self.warmup_seconds, self.policy.name, column,
            )  # fmt: skip
        except Exception as error:
            self.fail("loading the model", error)

    def warm_this_thread(self) -> bool:
        """Warm the calling thread, the one that will run batches (:meth:`ModelRuntime.warm_this_thread`),
        and say ready. False, with the reason in ``load_error``, if loading or warming failed."""
        if self.runtime is None or self.load_error is not None:
            return False
        try:
            self.runtime.warm_this_thread(self.settings.max_batch)
        except Exception as error:
            self.fail("warming the inference thread", error)
            return False
        self.mark_ready()
        return True

    def fail(self, what: str, error: Exception) -> None:
        """Keep why the model cannot serve (``load_error``, reported by /readyz) and log it."""
        self.load_error = f"{type(error).__name__}: {error}"
        log.exception("%s failed", what)

    def mark_ready(self) -> None:
        """Say ready, once :meth:`load` succeeded and the serving thread has warmed itself."""
        # What start-up allocated (torch, the bundle, every subnet: ~185k objects) lives as long as
        # the process; out of the collector's reach, a full collection stops costing ~85 ms mid-batch.
        gc.freeze()
        self.ready = True
        self.metrics.ready.set(1)
        log.info("ready")

    def begin_drain(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self.scheduler is not None:
            self.scheduler.begin_drain()

    def stop(self, timeout: float) -> bool:
        """Drain the queue (a worker thread, if started, for up to ``timeout`` s) and stop telemetry."""
        self.begin_drain()
        stopped = self.scheduler is None or self.scheduler.stop(timeout)
        self.telemetry.stop()
        return stopped

    # --- requests -----------------------------------------------------------------------------

    def submit(
        self,
        image: Tensor,
        arrival: float,
        budget_s: float,
        deliver: Deliver,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        """Queue one uint8 ``[C, H, W]`` image; ``deliver`` gets its Answer or Rejected exactly once,
        from the thread that runs the batch. Raises Rejected (counted) if it cannot be queued."""
        scheduler = self.scheduler
        if scheduler is None:
            raise Rejected(f"model failed to load: {self.load_error}" if self.load_error else "model is loading")
        job: Job

        def resolve(outcome: JobResult | Rejected) -> None:
            if isinstance(outcome, Rejected):
                self.count_rejection(outcome)
                deliver(outcome)
            else:
                deliver(Answer.of(outcome, job.enqueued))

        job = Job(image=image, arrival=arrival, budget=budget_s, resolve=resolve, cancelled=cancelled)
        try:
            scheduler.submit(job)
        except Rejected as rejection:
            self.count_rejection(rejection)
            raise

    def count_rejection(self, rejection: Rejected) -> None:
        self.count("deadline" if rejection.reason == Refused.DEADLINE else "rejected")

    def count(self, outcome: str) -> None:
        """A request that got no result: ``rejected`` (503), ``deadline`` (504), ``invalid`` (4xx)."""
        self.metrics.requests.labels(outcome, "").inc()

    def record_answer(self, subnet: int, met: bool, total: float, queued: float, post_overhead: float) -> None:
        """A result the front end sent back: count it, and learn the time from result to response."""
        metrics = self.metrics
        metrics.requests.labels("ok", self.info.subnets[subnet].id).inc()
        metrics.budget.labels(str(met).lower()).inc()
        metrics.queue_seconds.observe(queued)
        metrics.total_seconds.observe(total)
        if self.scheduler is not None:
            self.scheduler.observe_post_overhead(post_overhead)

    def shed_retry_after(self) -> int | None:
        """Retry-After seconds if a new request must be refused right now (queue full), else None."""
        scheduler = self.scheduler
        if scheduler is None or not scheduler.full:
            return None
        return scheduler.retry_after()

    def fastest_seconds(self) -> float | None:
        """Predicted time of the fastest subnet at batch 1 now, once loaded."""
        scheduler = self.scheduler
        return None if scheduler is None else scheduler.latency_model.predict(0, 1, scheduler.load())

    # --- what it knows ------------------------------------------------------------------------

    def status(self) -> StatusResponse:
        sample = self.telemetry.latest
        scheduler = self.scheduler
        model = scheduler.latency_model if scheduler else None
        ids = [s.id for s in self.info.subnets]
        return StatusResponse(
            ready=self.ready,
            draining=self.draining,
            policy=self.settings.policy,
            queue_depth=scheduler.depth if scheduler else 0,
            arrival_rate_per_s=round(scheduler.arrivals.rate(self.clock()), 3) if scheduler else 0.0,
            cpu_percent=round(sample.cpu_percent, 2),
            process_cpu_percent=round(sample.process_cpu_percent, 2),
            gpu_percent=sample.gpu_percent,
            gpu_memory_used_mb=sample.gpu_memory_used_mb,
            gpu_memory_total_mb=sample.gpu_memory_total_mb,
            load_factor=round(scheduler.load(), 4) if scheduler else 1.0,
            latency_drift=round(model.drift, 4) if model else 1.0,
            latency_deviation=round(model.deviation, 4) if model else 0.0,
            post_overhead_ms=round(scheduler.post_overhead * 1000, 4) if scheduler else 0.0,
            safety_margin_ms=self.settings.safety_margin_ms,
            inference_busy_fraction=round(scheduler.busy_fraction, 4) if scheduler else 0.0,
            dispatches=scheduler.dispatches if scheduler else 0,
            corrections={i: round(c, 4) for i, c in zip(ids, model.corrections(), strict=True)} if model else {},
        )

    def subnets_view(self) -> SubnetsResponse:
        """The table as served: each row with its learned correction and predicted latency now."""
        scheduler = self.scheduler
        if scheduler is None:
            raise Rejected(f"model failed to load: {self.load_error}" if self.load_error else "model is loading")
        load = scheduler.load()
        corrections = scheduler.latency_model.corrections()
        rows = []
        for info, row in zip(self.info.subnets, self.bundle.table.subnets, strict=True):
            rows.append(
                SubnetView(
                    **row.model_dump(include={"id", "origin", "flops", "params", "accuracy", "accuracy_split"}),
                    channels=list(info.channels),
                    depths=list(info.depths),
                    resolution=info.resolution,
                    width=round(info.width, 4),
                    correction=round(corrections[info.index], 4),
                    latency=[
                        LatencyEstimate(
                            batch_size=batch,
                            profiled_p50_ms=stat.p50_ms,
                            predicted_ms=round(
                                scheduler.latency_model.predict(info.index, min(batch, self.settings.max_batch), load)
                                * 1000,
                                4,
                            ),
                        )
                        for batch, stat in sorted(row.latency[self.info.column].items())
                    ],
                )
            )
        return SubnetsResponse(device_profile=self.info.column, subnets=rows)

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of everything this engine counted, gauges refreshed now."""
        metrics, sample = self.metrics, self.telemetry.latest
        metrics.cpu_percent.set(sample.cpu_percent)
        if sample.gpu_percent is not None:
            metrics.gpu_percent.set(sample.gpu_percent)
        if self.scheduler is not None:
            metrics.load_factor.set(self.scheduler.load())
            for info, correction in zip(self.info.subnets, self.scheduler.latency_model.corrections(), strict=True):
                metrics.correction.labels(info.id).set(correction)
        return generate_latest(metrics.registry)
