"""Elastic input resolution: a subnet may look at a smaller copy of the image.

A CNN that ends in global average pooling runs at any input size, and at half the side every
convolution costs a quarter; once-for-all trains its supernet elastic in resolution for this
reason. Here the image still arrives at the dataset's size: a subnet with a lower resolution shrinks
it by area averaging (adaptive average pooling, exact block means when the sizes divide) as its
first operation, so the server, the clients and the preprocessing never change. Training samples
the resolution with the subnet (the sandwich's smallest at the lowest), batch norm is recalibrated
per (subnet, resolution), and a served row carries its resolution in the subnet table.

A resolution is the width of the shrunk image; the height keeps the input's aspect ratio.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from slimserve.models.ops import BNStats
from slimserve.models.registry import Step, Supernet, segments_of
from slimserve.models.subnet import Subnet


def scaled_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The (height, width) an input of ``height x width`` is shrunk to at ``resolution``."""
    return max(1, round(height * resolution / width)), resolution


def resize(x: Tensor, resolution: int | None) -> Tensor:
    """``x`` (N, C, H, W) averaged down to ``resolution``; unchanged at its own width or with None."""
    if resolution is None or resolution == x.shape[-1]:
        return x
    return F.adaptive_avg_pool2d(x, scaled_size(x.shape[-2], x.shape[-1], resolution))


def check_resolutions(resolutions: Sequence[int], native: int) -> tuple[int, ...]:
    """``resolutions`` sorted from the input's own width down, or a ValueError that says what is wrong.

    Empty means "the input's own resolution only". A resolution above the input's width would
    upsample (more cost, no information), so it is refused.
    """
    if not resolutions:
        return (native,)
    bad = [r for r in resolutions if not 4 <= r <= native]
    if bad:
        raise ValueError(f"resolutions must be between 4 and the input width {native}, got {bad}")
    if len(set(resolutions)) != len(resolutions):
        raise ValueError(f"resolutions must be distinct, got {list(resolutions)}")
    if native not in resolutions:
        raise ValueError(
            f"resolutions must include the input width {native} (the largest subnet's), got {list(resolutions)}"
        )
    return tuple(sorted(resolutions, reverse=True))


def draw_resolution(rng: random.Random, resolutions: Sequence[int]) -> int:
    """A random one of ``resolutions``; with only one, no draw at all, so a run without elastic
    resolution consumes ``rng`` exactly as before it existed (same subnets for the same seed)."""
    return rng.choice(resolutions) if len(resolutions) > 1 else resolutions[0]


class AtResolution(nn.Module):
    """A materialized subnet that first shrinks its input to ``resolution``: what the server runs
    for a table row with a resolution below the input's."""

    def __init__(self, module: nn.Module, resolution: int) -> None:
        super().__init__()
        self.module = module
        self.resolution = resolution

    def forward(self, x: Tensor) -> Tensor:
        return self.module(resize(x, self.resolution))

    def segments(self) -> list[Step]:
        """The wrapped module's steps (see ``StaticResNet.segments``), the resize folded into the first."""
        first, *rest = segments_of(self.module)
        return [lambda x: first(resize(x, self.resolution)), *rest]

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}"


def materialize(supernet: Supernet, subnet: Subnet, bn_stats: BNStats, resolution: int | None = None) -> nn.Module:
    """``supernet.materialize`` at ``resolution`` (None or the input's width: as it is)."""
    static = supernet.materialize(subnet, bn_stats)
    if resolution is None or resolution == supernet.input_shape[-1]:
        return static
    return AtResolution(static, resolution)


def input_shape_at(input_shape: tuple[int, ...], resolution: int) -> tuple[int, ...]:
    """``(C, H, W)`` as a subnet at ``resolution`` sees it."""
    channels, height, width = input_shape
    return (channels, *scaled_size(height, width, resolution))
