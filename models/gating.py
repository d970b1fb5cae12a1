"""LC-Net (Xia, Yin, Dai, Jha, IEEE TETC; arXiv 2007.15151): per-input gates that skip residual
blocks (L-Net) and channel groups (C-Net) of a trained ResNet, skipping the work for real.

For each running residual block, both gates read the global average pool of the block's input:

* **L-gate**: one fully connected unit, clipped to [0, 1]. 0 skips the block's residual branch
  (the shortcut still carries the stream); any other value scales the branch.
* **C-gate**: one fully connected unit per channel group of the block's first convolution, clipped
  to [0, 1]. 0 skips that group (its slice of the first convolution and the matching inputs of the
  second are not computed); any other value scales it.

:class:`GatedResNet` is the training form (the static network's own modules, gates applied as
scales, a FLOPs-weighted sparsity penalty on the gates); :class:`GatedStatic` is the served form
(batch norm folded), which gathers only the kept channel groups' weights and never runs a skipped
branch. Gates start open (bias 1, weight 0): before training, the gated network is the static one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimserve.models.ops import BNStats, NormMode, SlimBatchNorm2d, SlimConv2d, batch_stats_norm, fold_batch_norm
from slimserve.models.resnet import SlimBasicBlock, SlimResNet
from slimserve.models.subnet import Subnet

# How a batch whose images keep different channel groups runs a block: "union" computes the groups
# any image keeps, once, for the whole batch (an image's own gate zeroes the rest); "pattern" splits
# the batch by gate pattern and computes each sub-batch's own groups only.
Batching = Literal["union", "pattern"]
# How a branch computes only its kept groups: "gather" copies the kept groups' weights into new
# contiguous tensors (index_select) and runs two convolutions; "slices" runs each contiguous run of
# kept groups on views of the stored weights (no copy), the second convolution as a transposed one
# over weights stored pre-transposed, so a run's slice is contiguous too.
Kernels = Literal["gather", "slices"]


@dataclass(frozen=True)
class Gates:
    """Gate values of one batch: per running block, the L-gate ``[N]`` and the C-gates ``[N, groups]``."""

    layer: tuple[Tensor, ...]
    channel: tuple[Tensor, ...]


class GatedResNet(nn.Module):
    """A trained ResNet (one static subnet of a :class:`SlimResNet`) with LC-Net gates on every block."""

    def __init__(self, base: SlimResNet, subnet: Subnet) -> None:
        super().__init__()
        if base.config.imagenet_stem:
            raise ValueError("LC-Net gating supports the CIFAR-style ResNet family only")
        self.base = base
        self.subnet = base.space.validate(subnet)
        self.group_size = base.space.group_size
        self.running = [
            (block, units)
            for block, units in zip(base.basic_blocks, base.block_units, strict=True)
            if self.subnet[units.mid]
        ]
        self.layer_gate_list = [_open_gate(self.subnet[units.reads], 1) for _, units in self.running]
        self.channel_gate_list = [
            _open_gate(self.subnet[units.reads], self.subnet[units.mid] // self.group_size) for _, units in self.running
        ]
        self.layer_gates = nn.ModuleList(self.layer_gate_list)  # registered; the lists are typed views
        self.channel_gates = nn.ModuleList(self.channel_gate_list)
        self.branch_flops = self._branch_flops()

    def _branch_flops(self) -> tuple[float, ...]:
        """Per running block, the FLOPs of its two convolutions (what its gates can save), one image."""
        _, height, width = self.base.input_shape
        flops, size = [], (height, width)
        for block, units in self.running:
            stride = block.conv1.stride
            size = ((size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)
            mid, inputs, out = self.subnet[units.mid], self.subnet[units.reads], self.subnet[units.writes]
            flops.append(2.0 * 9 * size[0] * size[1] * mid * (inputs + out))
        return tuple(flops)

    def forward(self, x: Tensor, norm: NormMode = batch_stats_norm) -> tuple[Tensor, Gates]:
        base, channels = self.base, self.subnet
        x = F.relu(base.stem_bn(base.stem_conv(x, channels[base.stem_unit]), norm))
        layer_values, channel_values = [], []
        for (block, units), layer_gate, channel_gate in zip(
            self.running, self.layer_gate_list, self.channel_gate_list, strict=True
        ):
            pooled = x.mean((2, 3))
            layer = layer_gate(pooled).clamp(0.0, 1.0)
            channel = channel_gate(pooled).clamp(0.0, 1.0)
            x = _gated_block(
                block, x, channels[units.writes], channels[units.mid], norm, layer, channel, self.group_size
            )
            layer_values.append(layer.squeeze(1))
            channel_values.append(channel)
        logits = base.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return logits, Gates(tuple(layer_values), tuple(channel_values))

    def sparsity(self, gates: Gates) -> Tensor:
        """The FLOPs-weighted gate penalty: the expected share of the blocks' convolution FLOPs still run.

        A branch runs at its L-gate's value and, inside it, at its C-gates' mean value; weighting by
        each block's FLOPs makes a gate on an expensive block cost more to keep open.
        """
        total = sum(self.branch_flops)
        cost = sum(
            flops * (layer * channel.mean(1)).mean()
            for flops, layer, channel in zip(self.branch_flops, gates.layer, gates.channel, strict=True)
        )
        return torch.as_tensor(cost) / total

    @torch.no_grad()
    def materialize(self, bn_stats: BNStats, threshold: float = 0.0) -> GatedStatic:
        """The served form: batch norm folded, gates kept, contiguous weights.

        A gate at or below ``threshold`` skips what it gates (0: only closed gates skip); raising it
        trades accuracy for fewer FLOPs without retraining, one operating point per threshold.
        """
        base, channels = self.base, self.subnet

        def folded(conv: SlimConv2d, bn: SlimBatchNorm2d, inputs: int, outputs: int) -> tuple[Tensor, Tensor]:
            mean, var = bn_stats[bn.key]
            return fold_batch_norm(
                conv.weight[:outputs, :inputs], bn.weight[:outputs], bn.bias[:outputs], mean, var, bn.eps
            )

        stem = folded(base.stem_conv, base.stem_bn, base.config.in_channels, channels[base.stem_unit])
        blocks = []
        for (block, units), layer_gate, channel_gate in zip(
            self.running, self.layer_gate_list, self.channel_gate_list, strict=True
        ):
            inputs, mid, out = channels[units.reads], channels[units.mid], channels[units.writes]
            shortcut = None
            if block.shortcut_conv is not None and block.shortcut_bn is not None:
                shortcut = folded(block.shortcut_conv, block.shortcut_bn, inputs, out)
            blocks.append(
                _StaticGatedBlock(
                    folded(block.conv1, block.bn1, inputs, mid),
                    folded(block.conv2, block.bn2, mid, out),
                    shortcut,
                    block.conv1.stride,
                    layer_gate,
                    channel_gate,
                    self.group_size,
                )
            )
        last = channels[base.last_stream_unit]
        fc = nn.Linear(last, base.num_classes)
        fc.weight = nn.Parameter(base.fc.weight[:, :last].detach().clone(), requires_grad=False)
        fc.bias = nn.Parameter(base.fc.bias.detach().clone(), requires_grad=False)
        return GatedStatic(stem, blocks, fc, self.branch_flops, threshold)


def applied(layer: Tensor, channel: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """The gates as a block applies them: 0 for what is skipped. A channel group runs when both its
    C-gate and the block's L-gate exceed ``threshold``; a block whose groups are all skipped is skipped."""
    running = (layer > threshold).unsqueeze(1) & (channel > threshold)
    return layer * running.any(1), channel * running


