"""Probe for issue 13: how accurate can the narrowest width be at a lower input resolution?

Trains the family's width-1/8 network alone (full depth, the same 12-epoch schedule as
``make baselines``) on Fashion-MNIST downsampled to SIZE x SIZE pixels (area interpolation) and
prints its test top-1. Run from the repository root:
``.venv/bin/python docs/probes/train_at_resolution.py 14`` (about 3 minutes on 2 cores; 7: under 2).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from slimserve.models.datasets import ImageDataset, Splits, load_splits
from slimserve.models.train import TrainConfig, train


def shrink(dataset: ImageDataset, size: int) -> ImageDataset:
    images = F.interpolate(dataset.images.float(), size=(size, size), mode="area")
    return dataclasses.replace(
        dataset, images=images.round().clamp(0, 255).to(torch.uint8), name=f"{dataset.name}@{size}px"
    )


def main() -> None:
    size = int(sys.argv[1])
    splits = load_splits("fashion-mnist", None, channels=1)
    small = Splits(*(shrink(d, size) for d in (splits.train, splits.search, splits.test)))
    config = TrainConfig(epochs=12, static_width=0.125, seed=0)
    result = train(config, small, Path(f"runs/probe-resolution/static-0.125-{size}px"), progress=False)
    sys.stdout.write(f"{size}x{size}: test top-1 {100 * result.test_accuracy['0.125']:.2f}% ({result.seconds:.0f} s)\n")


if __name__ == "__main__":
    main()
