"""Slimmable operators: convolution, linear and batch norm that run at any prefix of their channels.

The active width is always an *argument* of ``forward`` (input channels are read off the input,
output channels are passed in) and never an attribute: once-for-all's ``set_active_subnet``
mutates shared modules, so two requests at different widths race. Here two threads may run the
same module at different widths at once.

Batch norm is the one layer whose behaviour depends on the subnet beyond slicing: each subnet
needs its own running statistics (US-Nets). The statistics are therefore not stored in the module
either; a :class:`NormMode` passed down the forward decides how every batch-norm layer normalizes:
with the batch's own statistics (training), while accumulating statistics (calibration), or with
a given set of frozen statistics (evaluation).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name of a batch-norm layer -> (running mean, running variance), sized to the subnet's channels
BNStats = dict[str, tuple[Tensor, Tensor]]


class NormMode(Protocol):
    """How a :class:`SlimBatchNorm2d` normalizes its input for one forward pass."""

    def __call__(self, key: str, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor: ...


def batch_stats_norm(key: str, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Training mode: normalize with the current batch's statistics, track nothing."""
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


class FrozenStatsNorm:
    """Evaluation: normalize with one subnet's calibrated statistics."""

    def __init__(self, stats: BNStats) -> None:
        self.stats = stats

    def __call__(self, key: str, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        try:
            mean, var = self.stats[key]
        except KeyError:
            raise KeyError(f"no batch-norm statistics for layer {key!r}; calibrate this subnet first") from None
        if mean.shape[0] != x.shape[1]:
            raise ValueError(
                f"batch-norm statistics for {key!r} have {mean.shape[0]} channels, input has {x.shape[1]}: "
                "they were calibrated for a different subnet"
            )
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)


class CalibratingNorm:
    """Post-training recalibration: normalize with batch statistics *and* average them.

    Normalizing with the batch statistics while collecting is what makes calibration work: the
    classic US-Nets bug is to collect in eval mode, so every layer sees activations normalized by
    stale statistics and the collected values are wrong from the second layer on (accuracy ~0).
    Averages are cumulative (equal weight per batch), as with ``momentum=None`` in ``nn.BatchNorm2d``.
    """

    def __init__(self) -> None:
        self.stats: BNStats = {}
        self.batches: dict[str, int] = {}

    def __call__(self, key: str, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        if key not in self.stats:
            channels = x.shape[1]
            self.stats[key] = (
                torch.zeros(channels, device=x.device, dtype=torch.float32),
                torch.ones(channels, device=x.device, dtype=torch.float32),
            )
            self.batches[key] = 0
        mean, var = self.stats[key]
        self.batches[key] += 1
        # F.batch_norm updates the running buffers in place: with momentum 1/k this is a running mean.
        return F.batch_norm(x, mean, var, weight, bias, training=True, momentum=1.0 / self.batches[key], eps=eps)


def slim_conv2d(x: Tensor, weight: Tensor, out_channels: int, stride: int, padding: int) -> Tensor:
    """Convolution with the first ``out_channels`` filters over the input's channels."""
    return F.conv2d(x, weight[:out_channels, : x.shape[1]], None, stride, padding)


class SlimConv2d(nn.Module):
    """Bias-free 2-D convolution sliceable on both channel axes (a batch norm always follows)."""

    def __init__(self, max_in: int, max_out: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(max_out, max_in, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, out_channels: int) -> Tensor:
        return slim_conv2d(x, self.weight, out_channels, self.stride, self.padding)


class SlimBatchNorm2d(nn.Module):
    """Batch norm whose affine parameters are shared across widths and whose statistics are not stored.

    ``key`` names the layer in :data:`BNStats`; the supernet sets it to the module's qualified name.
    """

    def __init__(self, max_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.key = ""
        self.weight = nn.Parameter(torch.ones(max_channels))
        self.bias = nn.Parameter(torch.zeros(max_channels))

    def forward(self, x: Tensor, norm: NormMode) -> Tensor:
        channels = x.shape[1]
        return norm(self.key, x, self.weight[:channels], self.bias[:channels], self.eps)


class SlimLinear(nn.Module):
    """Linear layer over a prefix of its input features; the output (the classes) is never cut."""

    def __init__(self, max_in: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, max_in))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)


def fold_batch_norm(
    conv_weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode batch norm into the preceding bias-free convolution: ``(weight, bias)``."""
    scale = bn_weight / torch.sqrt(var + eps)
    weight = conv_weight * scale.reshape(-1, *([1] * (conv_weight.dim() - 1)))
    bias = bn_bias - mean * scale
    return weight.contiguous(), bias.contiguous()
