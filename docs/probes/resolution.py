"""Probe for issue 13: would elastic input resolution widen the demo table's front?

Runs demo rows on average-pooled inputs (28 -> 14 -> 7 pixels) with batch norm recalibrated at
that resolution and *no* training, and times each materialized row at batch 1 and 32 in this
process (main thread, 2 intra-op threads: not the server's setting, so compare within the run).
Run from the repository root: ``.venv/bin/python docs/probes/resolution.py``.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from slimserve.models.bn_calibration import calibrate_bn
from slimserve.models.bundle import load_bundle
from slimserve.models.datasets import load_splits
from slimserve.models.evaluate import calibration_images
from slimserve.models.ops import FrozenStatsNorm
from slimserve.models.transforms import normalize


def median_ms(module: torch.nn.Module, x: torch.Tensor, repeats: int = 60) -> float:
    for _ in range(10):
        module(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        module(x)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(2)
    bundle = load_bundle("models/demo")
    net = bundle.supernet.float().eval()
    splits = load_splits("fashion-mnist", None, channels=1)
    mean, std = bundle.manifest.input.mean, bundle.manifest.input.std
    calibration = calibration_images(splits.train, mean, std, 2048, 0)
    test, labels = normalize(splits.test.images, mean, std), splits.test.labels
    rows = bundle.table.subnets
    for row in (*rows[:3], rows[-1]):
        for pool in (1, 2, 4):

            def down(x: torch.Tensor, pool: int = pool) -> torch.Tensor:
                return x if pool == 1 else F.avg_pool2d(x, pool)

            stats = calibrate_bn(net, row.channels, down(calibration))
            correct = sum(
                int(
                    (
                        net(down(test[s : s + 1000]), row.channels, FrozenStatsNorm(stats)).argmax(1)
                        == labels[s : s + 1000]
                    ).sum()
                )
                for s in range(0, len(test), 1000)
            )
            static = net.materialize(row.channels, stats).eval()
            batch1, batch32 = (median_ms(static, down(test[:b]).contiguous()) for b in (1, 32))
            sys.stdout.write(
                f"{row.id} at {28 // pool:2d}x{28 // pool:<2d}: test top-1 {100 * correct / len(test):5.2f}%, "
                f"batch 1 {batch1:.3f} ms, batch 32 {batch32:.3f} ms\n"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
