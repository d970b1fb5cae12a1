"""A static subnet on Ray Serve: its HTTP proxy, a replica actor and ``@serve.batch``.

The replica reads the raw body (the same bytes slimserve takes), decodes it, and awaits a batched
method; Ray groups up to ``max_batch_size`` calls or ``batch_wait_timeout_s``. The proxy answers
408/503 by itself past ``request_timeout_s`` or when the replica's queue is full.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from slimserve.models import openmp
from slimserve.server.peers.model import PeerConfig


def build_application(config: PeerConfig) -> Any:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(
        name=f"peer-{config.subnet_id}",
        num_replicas=1,
        max_ongoing_requests=config.max_ongoing,
        ray_actor_options={
            "num_cpus": 1,
            "num_gpus": 1 if config.device.startswith("cuda") else 0,  # else Ray hides every GPU from the replica
            "runtime_env": {"env_vars": openmp.wait_environment() or openmp.DEFAULT},
        },
    )
    class SubnetReplica:
        def __init__(self) -> None:
            from slimserve.server.peers.model import PeerModel

            # Ray makes the GPU it gave the replica its cuda:0
            device = "cuda:0" if config.device.startswith("cuda") else "cpu"
            self.model = PeerModel(config.bundle, config.subnet_id, config.threads, config.max_batch, device)

        @serve.batch(max_batch_size=config.max_batch, batch_wait_timeout_s=config.batch_timeout_s)
        async def predict(self, images: list[Any]) -> list[Any]:
            return self.model.predict(images)

        async def __call__(self, request: Request) -> Any:
            from slimserve.server.imaging import ImageError

            if request.method == "GET":  # the load generator's readiness probe
                return JSONResponse({"status": "ok"})
            arrived = time.perf_counter()
            try:
                image = self.model.decode(await request.body())
            except ImageError as error:
                return JSONResponse({"error": str(error)}, status_code=error.status)
            prediction = await self.predict(image)
            return self.model.response(prediction, total_ms=round((time.perf_counter() - arrived) * 1000.0, 3))

    return SubnetReplica.bind()  # type: ignore[attr-defined]  # serve.deployment returns a Deployment


def run(config: PeerConfig) -> None:
    """Start a local Ray cluster, deploy, and serve until SIGTERM or SIGINT (then shut Ray down)."""
    import ray
    from ray import serve

    ray.init(
        num_cpus=2,
        num_gpus=1 if config.device.startswith("cuda") else 0,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(
            http_options={"host": config.host, "port": config.port, "request_timeout_s": config.request_timeout_s}
        )
        serve.run(build_application(config), name=f"peer-{config.subnet_id}", route_prefix="/")
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
