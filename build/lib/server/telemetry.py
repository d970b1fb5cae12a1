"""Load signals: CPU utilization (psutil) and, where an NVIDIA GPU exists, GPU utilization and memory (NVML).

A background thread samples every ``interval`` seconds; readers get the latest smoothed values
without blocking. The controller cares about *external* load - CPU time taken by other processes -
because that is what slows inference down beyond what the latency model has learned.

NVML comes from the ``nvidia-ml-py`` package (module ``pynvml``). Without a driver or a GPU, the
GPU fields are ``None`` and everything else works: this is the normal case on CPU machines.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSample:
    cpu_percent: float  # whole machine, 0-100 (all cores)
    process_cpu_percent: float  # this process, 0-100 of the whole machine
    gpu_percent: float | None = None  # NVML utilization.gpu of the serving GPU
    gpu_memory_used_mb: float | None = None
    gpu_memory_total_mb: float | None = None

    @property
    def external_cpu(self) -> float:
        """Fraction (0-1) of the machine's CPU used by other processes."""
        return max(0.0, self.cpu_percent - self.process_cpu_percent) / 100.0


class GpuProbe(Protocol):
    def sample(self) -> tuple[float, float, float] | None: ...  # (util %, used MB, total MB)


class NvmlProbe:
    """NVML reader for one GPU; ``sample`` returns None when NVML is unavailable."""

    def __init__(self, index: int = 0, nvml: Any = None) -> None:
        self._handle: Any = None
        self._nvml = nvml
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as error:  # no driver, no GPU, no library: all mean "no GPU telemetry"
            log.info("GPU telemetry unavailable (%s); reporting CPU only", error)
            self._handle = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def sample(self) -> tuple[float, float, float] | None:
        if self._handle is None:
            return None
        try:
            utilization = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except Exception as error:
            log.warning("NVML read failed (%s); GPU telemetry disabled", error)
            self._handle = None
            return None
        return float(utilization.gpu), memory.used / 2**20, memory.total / 2**20


class Telemetry:
    """Samples load in the background; ``latest`` is always cheap to read."""

    def __init__(self, interval: float = 0.25, gpu: GpuProbe | None = None, smoothing: float = 0.5) -> None:
        self.interval = interval
        self.gpu = gpu
        self.smoothing = smoothing
        self._process = psutil.Process()
        self._cpus = psutil.cpu_count() or 1
        self._latest = LoadSample(0.0, 0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        psutil.cpu_percent(interval=None)  # first call primes the counters
        self._process.cpu_percent(interval=None)

    @property
    def latest(self) -> LoadSample:
        return self._latest

    def sample_once(self) -> LoadSample:
        cpu = psutil.cpu_percent(interval=None)
        own = self._process.cpu_percent(interval=None) / self._cpus
        gpu = self.gpu.sample() if self.gpu is not None else None
        previous, a = self._latest, self.smoothing
        self._latest = LoadSample(
            cpu_percent=a * cpu + (1 - a) * previous.cpu_percent,
            process_cpu_percent=a * own + (1 - a) * previous.process_cpu_percent,
            gpu_percent=gpu[0] if gpu else None,
            gpu_memory_used_mb=gpu[1] if gpu else None,
            gpu_memory_total_mb=gpu[2] if gpu else None,
        )
        return self._latest

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="slimserve-telemetry", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample_once()
            except Exception:  # telemetry must never take the server down
                log.exception("telemetry sample failed")


def load_factor(sample: LoadSample, sensitivity: float, gpu_busy_own: float | None = None) -> float:
    """How much slower inference runs now because of other processes (1.0 = not at all).

    CPU: with a share ``u`` of the machine busy elsewhere, our threads get about ``1 - u`` of it
    (processor sharing), so latency scales by ``1 / (1 - u)``; ``sensitivity`` blends between
    ignoring load (0) and that model (1). GPU: utilization beyond what our own worker accounts for
    is treated the same way.
    """
    external = sample.external_cpu
    if sample.gpu_percent is not None and gpu_busy_own is not None:
        external = max(external, max(0.0, sample.gpu_percent / 100.0 - gpu_busy_own))
    external = min(external, 0.75)  # beyond this the estimate is noise; the learned drift takes over
    return 1.0 + sensitivity * (1.0 / (1.0 - external) - 1.0)
