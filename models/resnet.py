"""Slimmable ResNets with basic blocks: the CIFAR-style ResNet-20 family and an ImageNet ResNet-18.

Prunable units (the entries of a subnet, in this order, stage by stage):

* ``stage{i}``: the residual stream of stage ``i``. Every layer that adds into it - the stem (for
  stage 0), each block's second conv, the projection shortcut - shares this width, because the
  residual addition needs equal channels.
* ``stage{i}.block{j}.mid``: the channels between a block's two convs, free to differ per block;
  0 drops the block (elastic depth: every stage runs its leading blocks, at least the first).

``SlimResNet`` is the weight-shared supernet used for training and search. ``StaticResNet`` is
what serving runs: one subnet's weights cut out, made contiguous, with batch norm folded into the
convolutions and the dropped blocks left out entirely (see :meth:`SlimResNet.materialize`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimserve.models.ops import (
    BNStats,
    NormMode,
    SlimBatchNorm2d,
    SlimConv2d,
    SlimLinear,
    batch_stats_norm,
    fold_batch_norm,
)
from slimserve.models.registry import ChannelAxis, Step, register_family
from slimserve.models.subnet import DepthGroup, Subnet, SubnetSpace, Unit


@dataclass(frozen=True)
class ResNetConfig:
    stage_channels: tuple[int, ...]  # full-width residual-stream channels of each stage
    blocks_per_stage: tuple[int, ...]
    in_channels: int
    num_classes: int
    image_size: int
    imagenet_stem: bool  # 7x7/2 conv + 3x3/2 max-pool (224 px inputs) instead of one 3x3/1 conv
    group_size: int = 8
    min_width: float = 0.125  # narrowest trained width multiplier (US-Nets trained [0.25, 1.0])


class SlimBasicBlock(nn.Module):
    def __init__(self, max_in: int, max_mid: int, max_out: int, stride: int, projection: bool) -> None:
        super().__init__()
        self.conv1 = SlimConv2d(max_in, max_mid, 3, stride, 1)
        self.bn1 = SlimBatchNorm2d(max_mid)
        self.conv2 = SlimConv2d(max_mid, max_out, 3, 1, 1)
        self.bn2 = SlimBatchNorm2d(max_out)
        self.shortcut_conv = SlimConv2d(max_in, max_out, 1, stride, 0) if projection else None
        self.shortcut_bn = SlimBatchNorm2d(max_out) if projection else None

    def forward(self, x: Tensor, out_channels: int, mid_channels: int, norm: NormMode) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x, mid_channels), norm))
        y = self.bn2(self.conv2(y, out_channels), norm)
        if self.shortcut_conv is None or self.shortcut_bn is None:
            shortcut = x
        else:
            shortcut = self.shortcut_bn(self.shortcut_conv(x, out_channels), norm)
        return F.relu(y + shortcut)


@dataclass(frozen=True)
class _BlockUnits:
    reads: int  # unit index of the stream the block's input belongs to
    writes: int  # unit index of the stream it adds into
    mid: int


class SlimResNet(nn.Module):
    """Weight-shared ResNet supernet; ``forward(x, subnet, norm)`` runs any valid subnet.

    Example:
        >>> net = create_supernet("cifar_resnet", depth=8, base_channels=16, in_channels=1, image_size=28)
        >>> logits = net(torch.randn(4, 1, 28, 28), net.space.uniform(0.5))
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        units: list[Unit] = []
        block_units: list[_BlockUnits] = []
        blocks: list[SlimBasicBlock] = []
        depth_groups: list[DepthGroup] = []

        def add_unit(name: str, channels: int) -> int:
            minimum = max(config.group_size, round(channels * config.min_width / config.group_size) * config.group_size)
            units.append(Unit(name, channels, minimum))
            return len(units) - 1

        stream_in = add_unit("stage0", config.stage_channels[0])
        max_in = config.stage_channels[0]
        self.stem_conv = SlimConv2d(config.in_channels, max_in, *((7, 2, 3) if config.imagenet_stem else (3, 1, 1)))
        self.stem_bn = SlimBatchNorm2d(max_in)
        self.stem_unit = stream_in
        for stage, (channels, count) in enumerate(zip(config.stage_channels, config.blocks_per_stage, strict=True)):
            stream_out = stream_in if stage == 0 else add_unit(f"stage{stage}", channels)
            stage_mids: list[int] = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                mid = add_unit(f"stage{stage}.block{index}.mid", channels)
                projection = stride != 1 or stream_in != stream_out
                blocks.append(SlimBasicBlock(max_in, channels, channels, stride, projection))
                block_units.append(_BlockUnits(reads=stream_in, writes=stream_out, mid=mid))
                stage_mids.append(mid)
                stream_in, max_in = stream_out, channels
            depth_groups.append(DepthGroup(f"stage{stage}", tuple(stage_mids), min_blocks=1))
        self.blocks = nn.ModuleList(blocks)
        self.block_units = tuple(block_units)
        self.fc = SlimLinear(max_in, config.num_classes)
        self.last_stream_unit = stream_in
        self.space = SubnetSpace(tuple(units), config.group_size, tuple(depth_groups))
        self.input_shape = (config.in_channels, config.image_size, config.image_size)
        self.num_classes = config.num_classes
        for name, module in self.named_modules():
            if isinstance(module, SlimBatchNorm2d):
                module.key = name

    @property
    def basic_blocks(self) -> list[SlimBasicBlock]:
        return [block for block in self.blocks if isinstance(block, SlimBasicBlock)]

    def forward(self, x: Tensor, subnet: Subnet, norm: NormMode = batch_stats_norm) -> Tensor:
        channels = self.space.validate(subnet)
        x = F.relu(self.stem_bn(self.stem_conv(x, channels[self.stem_unit]), norm))
        if self.config.imagenet_stem:
            x = F.max_pool2d(x, 3, 2, 1)
        for block, units in zip(self.basic_blocks, self.block_units, strict=True):
            if channels[units.mid]:  # 0: a dropped block, the identity carries the stream
                x = block(x, channels[units.writes], channels[units.mid], norm)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def channel_axes(self, unit_index: int) -> list[ChannelAxis]:
        def producer(prefix: str, conv: str, bn: str) -> list[ChannelAxis]:
            return [
                ChannelAxis(f"{prefix}{conv}.weight", 0, True),
                ChannelAxis(f"{prefix}{bn}.weight", 0, True),
                ChannelAxis(f"{prefix}{bn}.bias", 0, True),
            ]

        axes: list[ChannelAxis] = []
        if unit_index == self.stem_unit:
            axes += producer("", "stem_conv", "stem_bn")
        for index, (block, units) in enumerate(zip(self.basic_blocks, self.block_units, strict=True)):
            prefix = f"blocks.{index}."
            if units.mid == unit_index:
                axes += producer(prefix, "conv1", "bn1")
                axes.append(ChannelAxis(f"{prefix}conv2.weight", 1, False))
            if units.writes == unit_index:
                axes += producer(prefix, "conv2", "bn2")
                if block.shortcut_conv is not None:
                    axes += producer(prefix, "shortcut_conv", "shortcut_bn")
            if units.reads == unit_index:
                axes.append(ChannelAxis(f"{prefix}conv1.weight", 1, False))
                if block.shortcut_conv is not None:
                    axes.append(ChannelAxis(f"{prefix}shortcut_conv.weight", 1, False))
        if unit_index == self.last_stream_unit:
            axes.append(ChannelAxis("fc.weight", 1, False))
        if not axes:
            raise IndexError(f"unit index {unit_index} out of range (0..{len(self.space.units) - 1})")
        return axes

    @torch.no_grad()
    def materialize(self, subnet: Subnet, bn_stats: BNStats) -> StaticResNet:
        """Cut ``subnet`` out as a static, contiguous, batch-norm-folded, inference-only module."""
        channels = self.space.validate(subnet)

        def folded(conv: SlimConv2d, bn: SlimBatchNorm2d, in_channels: int, out_channels: int) -> nn.Conv2d:
            try:
                mean, var = bn_stats[bn.key]
            except KeyError:
                raise KeyError(f"bn_stats has no entry for layer {bn.key!r}") from None
            if mean.shape[0] != out_channels:
                raise ValueError(
                    f"bn_stats for {bn.key!r} hold {mean.shape[0]} channels but the subnet gives it {out_channels}"
                )
            weight, bias = fold_batch_norm(
                conv.weight[:out_channels, :in_channels],
                bn.weight[:out_channels],
                bn.bias[:out_channels],
                mean.to(conv.weight),
                var.to(conv.weight),
                bn.eps,
            )
            static = nn.Conv2d(in_channels, out_channels, conv.weight.shape[-1], conv.stride, conv.padding)
            static.weight = nn.Parameter(weight, requires_grad=False)
            static.bias = nn.Parameter(bias, requires_grad=False)
            return static

        in_channels = self.config.in_channels
        stem = folded(self.stem_conv, self.stem_bn, in_channels, channels[self.stem_unit])
        in_channels = channels[self.stem_unit]
        blocks = []
        for block, units in zip(self.basic_blocks, self.block_units, strict=True):
            mid, out = channels[units.mid], channels[units.writes]
            if not mid:
                continue  # a dropped block is not part of the static module at all
            shortcut = None
            if block.shortcut_conv is not None and block.shortcut_bn is not None:
                shortcut = folded(block.shortcut_conv, block.shortcut_bn, in_channels, out)
            blocks.append(
                StaticBasicBlock(
                    folded(block.conv1, block.bn1, in_channels, mid), folded(block.conv2, block.bn2, mid, out), shortcut
                )
            )
            in_channels = out
        fc = nn.Linear(in_channels, self.config.num_classes)
        fc.weight = nn.Parameter(self.fc.weight[:, :in_channels].contiguous(), requires_grad=False)
        fc.bias = nn.Parameter(self.fc.bias.clone(), requires_grad=False)
        return StaticResNet(stem, self.config.imagenet_stem, blocks, fc)


