"""Scale-out on Ray Serve: the same FastAPI app, one replica per device, each with its own controller.

slimserve does not grow its own cluster manager. Each Ray Serve replica builds the app with
:func:`slimserve.server.app.create_app` (so it loads, verifies and warms up its own copy of the bundle and
runs its own scheduler), and Ray routes requests between replicas. Back-pressure lines up with
ours: Ray sends a replica at most ``max_queue`` ongoing requests - exactly what our queue holds -
and queues at most ``ray_max_queued`` more in its router before answering 503 itself. Autoscaling
targets ``max_batch`` ongoing requests per replica: a replica busy at its batch limit is full.

    slimserve serve --ray --replicas 2
    slimserve serve --ray --min-replicas 1 --max-replicas 4        # autoscaling
"""

from __future__ import annotations

import time
from typing import Any

from slimserve.models import openmp
from slimserve.server.settings import Settings


def build_application(
    settings: Settings,
    replicas: int = 1,
    max_replicas: int | None = None,
    cpus_per_replica: float | None = None,
    ray_max_queued: int | None = None,
) -> Any:
    """A Ray Serve application (``serve.run`` it) serving ``settings.bundle``."""
    from ray import serve

    def build_app() -> Any:
        # Evaluated on each replica: every replica owns its model, queue and latency model (and
        # runs inference on a thread, so the front end's lag-based admission is off; Ray admits
        # requests itself, up to max_ongoing_requests).
        from slimserve.server.app import create_app

        return create_app(settings, wait_until_ready=True)

    class SlimServeReplica:
        """One slimserve process inside Ray; the ingress app does all the work."""

    autoscaling = None
    if max_replicas is not None and max_replicas > replicas:
        autoscaling = {
            "min_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": settings.max_batch,
        }
    options: dict[str, Any] = {
        "name": "slimserve",
        "max_ongoing_requests": settings.max_queue,
        "max_queued_requests": ray_max_queued if ray_max_queued is not None else settings.max_queue,
        "ray_actor_options": {
            "num_cpus": cpus_per_replica if cpus_per_replica is not None else settings.threads,
            "num_gpus": 1 if settings.device.startswith("cuda") else 0,
            # as in `slimserve serve` (models/openmp.py): its wait setting, unless the user chose
            "runtime_env": {"env_vars": openmp.wait_environment() or openmp.DEFAULT},
        },
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": settings.drain_seconds,
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(**options)(serve.ingress(build_app)(SlimServeReplica))
    return deployment.bind()


def run(settings: Settings, replicas: int, max_replicas: int | None, cpus_per_replica: float | None) -> None:
    """Start Ray (or join ``RAY_ADDRESS``), deploy, and block until interrupted."""
    import ray
    from ray import serve

    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings, replicas, max_replicas, cpus_per_replica), name="slimserve", route_prefix="/")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
