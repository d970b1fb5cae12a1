"""In-process benchmarks of the runtime, behind ``slimserve bench switch|wake|gil|steps|first-batches|decide`` (docs/BENCHMARKS.md).

They load a bundle into this process and time the model directly, with no HTTP in the way; the
benchmarks that drive a whole server live in :mod:`slimserve.loadtest.benchmarks`. Benchmarks, not
tests: their numbers depend on the machine.
"""

from __future__ import annotations

import dataclasses
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimserve.models.bundle import load_bundle
from slimserve.models.openmp import wait_environment
from slimserve.models.schema import TABLE_FILE, BundleError, SubnetTable, read_table
from slimserve.server.engine import profiled_ms
from slimserve.server.latency_model import LatencyModel
from slimserve.server.policy import AdaptivePolicy, Context, Pending, RecentBudgets
from slimserve.server.runtime import ModelRuntime


def switch_cost(bundle_dir: Path, repeats: int = 300, threads: int = 2) -> dict[str, Any]:
    """In-process: forward passes repeating one subnet vs alternating between two (same total work)."""
    torch.set_num_threads(threads)
    runtime = ModelRuntime(load_bundle(bundle_dir), threads=threads)
    runtime.warm_up(8)
    results: dict[str, Any] = {"materialize_all_s": round(runtime.materialize_seconds, 3), "by_batch": {}}
    pairs = [(0, len(runtime.subnets) - 1), (len(runtime.subnets) // 2, len(runtime.subnets) // 2 + 1)]
    for batch in (1, 8):
        images = torch.randint(0, 256, (batch, *runtime.input_shape), dtype=torch.uint8)
        entry = {}
        for first, second in pairs:
            timings: dict[str, list[float]] = {"same": [], "alternating": []}
            for _ in range(repeats):
                for mode, order in (
                    ("same", (first, first, second, second)),
                    ("alternating", (first, second, first, second)),
                ):
                    started = time.perf_counter()
                    for subnet in order:
                        runtime.infer(subnet, images)
                    timings[mode].append((time.perf_counter() - started) * 1000 / 4)
            same, alternating = statistics.median(timings["same"]), statistics.median(timings["alternating"])
            entry[f"s{first}<->s{second}"] = {
                "same_subnet_ms_per_call": round(same, 4),
                "alternating_ms_per_call": round(alternating, 4),
                "switch_cost_ms": round(alternating - same, 4),
            }
        results["by_batch"][str(batch)] = entry
    return results


def step_cost(bundle_dir: Path, repeats: int = 200, threads: int = 2, device: str = "cpu") -> dict[str, Any]:
    """In-process, per plain row and batch size: a batch run whole vs step by step (what a pausable
    batch costs, p50 ms per call, interleaved), and the longest step's share of the batch (how long a
    request arriving mid-batch waits before it can run ahead of it)."""
    torch.set_num_threads(threads)
    runtime = ModelRuntime(load_bundle(bundle_dir), device=device, threads=threads)
    runtime.warm_up(8)
    rows: dict[str, Any] = {}
    for subnet in runtime.subnets:
        if len(subnet.segments) <= 1:
            continue
        entry = {}
        for batch in (1, 8):
            images = torch.randint(0, 256, (batch, *runtime.input_shape), dtype=torch.uint8)
            whole, stepped, steps = [], [], []
            for _ in range(repeats):
                started = time.perf_counter()
                runtime.infer(subnet.index, images)
                whole.append(time.perf_counter() - started)
                started = time.perf_counter()
                progress, marks = runtime.begin(subnet.index, images), []
                while not progress.finished:
                    progress.step()
                    marks.append(time.perf_counter())
                _ = progress.probabilities
                stepped.append(time.perf_counter() - started)
                steps.append(np.diff([started, *marks]))
            per_step = np.median(np.array(steps), axis=0)
            entry[str(batch)] = {
                "whole_ms": round(statistics.median(whole) * 1000, 3),
                "stepped_ms": round(statistics.median(stepped) * 1000, 3),
                "steps": len(per_step),
                "longest_step_share": round(float(per_step.max() / per_step.sum()), 3),
                "longest_over_mean_step": round(float(per_step.max() / per_step.mean()), 2),
            }
        rows[subnet.row.id] = entry
    return {"device": device, "threads": threads, "repeats": repeats, "rows": rows}


def idle_wake(
    bundle_dir: Path,
    gaps_ms: tuple[float, ...] = (0.0, 2.0, 20.0),
    thread_counts: tuple[int, ...] = (1, 2),
    repeats: int = 60,
) -> dict[str, Any]:
    """In-process, batch 1: the fastest and the most accurate row, each call after an idle gap,
    per intra-op thread count, on the process's main thread and on another thread (where the
    server's inference worker runs), under this process's OpenMP wait setting (models/openmp.py)."""
    bundle = load_bundle(bundle_dir)
    rows = (bundle.table.subnets[0], bundle.table.subnets[-1])
    modules = [bundle.materialize(row).eval() for row in rows]
    x = torch.randn(1, *bundle.supernet.input_shape)
    results: dict[str, Any] = {
        "openmp_wait": wait_environment(),
        "omp_proc_bind": os.environ.get("OMP_PROC_BIND"),
        "repeats": repeats,
        "ms_p50_p90": {},
    }

    def time_rows(where: str) -> None:
        with torch.inference_mode():
            for row, module in zip(rows, modules, strict=True):
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    for _ in range(5):
                        module(x)
                    for gap in gaps_ms:
                        timings = []
                        for _ in range(repeats):
                            time.sleep(gap / 1000)
                            started = time.perf_counter()
                            module(x)
                            timings.append((time.perf_counter() - started) * 1000)
                        key = f"{row.id}, {threads} threads, gap {gap:g} ms"
                        results["ms_p50_p90"].setdefault(key, {})[where] = [
                            round(statistics.median(timings), 3),
                            round(float(np.percentile(timings, 90)), 3),
                        ]

    time_rows("main thread")
    other = threading.Thread(target=time_rows, args=("other thread",))
    other.start()
    other.join()
    return results


def _spin_until(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def gil_starvation(
    bundle_dir: Path,
    intervals_ms: tuple[float, ...] = (5.0, 0.5),
    repeats: int = 100,
    threads: int = 2,
    rounds: int = 3,
) -> dict[str, Any]:
    """In-process: the fastest subnet at batch 1, alone and while a pure-Python thread spins (what
    a busy event loop does to the inference thread), for each ``sys.setswitchinterval``; the
    intervals alternate for ``rounds`` rounds so drift hits each alike."""
    runtime = ModelRuntime(load_bundle(bundle_dir), threads=threads)
    runtime.warm_up(1)
    image = torch.zeros(1, *runtime.input_shape, dtype=torch.uint8)

    def median_ms() -> float:
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            runtime.infer(0, image)
            timings.append(time.perf_counter() - started)
        return round(statistics.median(timings) * 1000, 3)

    default = sys.getswitchinterval()
    rows: dict[str, dict[str, list[float]]] = {
        str(i): {"alone_ms": [], "with_busy_python_thread_ms": []} for i in intervals_ms
    }
    try:
        for _ in range(rounds):
            for interval in intervals_ms:
                sys.setswitchinterval(interval / 1000)
                rows[str(interval)]["alone_ms"].append(median_ms())
                busy = threading.Event()
                spinner = threading.Thread(target=_spin_until, args=(busy,), daemon=True)
                spinner.start()
                try:
                    rows[str(interval)]["with_busy_python_thread_ms"].append(median_ms())
                finally:
                    busy.set()
                    spinner.join()
    finally:
        sys.setswitchinterval(default)
    return {"subnet": runtime.subnets[0].row.id, "batch": 1, "rounds": rounds, "by_interval_ms": rows}


def first_batches(bundle_dir: Path, device: str = "cpu", max_batch: int = 32, threads: int = 2) -> dict[str, Any]:
    """In-process, the fastest and the most accurate row: each batch size's first and second forward
    on a fresh thread (ms), after the start-up warm-up ran on another thread (the server's loader)
    and after the thread warmed itself (:meth:`ModelRuntime.warm_this_thread`), as a server's
    inference thread is now; then where a batch's time goes (pin, copy in, forward, copy out)."""
    torch.set_num_threads(threads)
    runtime = ModelRuntime(load_bundle(bundle_dir), device=device, threads=threads)
    loader = threading.Thread(target=runtime.warm_up, args=(max_batch,))
    loader.start()
    loader.join()
    rows = (runtime.subnets[0], runtime.subnets[-1])
    results: dict[str, Any] = {"device": device, "max_batch": max_batch, "first_second_ms": {}}

    def first_and_second(case: str, warm_itself: bool) -> None:
        if warm_itself:
            runtime.warm_this_thread(max_batch)
        for subnet in rows:
            timings = {}
            for batch in range(1, max_batch + 1):
                images = torch.randint(0, 256, (batch, *runtime.input_shape), dtype=torch.uint8)
                calls = []
                for _ in range(2):
                    started = time.perf_counter()
                    runtime.infer(subnet.index, images)
                    calls.append(round((time.perf_counter() - started) * 1000, 3))
                timings[str(batch)] = calls
            firsts = [first for first, _ in timings.values()]
            results["first_second_ms"].setdefault(case, {})[subnet.row.id] = {
                "median_first_over_second": round(statistics.median(f / s for f, s in timings.values()), 2),
                "max_first": max(firsts),
                "by_batch": timings,
            }

    for case, warm_itself in (("warmed on another thread", False), ("warmed on itself", True)):
        worker = threading.Thread(target=first_and_second, args=(case, warm_itself))
        worker.start()
        worker.join()
    results["parts_ms_p50"] = _batch_parts(runtime, rows)
    return results


def _batch_parts(runtime: ModelRuntime, rows: tuple[Any, ...], repeats: int = 50) -> dict[str, Any]:
    """Median ms of each part of a batch, each part ended by a device sync."""
    on_gpu = runtime.device.type == "cuda"

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(runtime.device)

    parts: dict[str, Any] = {}
    with torch.inference_mode():
        for subnet in rows:
            for batch in (1, 8, 32):
                images = torch.randint(0, 256, (batch, *runtime.input_shape), dtype=torch.uint8)
                timings: dict[str, list[float]] = {"pin": [], "copy_in": [], "forward": [], "copy_out": []}
                for _ in range(repeats):
                    marks = [time.perf_counter()]
                    pinned = images.pin_memory() if on_gpu else images
                    marks.append(time.perf_counter())
                    x = runtime.normalize(pinned.to(runtime.device, non_blocking=True))
                    sync()
                    marks.append(time.perf_counter())
                    logits = subnet.module(x)
                    sync()
                    marks.append(time.perf_counter())
                    torch.softmax(logits, dim=1).cpu()
                    marks.append(time.perf_counter())
                    for name, start, end in zip(timings, marks, marks[1:], strict=False):
                        timings[name].append((end - start) * 1000)
                parts[f"{subnet.row.id} b{batch}"] = {k: round(statistics.median(v), 3) for k, v in timings.items()}
    return parts


def table_and_column(bundle_dir: Path, column: str | None) -> tuple[SubnetTable, str]:
    """The bundle's table and the latency column asked for (its primary one by default); a
    BundleError names the columns when the table lacks it."""
    table = read_table(bundle_dir / TABLE_FILE)
    column = column or table.primary_device
    if column not in table.devices:
        raise BundleError(
            f"{bundle_dir / TABLE_FILE} has no latency column {column!r} (columns: {', '.join(table.devices)})"
        )
    return table, column


def decision_time(
    bundle_dir: Path, column: str | None = None, lengths: tuple[int, ...] = (1, 2, 4, 8, 16), seed: int = 0
) -> dict[str, Any]:
    """The adaptive policy's time per decision, weighing splits or not, per queue length.

    The setting is the serving path's: the table's latency column (the primary one by default)
    behind a latency model that has seen 300 batches run 1.3-1.5x slower than the table; requests
    with three budgets, 1.5x, 3x and 10x the most accurate row's batch-1 time (on the H200 column
    2.4, 4.7 and 16 ms, what a 6/8/20 ms mix leaves after the front end and the safety margin), of
    which 50-100% is left; arrivals at half the rate the most accurate row serves one at a time.
    Each length is timed over 300 queues, best of 7 passes (CPU time), so other processes count
    little.
    """
    table, column = table_and_column(bundle_dir, column)
    profiled = profiled_ms(table.subnets, column)
    model = LatencyModel(profiled, max_batch=32)
    rng = random.Random(seed)
    for _ in range(300):
        subnet, batch = rng.randrange(len(profiled)), rng.randrange(1, 9)
        model.observe(subnet, batch, model.base[subnet][batch - 1] * rng.uniform(1.3, 1.5))
    widest = model.base[-1][0]
    budgets = (1.5 * widest, 3 * widest, 10 * widest)
    context = Context(
        0.0,
        model.predict,
        32,
        0.5 / widest,
        RecentBudgets.of(rng.choice(budgets) for _ in range(256)),
        0.0,
        model.overrun_probability,
        model.expected,
    )
    whole = AdaptivePolicy(tuple(row.accuracy for row in table.subnets))
    split = dataclasses.replace(whole, split_batches=True)
    by_length: dict[str, Any] = {}
    for length in lengths:
        queues = [
            [Pending(d, 0.0) for d in sorted(rng.choice(budgets) * rng.uniform(0.5, 1.0) for _ in range(length))]
            for _ in range(300)
        ]
        entry: dict[str, Any] = {}
        for name, policy in (("split_us", split), ("no_split_us", whole)):
            passes = []
            for _ in range(7):
                started = time.process_time()
                for queue in queues:
                    policy.decide(queue, context)
                passes.append((time.process_time() - started) / len(queues) * 1e6)
            entry[name] = round(min(passes), 1)
        changed = sum(
            dataclasses.astuple(split.decide(q, context))[:2] != dataclasses.astuple(whole.decide(q, context))[:2]
            for q in queues
        )
        entry["decisions_changed_share"] = round(changed / len(queues), 3)
        by_length[str(length)] = entry
    return {
        "column": column,
        "budgets_ms": [round(b * 1000, 2) for b in budgets],
        "per_queue_length": by_length,
        "python": sys.version.split()[0],
    }
