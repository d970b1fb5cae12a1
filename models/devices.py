"""The devices a command or the server may be given: ``cpu``, ``cuda`` or ``cuda:N``, and a CUDA
device only where this machine's torch sees it. Checked where the name is given, so a typo or a
CPU-only build is one line naming the flag, not torch's traceback from deep inside a load."""

from __future__ import annotations

import re

DEVICE_NAME = r"cpu|cuda(:\d+)?"


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used on this machine, or None. Imports torch only for a CUDA name."""
    if not re.fullmatch(DEVICE_NAME, device):
        return f"expected cpu, cuda or cuda:N, got {device!r}"
    if device == "cpu":
        return None
    import torch

    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        return f"{device}: this machine's torch ({torch.__version__}) sees {count} CUDA device(s)"
    return None
