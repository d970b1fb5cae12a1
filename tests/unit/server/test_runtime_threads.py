"""Each subnet runs each batch size with the intra-op threads its latency column found fastest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimserve.models.bundle import load_bundle
from slimserve.models.schema import LatencyStat
from slimserve.server.runtime import ModelRuntime, thread_plan, threads_for
from tests.helpers import make_tiny_bundle


def stat(threads: int | None) -> LatencyStat:
    return LatencyStat(p50_ms=1.0, p95_ms=2.0, threads=threads)


def test_the_plan_lists_profiled_batches_in_order_capped_at_the_runtimes_threads() -> None:
    latency = {8: stat(4), 1: stat(1), 32: stat(2)}
    assert thread_plan(latency, threads=2) == ((1, 1), (8, 2), (32, 2))
    assert thread_plan(latency, threads=8) == ((1, 1), (8, 4), (32, 2))
    assert thread_plan({1: stat(None), 8: stat(None)}, threads=2) == ()  # a schema-2 column names none


@pytest.mark.parametrize(
    ("batch", "expected"),
    [(1, 1), (2, 2), (4, 2), (5, 3), (8, 3), (9, 3), (64, 3)],
)
def test_a_batch_takes_the_threads_of_the_smallest_profiled_batch_not_below_it(batch: int, expected: int) -> None:
    plan = ((1, 1), (4, 2), (8, 3))
    assert threads_for(plan, batch, default=7) == expected


def test_without_a_plan_the_runtimes_threads_apply() -> None:
    assert threads_for((), 1, default=2) == 2


def _threads_seen(runtime: ModelRuntime, batch: int) -> int:
    seen: list[int] = []
    module = runtime.subnets[0].module
    handle = module.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        runtime.infer(0, torch.zeros(batch, *runtime.input_shape, dtype=torch.uint8))
    finally:
        handle.remove()
    return seen[0]


def test_inference_runs_with_the_planned_threads_only_when_the_column_is_given(tmp_path: Path) -> None:
    bundle = load_bundle(make_tiny_bundle(tmp_path))  # its column: 1 thread up to batch 4, 2 above
    previous = torch.get_num_threads()
    try:
        planned = ModelRuntime(bundle, threads=2, column="cpu-2t")
        assert [_threads_seen(planned, b) for b in (1, 4, 5, 32, 40)] == [1, 1, 2, 2, 2]
        unplanned = ModelRuntime(bundle, threads=2)
        assert [_threads_seen(unplanned, b) for b in (1, 32)] == [2, 2]
    finally:
        torch.set_num_threads(previous)
