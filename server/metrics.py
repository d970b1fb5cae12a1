"""Prometheus metrics, in a registry owned by one app (tests build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from slimserve.server.runtime import ServedSubnet

disable_created_metrics()  # the *_created series double the output and nobody graphs them

# Latency buckets from 0.5 ms to 10 s: budgets here range from a few ms to seconds.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.2,
    0.5,
    1,
    2,
    5,
    10,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "slimserve_requests", "Requests answered, by outcome and subnet", ["outcome", "subnet"], registry=r
        )
        self.budget = Counter(
            "slimserve_budget", "Answered requests that met or missed their latency budget", ["met"], registry=r
        )
        self.queue_seconds = Histogram(
            "slimserve_queue_seconds", "Time from enqueue to dispatch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "slimserve_inference_seconds",
            "Time of one batched forward pass",
            ["subnet"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.total_seconds = Histogram(
            "slimserve_request_seconds",
            "Server-side time from arrival to response",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("slimserve_queue_depth", "Requests waiting for inference", registry=r)
        self.exits = Counter(
            "slimserve_exits",
            "Multi-stage bundles: requests answered per stage (1-based) and why: confident (left early), last "
            "(the row's last stage answers all that is left), anytime (the next stage would have missed the deadline)",
            ["stage", "reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "slimserve_batch_size", "Requests per inference call", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.width = Histogram(
            "slimserve_chosen_width",
            "Mean channel share of the subnet chosen per request",
            buckets=(0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
            registry=r,
        )
        self.prediction_error = Histogram(
            "slimserve_latency_prediction_ratio",
            "Measured / predicted inference time",
            buckets=(0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4),
            registry=r,
        )
        self.correction = Gauge(
            "slimserve_latency_correction", "Learned multiplier on profiled latency", ["subnet"], registry=r
        )
        self.load_factor = Gauge(
            "slimserve_load_factor", "Predicted slowdown from other processes' CPU/GPU use", registry=r
        )
        self.cpu_percent = Gauge("slimserve_cpu_percent", "Machine CPU utilization (all cores)", registry=r)
        self.gpu_percent = Gauge(
            "slimserve_gpu_percent", "GPU utilization from NVML (absent without a GPU)", registry=r
        )
        self.collateral_rate = Gauge(
            "slimserve_collateral_miss_rate",
            "Deadline misses per second of extra busy time that wider subnets added, recently",
            registry=r,
        )
        self.pauses = Counter(
            "slimserve_batch_pauses",
            "Times a running batch was paused between two steps to run requests that could not wait for it",
            registry=r,
        )
        self.ready = Gauge("slimserve_ready", "1 once the bundle is loaded, verified and warmed up", registry=r)

    def record_batch(self, subnet: ServedSubnet, size: int, seconds: float, predicted: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.labels(subnet.row.id).observe(seconds)
        if predicted > 0:
            self.prediction_error.observe(seconds / predicted)
        for _ in range(size):
            self.width.observe(subnet.width)
