"""What the load generator sends: real held-out images with their labels, and a budget per request.

Torch-free on purpose: the locustfile imports this inside a gevent-patched process.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from slimserve.models.idx import DatasetError, read_idx
from slimserve.models.schema import read_table

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class BudgetMix:
    """Budgets (ms) and their probabilities, e.g. ``"30:10,50:25,20:100"`` (percent:milliseconds)."""

    weights: tuple[float, ...]
    budgets_ms: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> BudgetMix:
        weights, budgets = [], []
        for part in text.split(","):
            weight, sep, budget = part.partition(":")
            try:
                if not sep:
                    raise ValueError
                weights.append(float(weight))
                budgets.append(float(budget))
            except ValueError:
                raise ValueError(
                    f"budget mix {text!r}: expected percent:milliseconds pairs like 30:10,50:25,20:100"
                ) from None
        if min(weights) < 0 or sum(weights) <= 0 or min(budgets) <= 0:
            raise ValueError(f"budget mix {text!r}: weights must be >= 0 (not all 0) and budgets > 0")
        total = sum(weights)
        return cls(tuple(w / total for w in weights), tuple(budgets))

    def __str__(self) -> str:
        return ",".join(f"{100 * w:g}:{b:g}" for w, b in zip(self.weights, self.budgets_ms, strict=True))

    def draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(np.array(self.budgets_ms), size=count, p=np.array(self.weights))


def batch_one_p50(table_path: Path, column: str | None = None) -> list[tuple[float, float]]:
    """(batch-1 p50 ms, accuracy) of every row, from the table's latency ``column`` (the primary
    one by default); a ValueError names the columns when the table lacks it."""
    table = read_table(table_path)
    column = column or table.primary_device
    if column not in table.devices:
        raise ValueError(f"{table_path}: no latency column {column!r} (has {', '.join(table.devices)})")
    return [(row.latency[column][1].p50_ms, row.accuracy) for row in table.subnets]


def default_mix(table_path: Path, overhead_ms: float = 1.0, column: str | None = None) -> BudgetMix:
    """30% tight / 50% medium / 20% loose, from the batch-1 p50 latencies (fastest f, largest l) of
    the table's latency ``column`` (the one the servers use; default: the primary one):

    * tight  = overhead + 1.5 f: only the fast end of the table fits;
    * medium = overhead + 1.5 l: the largest subnet fits when the server is idle, not under load;
    * loose  = overhead + 10 l: everything fits unless the queue is deep.

    The same shares as the prototype's 10/25/100 ms mix, scaled to whatever machine the table was
    profiled on.
    """
    p50 = [latency for latency, _ in batch_one_p50(table_path, column)]
    fastest, largest = min(p50), max(p50)
    budgets = (overhead_ms + 1.5 * fastest, overhead_ms + 1.5 * largest, overhead_ms + 10 * largest)
    return BudgetMix((0.3, 0.5, 0.2), tuple(round(b, 1) for b in budgets))


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_images(count: int, directory: Path = FASHION_MNIST_DIR, offset: int = 0) -> tuple[list[bytes], np.ndarray]:
    """The first ``count`` images of the Fashion-MNIST *test* split (never trained or searched on), as PNG."""
    images, labels = (
        read_idx(_idx_file(directory, "t10k-images-idx3-ubyte")),
        read_idx(_idx_file(directory, "t10k-labels-idx1-ubyte")),
    )
    chosen = slice(offset, offset + count)
    return [encode_png(image) for image in images[chosen]], labels[chosen].astype(np.int64)


def check_test_images(directory: Path | None = None) -> None:
    """Raise :class:`DatasetError` here if the test images are missing: the Locust process that reads
    them would fail in a subprocess, after a server had been started for nothing."""
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        _idx_file(directory or FASHION_MNIST_DIR, stem)


def _idx_file(directory: Path, stem: str) -> Path:
    for path in (directory / f"{stem}.gz", directory / stem):
        if path.exists():
            return path
    raise DatasetError(
        f"{stem}[.gz] not found in {directory}: install Fashion-MNIST (apt-get install -y dataset-fashion-mnist)"
    )
