"""Tensor transforms shared by training, search and serving, so every stage sees the same inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``[N, C, H, W]`` -> float32, scaled to [0, 1] then standardized per channel."""
    shape = (1, len(mean), 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).reshape(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).reshape(shape)
    return (images.to(torch.float32) / 255.0 - mean_t) / std_t


def augment(images: Tensor, generator: torch.Generator, padding: int = 2, flip: bool = True) -> Tensor:
    """Random crop with zero padding and random horizontal flip (the CIFAR ResNet recipe), vectorized.

    Deterministic given ``generator``, so a resumed run replays exactly the same batches.
    """
    n, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(height)).reshape(n, 1, height, 1)
    cols = (offsets[:, 1, None] + torch.arange(width)).reshape(n, 1, 1, width)
    batch = torch.arange(n).reshape(n, 1, 1, 1)
    channels = torch.arange(images.shape[1]).reshape(1, -1, 1, 1)
    cropped = padded[batch, channels, rows, cols]
    if flip:
        flips = torch.rand(n, generator=generator) < 0.5
        cropped[flips] = cropped[flips].flip(-1)
    return cropped