class StaticBasicBlock(nn.Module):
    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, shortcut: nn.Conv2d | None) -> None:
        super().__init__()
        self.conv1, self.conv2, self.shortcut = conv1, conv2, shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class StaticResNet(nn.Module):
    """One materialized subnet: plain convolutions with folded batch norm. Inference only."""

    def __init__(self, stem: nn.Conv2d, max_pool: bool, blocks: list[StaticBasicBlock], fc: nn.Linear) -> None:
        super().__init__()
        self.stem = stem
        self.max_pool = max_pool
        self.blocks = nn.Sequential(*blocks)
        self.fc = fc
        self.eval()

    def train(self, mode: bool = True) -> StaticResNet:
        if mode:
            raise RuntimeError("a materialized subnet is inference-only: its batch norm is folded away")
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        for segment in self.segments():
            x = segment(x)
        return x

    def segments(self) -> list[Step]:
        """The forward pass as a chain of steps (stem, each residual block, head) that compose to it:
        the server can pause a batch between two steps to run an urgent one (server/scheduler.py)."""
        return [self._stem, *self.blocks, self._head]

    def _stem(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        return F.max_pool2d(x, 3, 2, 1) if self.max_pool else x

    def _head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_family("cifar_resnet")
def cifar_resnet(
    depth: int = 20,
    base_channels: int = 16,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    group_size: int = 8,
    min_width: float = 0.125,
) -> SlimResNet:
    """CIFAR-style ResNet (He et al. 2016, section 4.2): depth = 6n + 2, stages of base, 2x, 4x channels."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
    per_stage = (depth - 2) // 6
    return SlimResNet(
        ResNetConfig(
            stage_channels=(base_channels, 2 * base_channels, 4 * base_channels),
            blocks_per_stage=(per_stage,) * 3,
            in_channels=in_channels,
            num_classes=num_classes,
            image_size=image_size,
            imagenet_stem=False,
            group_size=group_size,
            min_width=min_width,
        )
    )


@register_family("imagenet_resnet18")
def imagenet_resnet18(
    in_channels: int = 3,
    num_classes: int = 1000,
    image_size: int = 224,
    group_size: int = 8,
    min_width: float = 0.125,
) -> SlimResNet:
    """ResNet-18 for 224x224 inputs, the reference network of US-Nets and of Yang et al. (TNNLS 2022)."""
    return SlimResNet(
        ResNetConfig(
            stage_channels=(64, 128, 256, 512),
            blocks_per_stage=(2, 2, 2, 2),
            in_channels=in_channels,
            num_classes=num_classes,
            image_size=image_size,
            imagenet_stem=True,
            group_size=group_size,
            min_width=min_width,
        )
    )