def _open_gate(inputs: int, outputs: int) -> nn.Linear:
    gate = nn.Linear(inputs, outputs)
    nn.init.zeros_(gate.weight)
    nn.init.ones_(gate.bias)
    return gate


def _gated_block(
    block: SlimBasicBlock,
    x: Tensor,
    out_channels: int,
    mid_channels: int,
    norm: NormMode,
    layer: Tensor,
    channel: Tensor,
    group_size: int,
) -> Tensor:
    """The block with its branch scaled by the L-gate and its inner channels by the C-gates (training form)."""
    scale = channel.repeat_interleave(group_size, 1)[:, :, None, None]
    y = F.relu(block.bn1(block.conv1(x, mid_channels), norm)) * scale
    y = block.bn2(block.conv2(y, out_channels), norm)
    if block.shortcut_conv is None or block.shortcut_bn is None:
        shortcut = x
    else:
        shortcut = block.shortcut_bn(block.shortcut_conv(x, out_channels), norm)
    return F.relu(shortcut + layer[:, :, None, None] * y)


class _StaticGatedBlock(nn.Module):
    def __init__(
        self,
        conv1: tuple[Tensor, Tensor],
        conv2: tuple[Tensor, Tensor],
        shortcut: tuple[Tensor, Tensor] | None,
        stride: int,
        layer_gate: nn.Linear,
        channel_gate: nn.Linear,
        group_size: int,
    ) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(conv1[0], requires_grad=False), nn.Parameter(conv1[1], requires_grad=False)
        self.w2, self.b2 = nn.Parameter(conv2[0], requires_grad=False), nn.Parameter(conv2[1], requires_grad=False)
        self.ws = None if shortcut is None else nn.Parameter(shortcut[0], requires_grad=False)
        self.bs = None if shortcut is None else nn.Parameter(shortcut[1], requires_grad=False)
        self.stride = stride
        self.layer_gate = _frozen_copy(layer_gate)
        self.channel_gate = _frozen_copy(channel_gate)
        self.group_size = group_size
        self.branch_runs = 0  # how often the residual branch was computed (tests, profiling)
        self._w2_by_input: Tensor | None = None  # "slices" kernels: w2 laid out by input channel, made on first use

    def shortcut(self, x: Tensor) -> Tensor:
        if self.ws is None or self.bs is None:
            return x
        return F.conv2d(x, self.ws, self.bs, self.stride)

    def forward(
        self, x: Tensor, threshold: float, batching: Batching, kernels: Kernels = "gather"
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The block's output, and the gates it applied (``[N]`` and ``[N, groups]``; 0 where skipped)."""
        pooled = x.mean((2, 3))
        layer = self.layer_gate(pooled).clamp(0.0, 1.0).squeeze(1)
        channel = self.channel_gate(pooled).clamp(0.0, 1.0)
        layer, channel = applied(layer, channel, threshold)
        running = channel > 0
        out = self.shortcut(x)
        if batching == "union" or x.shape[0] == 1:
            groups = running.any(0).nonzero().squeeze(1)
            if groups.numel():
                out = out + layer[:, None, None, None] * self.branch(x, channel, groups, kernels)
            return F.relu(out), layer, channel
        patterns, which = torch.unique(running, dim=0, return_inverse=True)
        parts = []
        for index, pattern in enumerate(patterns):
            groups = pattern.nonzero().squeeze(1)
            if groups.numel():
                rows = (which == index).nonzero().squeeze(1)
                branch = self.branch(x[rows], channel[rows], groups, kernels)
                parts.append((rows, layer[rows, None, None, None] * branch))
        if parts:
            out = out.index_add(0, torch.cat([rows for rows, _ in parts]), torch.cat([y for _, y in parts]))
        return F.relu(out), layer, channel

    def branch(self, x: Tensor, channel: Tensor, groups: Tensor, kernels: Kernels = "gather") -> Tensor:
        """The residual branch computing only channel ``groups``, each scaled by its gate (0 for rows that skip it)."""
        self.branch_runs += 1
        if kernels == "slices" and groups.numel() < channel.shape[1]:
            return self._branch_on_slices(x, channel, groups)
        scale = channel[:, groups].repeat_interleave(self.group_size, 1)[:, :, None, None]
        if groups.numel() == channel.shape[1]:  # every group: the weights as they are, nothing gathered
            w1, b1, w2 = self.w1.data, self.b1.data, self.w2.data
        else:
            kept = (groups[:, None] * self.group_size + torch.arange(self.group_size, device=x.device)).flatten()
            w1, b1, w2 = self.w1.index_select(0, kept), self.b1.index_select(0, kept), self.w2.index_select(1, kept)
        y = F.relu(F.conv2d(x, w1, b1, self.stride, 1)) * scale
        return F.conv2d(y, w2, self.b2, 1, 1)

    def _branch_on_slices(self, x: Tensor, channel: Tensor, groups: Tensor) -> Tensor:
        if self._w2_by_input is None:  # [mid, out, 3, 3], kernels flipped: conv == transposed conv on these
            self._w2_by_input = self.w2.detach().transpose(0, 1).flip(2, 3).contiguous()
        size = self.group_size
        out: Tensor | None = None
        for first, last in _runs(groups.tolist()):
            a, b = first * size, (last + 1) * size
            scale = channel[:, first : last + 1].repeat_interleave(size, 1)[:, :, None, None]
            y = F.relu(F.conv2d(x, self.w1[a:b], self.b1[a:b], self.stride, 1)) * scale
            part = F.conv_transpose2d(y, self._w2_by_input[a:b], None, 1, 1)
            out = part if out is None else out + part
        assert out is not None  # groups is never empty here
        return out + self.b2[None, :, None, None]


def _runs(groups: list[int]) -> list[tuple[int, int]]:
    """Sorted group indices as runs of consecutive ones, ``(first, last)``: [0, 1, 2, 5, 7, 8] -> (0, 2), (5, 5), (7, 8)."""
    runs: list[tuple[int, int]] = []
    for group in groups:
        if runs and runs[-1][1] == group - 1:
            runs[-1] = (runs[-1][0], group)
        else:
            runs.append((group, group))
    return runs


def _frozen_copy(gate: nn.Linear) -> nn.Linear:
    copy = nn.Linear(gate.in_features, gate.out_features)
    copy.weight = nn.Parameter(gate.weight.detach().clone(), requires_grad=False)
    copy.bias = nn.Parameter(gate.bias.detach().clone(), requires_grad=False)
    return copy


class GatedStatic(nn.Module):
    """An LC-Net as served: skipped branches are not run, skipped channel groups not computed."""

    def __init__(
        self,
        stem: tuple[Tensor, Tensor],
        blocks: list[_StaticGatedBlock],
        fc: nn.Linear,
        branch_flops: tuple[float, ...],
        threshold: float = 0.0,
        batching: Batching = "union",
        kernels: Kernels = "gather",
    ) -> None:
        super().__init__()
        self.stem_weight = nn.Parameter(stem[0], requires_grad=False)
        self.stem_bias = nn.Parameter(stem[1], requires_grad=False)
        self.block_list = list(blocks)  # typed view; ModuleList registers them
        self.blocks = nn.ModuleList(blocks)
        self.fc = fc
        self.branch_flops = branch_flops
        self.threshold = threshold
        self.batching: Batching = batching
        self.kernels: Kernels = kernels
        self.eval()

    def at_threshold(
        self, threshold: float, batching: Batching | None = None, kernels: Kernels | None = None
    ) -> GatedStatic:
        """The same network (weights shared, nothing copied) skipping every gate at or below ``threshold``."""
        other = copy.copy(self)
        other.threshold = threshold
        other.batching = batching or self.batching
        other.kernels = kernels or self.kernels
        return other

    def branch_flops_run(self, gates: Gates) -> Tensor:
        """Per image ``[N]``: FLOPs of the residual branches it ran on its own (batch 1), from its applied gates.

        A branch's two convolutions scale with the share of its channel groups kept.
        """
        total = torch.zeros(gates.layer[0].shape[0])
        for flops, channel in zip(self.branch_flops, gates.channel, strict=True):
            total += flops * (channel > 0).float().mean(1).cpu()
        return total

    def train(self, mode: bool = True) -> GatedStatic:
        if mode:
            raise RuntimeError("a materialized LC-Net is inference-only: its batch norm is folded away")
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)[0]

    def run(self, x: Tensor) -> tuple[Tensor, Gates]:
        """Logits and the gates each block applied (what a response reports as blocks and groups run)."""
        x = F.relu(F.conv2d(x, self.stem_weight, self.stem_bias, 1, 1))
        layers, channels = [], []
        for block in self.block_list:
            x, layer, channel = block(x, self.threshold, self.batching, self.kernels)
            layers.append(layer)
            channels.append(channel)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)), Gates(tuple(layers), tuple(channels))
