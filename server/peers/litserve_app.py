"""A static subnet on LitServe: its own HTTP server, request queue and dynamic batching.

LitServe hands each JSON body to ``decode_request`` in its inference worker process, batches up
to ``max_batch_size`` requests or ``batch_timeout`` seconds, and drops requests that waited longer
than its ``timeout`` (504). Its endpoints take JSON (or forms), not raw bytes, so the image travels
base64-encoded: ``{"image": "<base64 PNG>"}``, as LitServe's own image examples do.
"""

from __future__ import annotations

import base64
import binascii
import os
import signal
import time
from typing import Any

import litserve as ls
from fastapi import HTTPException

from slimserve.server.imaging import ImageError
from slimserve.server.peers.model import PeerConfig, PeerModel, Prediction

API_PATH = "/v1/classify"


class SubnetAPI(ls.LitAPI):
    def __init__(self, config: PeerConfig) -> None:
        super().__init__(max_batch_size=config.max_batch, batch_timeout=config.batch_timeout_s, api_path=API_PATH)
        self.config = config
        self.max_batch = config.max_batch

    def setup(self, device: str) -> None:
        # LitServe's device is "cpu", or the GPU it gave this worker ("cuda:0")
        config = self.config
        self.model = PeerModel(config.bundle, config.subnet_id, config.threads, config.max_batch, device)

    # No annotation on ``request``: LitServe picks how FastAPI parses the body from it; none means JSON.
    def decode_request(self, request):
        arrived = time.perf_counter()
        try:
            data = base64.b64decode(request["image"], validate=True)
            return arrived, self.model.decode(data)
        except (TypeError, KeyError, binascii.Error):
            raise HTTPException(400, 'expected a JSON body {"image": "<base64-encoded image>"}') from None
        except ImageError as error:
            raise HTTPException(error.status, str(error)) from None

    # With max_batch_size 1 LitServe calls neither batch nor unbatch and hands predict one input.
    def batch(self, inputs: list[tuple[float, Any]]) -> list[tuple[float, Any]]:
        return inputs  # predict stacks the tensors itself (and keeps each arrival time)

    def predict(self, inputs: Any) -> Any:
        batched = self.max_batch > 1
        items: list[tuple[float, Any]] = inputs if batched else [inputs]
        predictions = self.model.predict([image for _, image in items])
        outputs = [(arrived, p) for (arrived, _), p in zip(items, predictions, strict=True)]
        return outputs if batched else outputs[0]

    def unbatch(self, outputs: list[tuple[float, Prediction]]) -> list[tuple[float, Prediction]]:
        return outputs

    def encode_response(self, output: tuple[float, Prediction]) -> dict[str, Any]:
        arrived, prediction = output
        return self.model.response(prediction, total_ms=round((time.perf_counter() - arrived) * 1000.0, 3))


def run(config: PeerConfig) -> None:
    """Serve until SIGINT or SIGTERM (LitServe's own loop; its ``/health`` is 200 once the worker is set up)."""
    # LitServe shuts its worker processes down on KeyboardInterrupt only; its forked HTTP workers
    # inherit this handler and must die of the signal as before.
    owner = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() == owner:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, interrupt)
    api = SubnetAPI(config)
    accelerator = "cuda" if config.device.startswith("cuda") else "cpu"
    server = ls.LitServer(
        api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=config.request_timeout_s
    )
    server.run(host=config.host, port=config.port, num_api_servers=1, log_level="warning", generate_client_file=False)
