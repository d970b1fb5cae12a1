"""Measured latency of materialized subnets, and a predictor fitted to the measurements.

Latency is measured, not assumed from FLOPs: the subnet is materialized exactly as the server will
run it (static, BN-folded), with the server's thread count, after warm-up, at several batch sizes.
Subnets are timed round-robin in short bursts, so slow drift of a shared machine hits all alike.

The predictor lets the search score thousands of candidates without timing each: per batch size,
latency = intercept + layers run x a fitted cost per layer + sum over spatial resolutions of
(FLOPs at that resolution x a fitted cost per FLOP). Convolutions on small feature maps run at a
different efficiency than on large ones, which a single FLOPs coefficient would miss; and every
layer costs a fixed dispatch overhead, which is most of the time of a narrow subnet at batch 1 and
is what dropping a block saves beyond its FLOPs.
"""

from __future__ import annotations

import itertools
import logging
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from slimserve.models.registry import Supernet
from slimserve.models.schema import TABLE_SCHEMA_VERSION, DeviceProfile, LatencyStat, SubnetRow, SubnetTable
from slimserve.models.subnet import SubnetSpace

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class ProfileSettings:
    device: str = "cpu"
    threads: int = 2  # what the server runs with (SLIMSERVE_THREADS); 2 on the demo machine
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    warmup: int = 3  # calls per (subnet, batch size) before timing: oneDNN picks kernels on first use
    repeats: int = 20  # timed calls per (subnet, batch size)
    burst: int = 5  # consecutive timed calls of one subnet before moving to the next
    pick_threads: bool = True  # CPU: also try 1 thread, keep the better per (subnet, batch size)
    # Idle time before each timed call: a lightly loaded server sits idle between an answer and the
    # next request (~1-2 ms for one keep-alive client here) and its sleeping OpenMP threads must be
    # woken; back-to-back timing (0) never sees that and promises more than such a server keeps.
    idle_gap_ms: float = 2.0

    @property
    def thread_choices(self) -> tuple[int, ...]:
        if self.device != "cpu" or not self.pick_threads:
            return (self.threads,)
        return tuple(sorted({1, self.threads}))


def processor_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_profile(settings: ProfileSettings) -> tuple[str, DeviceProfile]:
    """A name for the latency column (``cpu-2t``, ``cuda0``) and what it was measured on."""
    name = f"cpu-{settings.threads}t" if settings.device == "cpu" else settings.device.replace(":", "")
    return name, DeviceProfile(
        device=settings.device,
        threads=settings.threads,
        processor=processor_name(settings.device),
        torch=torch.__version__,
    )


def ranked_rows(rows: Sequence[SubnetRow], device: str) -> list[SubnetRow]:
    """``rows`` (fastest first) without those that are not both slower at batch 1 on ``device`` and more
    accurate on the search split than the row kept before them: what a table may list."""
    kept = [rows[0]]
    for row in rows[1:]:
        previous = kept[-1]
        if (
            row.latency[device][1].p50_ms > previous.latency[device][1].p50_ms
            and row.search_accuracy > previous.search_accuracy
        ):
            kept.append(row)
        else:
            log.warning("row %s dropped: not both slower and more accurate than %s", row.id, previous.id)
    return kept


def profiled_table(space: SubnetSpace, settings: ProfileSettings, rows: Sequence[SubnetRow]) -> SubnetTable:
    """A ranked table whose one latency column was measured here with ``settings``."""
    name, device = device_profile(settings)
    return SubnetTable(
        schema_version=TABLE_SCHEMA_VERSION,
        unit_names=space.unit_names,
        group_size=space.group_size,
        primary_device=name,
        devices={name: device},
        subnets=tuple(rows),
    )


