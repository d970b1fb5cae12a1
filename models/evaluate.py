"""Accuracy of subnets, measured the way they are served: calibrated, materialized, eval mode."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from slimserve.models.bn_calibration import DEFAULT_CALIBRATION_IMAGES, calibrate_bn
from slimserve.models.datasets import ImageDataset
from slimserve.models.ops import BNStats
from slimserve.models.registry import Supernet
from slimserve.models.resolution import materialize
from slimserve.models.subnet import Subnet
from slimserve.models.transforms import normalize


@torch.inference_mode()
def accuracy(
    model: nn.Module, dataset: ImageDataset, mean: Sequence[float], std: Sequence[float], batch_size: int = 512
) -> float:
    """Top-1 accuracy in [0, 1] of a static module on a dataset."""
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(dataset), batch_size):
        images = normalize(dataset.images[start : start + batch_size].to(device), mean, std)
        predictions = model(images).argmax(1).cpu()
        correct += int((predictions == dataset.labels[start : start + batch_size]).sum())
    return correct / len(dataset)


def calibration_images(
    train: ImageDataset,
    mean: Sequence[float],
    std: Sequence[float],
    count: int = DEFAULT_CALIBRATION_IMAGES,
    seed: int = 0,
) -> Tensor:
    """A fixed random sample of normalized training images for batch-norm recalibration."""
    count = min(count, len(train))
    indices = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
    return normalize(train.images[indices], mean, std)


def calibrate_and_evaluate(
    supernet: Supernet,
    subnets: Sequence[Subnet],
    calibration: Tensor,
    dataset: ImageDataset,
    mean: Sequence[float],
    std: Sequence[float],
    resolutions: Sequence[int | None] | None = None,
) -> list[tuple[float, BNStats]]:
    """For each subnet (at its resolution, if given): recalibrate its batch norm, materialize it,
    measure top-1 on ``dataset``."""
    device = calibration.device
    results = []
    for subnet, resolution in zip(subnets, resolutions or [None] * len(subnets), strict=True):
        stats = calibrate_bn(supernet, subnet, calibration, resolution=resolution)
        static = materialize(supernet, subnet, stats, resolution).to(device)
        results.append((accuracy(static, dataset, mean, std), stats))
    return results
