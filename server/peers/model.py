"""One static subnet of a bundle, exactly as slimserve runs it, for a peer serving stack to call.

What a peer adds around it (HTTP, queueing, batching) is the peer's own; what happens inside it
(decode, normalize, forward pass, thread count per batch size, top-k) is slimserve's code, so the
model costs the same in every server of a comparison.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimserve.models.bundle import load_bundle
from slimserve.server.engine import matching_column
from slimserve.server.imaging import decode_image
from slimserve.server.runtime import ModelRuntime
from slimserve.server.settings import Settings


@dataclass(frozen=True)
class PeerConfig:
    """What ``slimserve peer`` was asked to serve and how (one owner for both stacks)."""

    bundle: Path
    subnet_id: str
    host: str = "127.0.0.1"
    port: int = 8001
    threads: int = 2
    max_batch: int = 8
    batch_timeout_s: float = 0.0
    request_timeout_s: float = 30.0
    max_ongoing: int = 256  # Ray only: max_ongoing_requests of the replica
    device: str = "cpu"  # cpu, cuda or cuda:N, as slimserve's --device


@dataclass(frozen=True)
class Prediction:
    probabilities: list[float]
    inference_ms: float  # the forward pass this request was part of
    batch_size: int


class PeerModel:
    """The subnet ``subnet_id`` of ``bundle``, materialized and warmed up as the server does.

    Example:
        >>> model = PeerModel(Path("models/demo"), "s0")
        >>> predictions = model.predict([model.decode(png_bytes)])
        >>> model.response(predictions[0], total_ms=1.2)["class_name"]
    """

    def __init__(self, bundle: Path, subnet_id: str, threads: int = 2, max_batch: int = 8, device: str = "cpu") -> None:
        settings = Settings(bundle=bundle, threads=threads, device=device)
        loaded = load_bundle(bundle)
        self.row = loaded.table.row(subnet_id)  # BundleError names the ids the table has
        self.runtime = ModelRuntime(loaded, device, threads, matching_column(loaded, settings))
        self.index = next(s.index for s in self.runtime.subnets if s.row.id == subnet_id)
        served = self.runtime.subnets[self.index]
        self.subnet = {
            "id": self.row.id,
            "channels": list(self.row.channels),
            "depths": list(served.depths),
            "expected_accuracy": self.row.accuracy,
            "width": round(served.width, 4),
        }
        self.max_image_pixels = settings.max_image_pixels
        self.top_k = settings.top_k
        channels, height, width = self.runtime.input_shape
        self._size = (width, height)
        self._channels = channels
        # As slimserve's inference thread (ModelRuntime.warm_this_thread), on the thread that will predict:
        # oneDNN builds its kernels on first use, cuDNN its plans per thread and batch size.
        self.runtime.warm_up(max_batch, every_size=self.runtime.device.type == "cuda", only=[self.index])

    def decode(self, data: bytes) -> torch.Tensor:
        """Encoded image -> uint8 ``[C, H, W]``; raises :class:`slimserve.server.imaging.ImageError` (status, message)."""
        return decode_image(data, self._channels, self._size, self.max_image_pixels)

    def predict(self, images: list[torch.Tensor]) -> list[Prediction]:
        started = time.perf_counter()
        probabilities = self.runtime.infer(self.index, torch.stack(images)).tolist()
        inference_ms = round((time.perf_counter() - started) * 1000.0, 3)
        return [Prediction(row, inference_ms, len(images)) for row in probabilities]

    def response(self, prediction: Prediction, total_ms: float | None = None) -> dict[str, Any]:
        """The fields of slimserve's v1 response that a server without a scheduler can fill."""
        probabilities = prediction.probabilities
        best = heapq.nlargest(self.top_k, range(len(probabilities)), key=probabilities.__getitem__)
        names = self.runtime.class_names
        return {
            "class_index": best[0],
            "class_name": names[best[0]],
            "top_k": [{"index": i, "name": names[i], "probability": round(probabilities[i], 6)} for i in best],
            "subnet": self.subnet,
            "timing": {
                "inference_ms": prediction.inference_ms,
                "total_ms": total_ms,
                "batch_size": prediction.batch_size,
            },
        }
