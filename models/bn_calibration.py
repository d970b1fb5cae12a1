"""Per-subnet batch-norm recalibration (US-Nets, section 3.3; SuperServe's SubnetNorm).

Training normalizes with batch statistics only, and a subnet's correct running statistics differ
from every other subnet's. After training (and after any change of weights) each subnet that will
be evaluated or served gets its own statistics: a forward pass in *train* mode over a few thousand
training images, averaging each layer's batch mean and variance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from slimserve.models.ops import BNStats, CalibratingNorm, NormMode
from slimserve.models.registry import Supernet
from slimserve.models.resolution import resize
from slimserve.models.subnet import Subnet

DEFAULT_CALIBRATION_IMAGES = 2048  # US-Nets found ~2k images enough for stable statistics


def calibrate_bn(
    supernet: Supernet, subnet: Subnet, images: Tensor, batch_size: int = 256, resolution: int | None = None
) -> BNStats:
    """Return the batch-norm statistics of ``subnet`` measured on ``images`` (already normalized floats),
    shrunk to ``resolution`` first (statistics differ per resolution as they do per width).

    The supernet's weights and mode are left untouched: statistics are returned, not stored.
    """
    return calibrate_module_bn(lambda x, norm: supernet(resize(x, resolution), subnet, norm), images, batch_size)


@torch.no_grad()
def calibrate_module_bn(module: Callable[[Tensor, NormMode], object], images: Tensor, batch_size: int = 256) -> BNStats:
    """The same for a network whose forward takes ``(x, norm)``: a supernet bound to one subnet, a
    multi-stage or a gated network."""
    if images.shape[0] == 0:
        raise ValueError("calibration needs at least one image")
    norm = CalibratingNorm()
    for start in range(0, images.shape[0], batch_size):
        module(images[start : start + batch_size], norm)
    return {key: (mean.clone(), var.clone()) for key, (mean, var) in norm.stats.items()}
