"""FLOPs and parameter counts of a subnet, counted by PyTorch's own ``FlopCounterMode``.

Counted on the materialized subnet (batch norm folded), i.e. on exactly what is served. FLOPs
follow PyTorch's convention: one multiply-add is 2 FLOPs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass for a single image of ``input_shape`` (C, H, W)."""
    parameter = next(module.parameters())
    example = torch.zeros(1, *input_shape, dtype=parameter.dtype, device=parameter.device)
    counter = FlopCounterMode(display=False)
    with counter:
        module(example)
    return int(counter.get_total_flops())


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