class Timer(Protocol):
    """What times modules: :func:`measure`, or a deterministic stand-in where a test needs a clock."""

    def __call__(
        self,
        modules: Sequence[nn.Module],
        input_shape: tuple[int, ...],
        settings: ProfileSettings,
        progress: bool = False,
        description: str = "profiling",
        examples: torch.Tensor | None = None,
    ) -> list[dict[int, LatencyStat]]: ...


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    modules: Sequence[nn.Module],
    input_shape: tuple[int, ...],
    settings: ProfileSettings,
    progress: bool = False,
    description: str = "profiling",
    examples: torch.Tensor | None = None,
) -> list[dict[int, LatencyStat]]:
    """Time each module at each batch size: one ``{batch_size: LatencyStat}`` per module.

    Timed as the server runs them: on the calling thread (the command's main thread, as batches run
    on the inference process's main thread, where libgomp's thread team and the OpenMP wait setting
    of :mod:`slimserve.models.openmp` decide whether two threads pay), each call after
    ``idle_gap_ms`` of idleness. On the CPU each (module, batch size) is timed with every thread
    count of :meth:`ProfileSettings.thread_choices`, interleaved, and the entry keeps the one with
    the lower tail (its ``threads`` says which; :func:`best_by_batch`).

    ``examples`` (real, normalized inputs) are for modules whose time depends on the input, such as
    a multi-stage network with exits: each call then takes the next ``batch_size`` of them.
    Otherwise every call sees the same random batch.
    """
    device = torch.device(settings.device)
    previous_threads = torch.get_num_threads()
    choices = settings.thread_choices
    samples: list[dict[tuple[int, int], list[float]]] = [
        {(b, t): [] for b in settings.batch_sizes for t in choices} for _ in modules
    ]
    total = len(settings.batch_sizes) * len(modules) * settings.repeats * len(choices)
    bar = tqdm(total=total, disable=not progress, desc=description, unit="call", leave=False)
    try:
        with torch.inference_mode():
            for batch_size in settings.batch_sizes:
                example = torch.randn(batch_size, *input_shape, device=device)
                batches = _batches(examples, batch_size, device)
                for threads in choices:
                    torch.set_num_threads(threads)
                    for module in modules:
                        for _ in range(settings.warmup):
                            module(next(batches, example))
                _synchronize(device)
                done = 0
                while done < settings.repeats:
                    calls = min(settings.burst, settings.repeats - done)
                    for index, module in enumerate(modules):
                        for threads in choices:
                            torch.set_num_threads(threads)
                            times = samples[index][batch_size, threads]
                            for _ in range(calls):
                                if settings.idle_gap_ms:
                                    time.sleep(settings.idle_gap_ms / 1000.0)
                                inputs = next(batches, example)
                                start = time.perf_counter()
                                module(inputs)
                                _synchronize(device)
                                times.append((time.perf_counter() - start) * 1000.0)
                            bar.update(calls)
                    done += calls
    finally:
        torch.set_num_threads(previous_threads)
        bar.close()
    return [best_by_batch(by_key, settings) for by_key in samples]


