"""Warm-up runs every subnet at the batch sizes it will serve, on the thread that will serve them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimserve.models.bundle import load_bundle
from slimserve.server.runtime import ModelRuntime
from tests.helpers import make_tiny_bundle


@pytest.fixture
def runtime(tmp_path: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(make_tiny_bundle(tmp_path)), threads=1)


def _record(runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch, run: bool = True) -> list[tuple[int, int]]:
    """(subnet, batch) of every forward the runtime is asked for from now on (run, unless ``run`` is False)."""
    calls: list[tuple[int, int]] = []
    infer = runtime.infer

    def recording(subnet: int, images: torch.Tensor) -> torch.Tensor:
        calls.append((subnet, images.shape[0]))
        return infer(subnet, images) if run else torch.empty(0)

    monkeypatch.setattr(runtime, "infer", recording)
    return calls


def test_start_up_warm_up_runs_the_power_of_two_sizes_and_the_limit(
    runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record(runtime, monkeypatch)
    runtime.warm_up(max_batch=6, repeats=1)
    assert calls == [(s.index, b) for s in runtime.subnets for b in (1, 2, 4, 6)]
    assert runtime.model_calls == 0  # warm-up is not traffic


def test_every_size_warm_up_runs_each_batch_size_up_to_the_limit(
    runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record(runtime, monkeypatch)
    runtime.warm_up(max_batch=5, repeats=2, every_size=True)
    assert calls == [(s.index, b) for s in runtime.subnets for b in (1, 2, 3, 4, 5) for _ in range(2)]


def test_a_cpu_serving_thread_warms_with_one_image_per_subnet(
    runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record(runtime, monkeypatch)
    runtime.warm_this_thread(max_batch=32)
    assert calls == [(s.index, 1) for s in runtime.subnets]


def test_a_gpu_serving_thread_warms_every_size_it_may_batch(
    runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cuDNN's plans are cached per thread and shape: a size first met while serving would build them then.
    # Only the choice of sizes is checked here (no forward runs); tests/integration/server/test_cuda.py
    # runs it on a GPU.
    calls = _record(runtime, monkeypatch, run=False)
    monkeypatch.setattr(runtime, "device", torch.device("cuda", 0))
    runtime.warm_this_thread(max_batch=4)
    assert calls == [(s.index, b) for s in runtime.subnets for b in (1, 2, 3, 4)]
