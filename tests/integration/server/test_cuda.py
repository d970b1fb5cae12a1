"""The committed bundles served on a GPU: the same answers as on the CPU for every kind of row (plain,
lower resolution, multi-stage, gated), a batch run step by step equal to it run whole, and a server
on ``cuda:0`` that answers over HTTP and reports the GPU through NVML. Skipped (and listed as
skipped) on a machine without CUDA; docs/BENCHMARKS.md, "GPU", says where these last ran."""

from __future__ import annotations

import pytest
import torch

from slimserve.models.bundle import load_bundle
from slimserve.models.datasets import ImageDataset
from slimserve.server.runtime import ModelRuntime
from slimserve.server.settings import DEMO_BUNDLE
from tests.integration.server.conftest import png

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODELS = DEMO_BUNDLE.parent
IMAGES = 256


def _agreement(cpu: torch.Tensor, gpu: torch.Tensor) -> tuple[float, float]:
    """Share of images with the same top-1 class, and the largest probability difference."""
    return (cpu.argmax(1) == gpu.argmax(1)).float().mean().item(), (cpu - gpu).abs().max().item()


@pytest.mark.parametrize("name", ["demo", "s2dnas", "lcnet"])
def test_every_row_answers_on_the_gpu_as_on_the_cpu(name: str, fmnist_test: ImageDataset) -> None:
    bundle = load_bundle(MODELS / name)
    cpu, gpu = ModelRuntime(bundle, device="cpu", threads=2), ModelRuntime(bundle, device="cuda", threads=2)
    images = fmnist_test.images[:IMAGES]
    assert len(gpu.subnets) == len(bundle.table.subnets)
    for subnet in cpu.subnets:
        if subnet.last_stage is not None:
            every_stage = lambda rows, _stage: torch.ones_like(rows, dtype=torch.bool)  # noqa: E731
            on_cpu = cpu.infer_with_exits(subnet.index, images, every_stage).probabilities
            on_gpu = gpu.infer_with_exits(subnet.index, images, every_stage).probabilities
        elif bundle.gated is not None:
            on_cpu, on_gpu = (
                cpu.infer_gated(subnet.index, images).probabilities,
                gpu.infer_gated(subnet.index, images).probabilities,
            )
        else:
            on_cpu, on_gpu = cpu.infer(subnet.index, images), gpu.infer(subnet.index, images)
        assert on_gpu.device.type == "cpu"  # answers come back to the host, whatever ran them
        same, largest = _agreement(on_cpu, on_gpu)
        # cuDNN picks other kernels (and TF32 for convolutions): close, not bit-equal; a gate that
        # flips on a borderline image may change that image's answer
        assert same >= 0.98, f"{name} {subnet.row.id}: {same:.1%} same top-1 on GPU and CPU"
        assert largest < (0.5 if bundle.gated is not None else 0.05), f"{name} {subnet.row.id}: {largest}"


def test_a_batch_run_step_by_step_on_the_gpu_answers_what_it_answers_whole(fmnist_test: ImageDataset) -> None:
    runtime = ModelRuntime(load_bundle(DEMO_BUNDLE), device="cuda", threads=2)
    images = fmnist_test.images[:32]
    for subnet in runtime.subnets:
        progress = runtime.begin(subnet.index, images)
        while not progress.finished:
            progress.step()
        torch.testing.assert_close(progress.probabilities, runtime.infer(subnet.index, images), rtol=0, atol=1e-5)


def test_a_server_on_the_gpu_answers_and_reports_the_gpu(client_factory) -> None:
    client = client_factory(bundle=DEMO_BUNDLE, device="cuda:0")
    for budget in ("5", "500"):
        response = client.post("/v1/classify", content=png(), headers={"X-Latency-Budget-Ms": budget})
        assert response.status_code == 200, response.text
    status = client.get("/v1/status").json()
    assert status["gpu_memory_total_mb"] > 1000, status  # NVML read the card this server runs on
    assert 0 <= status["gpu_percent"] <= 100, status


def test_a_peer_model_on_the_gpu_answers_as_on_the_cpu(fmnist_test: ImageDataset) -> None:
    from slimserve.server.peers.model import PeerModel

    images = list(fmnist_test.images[:64])
    for row in ("s0", "s7"):
        cpu, gpu = PeerModel(DEMO_BUNDLE, row), PeerModel(DEMO_BUNDLE, row, device="cuda:0")
        assert gpu.runtime.device.type == "cuda"
        on_cpu = torch.tensor([p.probabilities for p in cpu.predict(images)])
        on_gpu = torch.tensor([p.probabilities for p in gpu.predict(images)])
        same, largest = _agreement(on_cpu, on_gpu)
        assert same >= 0.98 and largest < 0.05, f"{row}: {same:.1%} same top-1, largest difference {largest}"
