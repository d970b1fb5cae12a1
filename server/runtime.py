"""The model as served: every subnet of the table materialized once, warmed up, ready to run.

Switching subnets costs nothing at request time: each is its own static module with contiguous,
BN-folded weights, built at start-up. A forward never touches shared mutable state, so the worker
can run any subnet on any batch in any order.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimserve.models.bundle import Bundle, row_stages
from slimserve.models.gating import GatedStatic
from slimserve.models.multistage import ContinueCheck, ExitCapped
from slimserve.models.registry import Step, segments_of
from slimserve.models.schema import BundleError, LatencyStat, SubnetRow
from slimserve.server.policy import candidate_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedSubnet:
    index: int  # position in the table: 0 is the fastest
    row: SubnetRow
    module: nn.Module
    width: float  # mean share of channels kept, for metrics and plots
    depths: tuple[int, ...]  # residual blocks run per stage
    thread_plan: tuple[tuple[int, int], ...] = ()  # (profiled batch size, threads), ascending; () = runtime's
    last_stage: int | None = None  # multi-stage bundles: the stage (0-based) that answers what is left
    gated: bool = False  # gated bundles: the module skips blocks and channel groups per image
    # plain rows: the forward as steps the scheduler may pause between (one step: not pausable)
    segments: tuple[Step, ...] = ()


@dataclass(frozen=True)
class GatedAnswers:
    """A gated batch's answers and what each image ran, on the CPU."""

    probabilities: Tensor  # [batch, classes]
    blocks_run: Tensor  # [batch], residual blocks whose branch ran for the image
    groups_run: Tensor  # [batch], share of the blocks' channel groups computed for the image (all blocks)


@dataclass(frozen=True)
class ExitAnswers:
    """A multi-stage batch's answers, on the CPU."""

    probabilities: Tensor  # [batch, classes], of the stage that answered each image
    stage: Tensor  # [batch], 0-based
    cut_short: Tensor  # [batch], answered before its exit because the next stage would miss the deadline


class Progress:
    """One plain row's batch, run a step at a time (:meth:`ModelRuntime.begin`), so the scheduler can
    run an urgent batch in between: the activations wait here, on the device, until :meth:`step`."""

    def __init__(self, segments: Sequence[Step], x: Tensor, threads: int) -> None:
        self._segments, self._x, self._threads = segments, x, threads
        self.done = 0  # steps run so far

    @property
    def total(self) -> int:
        return len(self._segments)

    @property
    def finished(self) -> bool:
        return self.done == len(self._segments)

    @torch.inference_mode()
    def step(self) -> None:
        """Run the next step (with this batch's threads: a batch run in between may have changed them)."""
        if torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)
        self._x = self._segments[self.done](self._x)
        if self._x.is_cuda:  # kernels are queued, not run: without this a "pause" would pause nothing
            torch.cuda.synchronize(self._x.device)
        self.done += 1

    @property
    def probabilities(self) -> Tensor:
        if not self.finished:
            raise RuntimeError(f"the batch has run {self.done} of its {self.total} steps")
        return F.softmax(self._x, dim=1).cpu()


def thread_plan(latency: dict[int, LatencyStat], threads: int) -> tuple[tuple[int, int], ...]:
    """The intra-op threads a latency column found best (lower p95), per batch size, capped at ``threads``."""
    return tuple((batch, min(stat.threads, threads)) for batch, stat in sorted(latency.items()) if stat.threads)


def threads_for(plan: Sequence[tuple[int, int]], batch: int, default: int) -> int:
    """Threads for ``batch`` images: those of the smallest profiled batch size not below it (the
    largest profiled one for bigger batches); ``default`` without a plan."""
    if not plan:
        return default
    for profiled, threads in plan:
        if profiled >= batch:
            return threads
    return plan[-1][1]