def _batches(examples: torch.Tensor | None, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``examples``, cycling forever; nothing when there are none."""
    if examples is None:
        return iter(())
    if examples.shape[0] < batch_size:
        raise ValueError(f"{examples.shape[0]} examples cannot fill a batch of {batch_size}")
    starts = itertools.cycle(range(0, examples.shape[0] - batch_size + 1, batch_size))
    return (examples[start : start + batch_size].to(device) for start in starts)


def best_by_batch(samples: dict[tuple[int, int], list[float]], settings: ProfileSettings) -> dict[int, LatencyStat]:
    """Per batch size, the stats of the thread count with the lowest p95 (ties: fewer threads).

    The tail decides, not the median: a sleeping thread wakes late only some of the time, and a
    deadline is missed by the slow calls."""
    result = {}
    for batch_size in settings.batch_sizes:
        tails = {t: float(np.percentile(samples[batch_size, t], 95)) for t in settings.thread_choices}
        best = min(tails, key=lambda t: (tails[t], t))
        result[batch_size] = LatencyStat(
            p50_ms=float(np.percentile(samples[batch_size, best], 50)),
            p95_ms=tails[best],
            threads=best if settings.device == "cpu" else None,
        )
    return result


# --- prediction ---------------------------------------------------------------------------------

LAYERS = 0  # key of the layer count in a feature dict; every other key is an output area (> 0)


@torch.no_grad()
def flops_by_resolution(module: nn.Module | Supernet, run: Callable[[], object]) -> dict[int, float]:
    """FLOPs of ``run()`` bucketed by each conv / linear layer's output feature-map area, and under
    :data:`LAYERS` the number of conv / linear layers that ran.

    Works on the weight-shared supernet (sliced layers) and on materialized subnets alike, because
    it reads channel counts off the tensors that actually flow, not off layer attributes.
    """
    buckets: dict[int, float] = {}

    def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.dim() not in (2, 4):
            return
        if weight.dim() == 4:
            area = output.shape[-1] * output.shape[-2]
            flops = 2.0 * output.shape[1] * inputs[0].shape[1] * weight.shape[-1] * weight.shape[-2] * area
        else:
            area, flops = 1, 2.0 * inputs[0].shape[-1] * output.shape[-1]
        buckets[area] = buckets.get(area, 0.0) + flops  # per image: batch size is not in the formula
        buckets[LAYERS] = buckets.get(LAYERS, 0.0) + 1

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return buckets


def subnet_flops_by_resolution(
    supernet: Supernet, subnet: tuple[int, ...], input_shape: tuple[int, ...]
) -> dict[int, float]:
    """Predictor features of a subnet without materializing it (one batch-of-2 forward)."""
    parameter = next(supernet.parameters())
    example = torch.zeros(2, *input_shape, device=parameter.device)
    return flops_by_resolution(supernet, lambda: supernet(example, subnet))


@dataclass(frozen=True)
class LatencyPredictor:
    """``latency_ms(features, batch) = intercept[b] + features . coefficients[b]``, fitted per batch size."""

    areas: tuple[int, ...]  # feature order: FLOPs at each output area, in GFLOPs
    coefficients: dict[int, tuple[float, ...]]  # batch size -> (intercept, ms per layer, per-area ms per GFLOP...)

    def features(self, buckets: dict[int, float]) -> np.ndarray:
        return np.array([1.0, buckets.get(LAYERS, 0.0)] + [buckets.get(area, 0.0) / 1e9 for area in self.areas])

    def predict(self, buckets: dict[int, float], batch_size: int) -> float:
        return float(self.features(buckets) @ np.array(self.coefficients[batch_size]))

    @classmethod
    def fit(cls, buckets: Sequence[dict[int, float]], measured: Sequence[dict[int, LatencyStat]]) -> LatencyPredictor:
        """Least squares on p50 latencies, weighted by 1/latency so the fit minimizes *relative* error."""
        if len(buckets) < 4:
            raise ValueError("the latency predictor needs at least 4 measured subnets")
        areas = tuple(sorted({area for b in buckets for area in b if area != LAYERS}, reverse=True))
        shell = cls(areas, {})
        design = np.stack([shell.features(b) for b in buckets])
        coefficients = {}
        for batch_size in measured[0]:
            target = np.array([m[batch_size].p50_ms for m in measured])
            weights = 1.0 / target
            solution, *_ = np.linalg.lstsq(design * weights[:, None], target * weights, rcond=None)
            coefficients[batch_size] = tuple(float(v) for v in solution)
        return cls(areas, coefficients)


def relative_errors(
    predictor: LatencyPredictor, buckets: Sequence[dict[int, float]], measured: Sequence[dict[int, LatencyStat]]
) -> dict[int, np.ndarray]:
    """|predicted - measured| / measured for each held-out subnet, per batch size."""
    return {
        batch_size: np.array(
            [
                abs(predictor.predict(b, batch_size) - m[batch_size].p50_ms) / m[batch_size].p50_ms
                for b, m in zip(buckets, measured, strict=True)
            ]
        )
        for batch_size in predictor.coefficients
    }


def cost_function(
    predictor: LatencyPredictor, featurize: Callable[[tuple[int, ...]], dict[int, float]], batch_size: int
) -> Callable[[tuple[int, ...]], float]:
    """Predicted latency of a subnet at one batch size, cached: the search asks about a subnet more than once."""
    cache: dict[tuple[int, ...], float] = {}

    def cost(subnet: tuple[int, ...]) -> float:
        if subnet not in cache:
            cache[subnet] = predictor.predict(featurize(subnet), batch_size)
        return cache[subnet]

    return cost