class ModelRuntime:
    """Materialized subnets plus the preprocessing the manifest prescribes.

    Example:
        >>> runtime = ModelRuntime(load_bundle("models/demo"), device="cpu", threads=2)
        >>> runtime.warm_up(max_batch=8)
        >>> probabilities = runtime.infer(0, images_uint8)  # [batch, classes]
    """

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int = 2, column: str | None = None) -> None:
        """``column``: a latency column measured on this kind of device with ``threads`` threads;
        each subnet then runs each batch size with the thread count that column found best."""
        self.bundle = bundle
        self.device = torch.device(device)
        self.threads = threads
        manifest = bundle.manifest
        self.input_shape = (manifest.input.channels, manifest.input.height, manifest.input.width)
        self.class_names = manifest.class_names
        shape = (1, manifest.input.channels, 1, 1)
        self._mean = torch.tensor(manifest.input.mean, dtype=torch.float32, device=self.device).reshape(shape) * 255.0
        self._inverse_std = 1.0 / (
            torch.tensor(manifest.input.std, dtype=torch.float32, device=self.device).reshape(shape) * 255.0
        )
        space = bundle.supernet.space
        started = time.perf_counter()
        # copies: nn.Module.to moves a module in place, and the bundle may serve a runtime on another device
        self.staged = copy.deepcopy(bundle.staged).to(self.device) if bundle.staged is not None else None
        self._gated = copy.deepcopy(bundle.gated).to(self.device) if bundle.gated is not None else None
        last_stages = (
            row_stages(bundle.staged_plan, bundle.table)
            if self.staged is not None
            else (None,) * len(bundle.table.subnets)
        )
        modules = [
            self._module(row, last_stage) for row, last_stage in zip(bundle.table.subnets, last_stages, strict=True)
        ]
        self.subnets = [
            ServedSubnet(
                index,
                row,
                module,
                space.width_of(row.channels),
                space.depths(row.channels),
                thread_plan(row.latency[column], threads) if column and self.device.type == "cpu" else (),
                last_stage,
                bundle.gated is not None,
                segments_of(module) if last_stage is None and bundle.gated is None else (),
            )
            for index, (row, last_stage, module) in enumerate(
                zip(bundle.table.subnets, last_stages, modules, strict=True)
            )
        ]
        self.stage_latency = self._stage_latency(column)
        self.materialize_seconds = time.perf_counter() - started
        self._calls = 0
        self._calls_lock = threading.Lock()

    def _module(self, row: SubnetRow, last_stage: int | None) -> nn.Module:
        if self._gated is not None:
            assert row.gate_threshold is not None  # load_bundle checked every row of a gated table
            return self._gated.at_threshold(row.gate_threshold)
        if self.staged is None:
            return self.bundle.materialize(row).to(self.device)
        assert last_stage is not None  # load_bundle checked every row of a multi-stage table
        return ExitCapped(self.staged, self.bundle.thresholds, last_stage)

    def _stage_latency(self, column: str | None) -> tuple[tuple[int, tuple[float, ...]], ...]:
        """Multi-stage bundles: (batch size, seconds of each stage alone), ascending, from the profiled column."""
        spec = self.bundle.manifest.multistage
        if spec is None:
            return ()
        measured = spec.stage_latency.get(column or "") or spec.stage_latency.get(self.bundle.table.primary_device)
        if not measured:
            raise BundleError(f"{self.bundle.path}: multistage.stage_latency has no column for {column!r}")
        return tuple((batch, tuple(ms / 1000.0 for ms in stages)) for batch, stages in sorted(measured.items()))

    def stage_seconds(self, stage: int, batch: int) -> float:
        """Profiled time of one stage alone over ``batch`` images (the smallest profiled batch not below it)."""
        for profiled, seconds in self.stage_latency:
            if profiled >= batch:
                return seconds[stage]
        return self.stage_latency[-1][1][stage] * batch / self.stage_latency[-1][0]

    @property
    def model_calls(self) -> int:
        """Number of forward passes run so far (tests assert the model is *not* called)."""
        return self._calls

    def warm_up(
        self, max_batch: int, repeats: int = 2, every_size: bool = False, only: Sequence[int] | None = None
    ) -> float:
        """Run every subnet (or the indices ``only``) at every power-of-two batch size up to
        ``max_batch`` (every size with ``every_size``): oneDNN and cuDNN build their kernels and
        plans on first use, which would otherwise land on the first unlucky requests."""
        started = time.perf_counter()
        sizes = range(1, max_batch + 1) if every_size else candidate_batches(max_batch)
        for subnet in self.subnets if only is None else [self.subnets[i] for i in only]:
            for batch in sizes:
                images = torch.zeros(batch, *self.input_shape, dtype=torch.uint8)
                for _ in range(repeats):
                    self.infer(subnet.index, images)
                    if subnet.last_stage is not None:  # blank images may all exit early: run every stage too
                        self.infer_with_exits(
                            subnet.index, images, lambda rows, _stage: torch.ones_like(rows, dtype=torch.bool)
                        )
        with self._calls_lock:
            self._calls = 0
        return time.perf_counter() - started

    def warm_this_thread(self, max_batch: int) -> float:
        """Prepare the calling thread to serve: it is not the one :meth:`warm_up` ran on.

        On the CPU, one batch-1 forward per subnet (OpenMP builds a thread team per calling thread).
        On a GPU, every subnet at every batch size up to ``max_batch``, since PyTorch caches cuDNN's
        execution plans per thread and per shape: a size first seen while serving paid 13-37 ms on
        an H200 for a 1-2 ms forward (docs/BENCHMARKS.md, "GPU")."""
        torch.set_num_threads(self.threads)
        if self.device.type == "cpu":
            return self.warm_up(max_batch=1, repeats=1)
        return self.warm_up(max_batch, repeats=1, every_size=True)

    @torch.inference_mode()
    def infer(self, subnet_index: int, images: Tensor) -> Tensor:
        """uint8 ``[batch, C, H, W]`` -> class probabilities ``[batch, classes]`` (float32, on the CPU)."""
        subnet = self.subnets[subnet_index]
        probabilities = F.softmax(subnet.module(self._prepare(subnet, images)), dim=1)
        self._count_call()
        return probabilities.cpu()

    @torch.inference_mode()
    def begin(self, subnet_index: int, images: Tensor) -> Progress:
        """A plain row's batch, to be run with :meth:`Progress.step` until it is finished."""
        subnet = self.subnets[subnet_index]
        if not subnet.segments:
            raise ValueError(f"subnet {subnet_index} is not a plain row: it runs whole")
        x = self._prepare(subnet, images)
        self._count_call()
        return Progress(subnet.segments, x, torch.get_num_threads())

    @torch.inference_mode()
    def infer_with_exits(self, subnet_index: int, images: Tensor, may_continue: ContinueCheck | None) -> ExitAnswers:
        """A multi-stage row: each image answered by its exit stage, or earlier where ``may_continue`` says
        its deadline forbids the next stage."""
        subnet = self.subnets[subnet_index]
        if self.staged is None or subnet.last_stage is None:
            raise ValueError(f"subnet {subnet_index} is not a row of a multi-stage bundle")
        exits = self.staged.run_with_exits(
            self._prepare(subnet, images), self.bundle.thresholds, subnet.last_stage, may_continue
        )
        self._count_call()
        return ExitAnswers(F.softmax(exits.logits, dim=1).cpu(), exits.stage.cpu(), exits.cut_short.cpu())

    @torch.inference_mode()
    def infer_gated(self, subnet_index: int, images: Tensor) -> GatedAnswers:
        """A gated row: probabilities, and per image the blocks and channel groups its gates kept."""
        subnet = self.subnets[subnet_index]
        if not isinstance(subnet.module, GatedStatic):
            raise ValueError(f"subnet {subnet_index} is not a row of a gated bundle")
        logits, gates = subnet.module.run(self._prepare(subnet, images))
        self._count_call()
        blocks = torch.stack([(layer > 0) for layer in gates.layer], 1).sum(1)
        groups = torch.stack([(channel > 0).float().mean(1) for channel in gates.channel], 1).mean(1)
        return GatedAnswers(F.softmax(logits, dim=1).cpu(), blocks.cpu(), groups.cpu())

    def _prepare(self, subnet: ServedSubnet, images: Tensor) -> Tensor:
        """Threads for this batch, then uint8 pixels normalized on the device."""
        threads = threads_for(subnet.thread_plan, images.shape[0], self.threads)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if self.device.type == "cuda":
            images = images.pin_memory()  # page-locked, so the copy below runs asynchronously
        return self.normalize(images.to(self.device, non_blocking=True))

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 pixels already on the device -> the float input the subnets were trained on."""
        return (images.float() - self._mean) * self._inverse_std

    def _count_call(self) -> None:
        with self._calls_lock:
            self._calls += 1
