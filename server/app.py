"""The application factory: ``create_app(settings)`` -> FastAPI.

Run it with ``slimserve serve`` (inference in a process of its own, the bundle verified before the
port is served, draining on SIGTERM), or with ``uvicorn --factory server.app:create_app``
(settings from ``SLIMSERVE_*`` variables; inference on a thread of the HTTP process).

Start-up: the bundle is read and verified synchronously - a bad hash or table stops the process
with the file named - then subnets are materialized and warmed up in the background while
``/livez`` answers 200 and ``/readyz`` 503. Shutdown: readiness flips to 503, the queue drains,
the engine stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from slimserve.models.bundle import Bundle
from slimserve.server.admission import sample_loop_lag
from slimserve.server.engine import Engine
from slimserve.server.engine_client import EngineHandle, LocalEngine
from slimserve.server.errors import install_error_handlers
from slimserve.server.middleware import BodyLimit, LoadShedder, RequestContext
from slimserve.server.routes_common import BUDGET_HEADER, StateDep
from slimserve.server.routes_v1 import router as v1_router
from slimserve.server.routes_v2 import SERVER_VERSION
from slimserve.server.routes_v2 import router as v2_router
from slimserve.server.settings import Settings
from slimserve.server.state import ServerState
from slimserve.server.warmup import warm_front_end

DESCRIPTION = """
Latency-adaptive image classification. One weight-shared dynamic-width network; per request, the
server runs the most accurate subnet predicted to answer within the request's
`X-Latency-Budget-Ms`, given the queue and the machine's load.

* `POST /v1/classify` - an encoded image in, a class and the subnet used out.
* `POST /v2/models/{name}/infer` - the same through the KServe Open Inference Protocol v2.
* `GET /v1/subnets`, `GET /v1/status`, `GET /metrics` - what the scheduler knows.
* `GET /livez`, `GET /readyz`, `GET /v2/health/*` - health for orchestrators.

No route loads files, models or URLs named by a request.
"""


def create_app(
    settings: Settings | None = None,
    *,
    engine: EngineHandle | None = None,
    bundle: Bundle | None = None,
    clock: Callable[[], float] = time.monotonic,
    wait_until_ready: bool = False,
) -> FastAPI:
    """Build the app around ``engine`` (default: a :class:`LocalEngine` on ``bundle``, read and
    verified from ``settings.bundle`` unless given). ``wait_until_ready`` makes start-up block until
    warm-up is done (for hosts such as Ray Serve that route to a replica as soon as its start-up
    returns)."""
    settings = settings or Settings()
    engine = engine or LocalEngine(Engine.open(settings, bundle, clock))
    state = ServerState(settings, engine, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        channels, height, width = engine.info.input_shape
        inference_routes = [("POST", "/v1/classify"), ("POST", f"/v2/models/{engine.info.name}/infer")]
        await warm_front_end(app, inference_routes, channels, (width, height))  # before the engine starts
        await engine.start(wait_until_ready)
        lag = asyncio.create_task(sample_loop_lag(state.admission, clock)) if state.admission else None
        try:
            yield
        finally:
            if lag is not None:
                lag.cancel()
            await engine.stop(settings.drain_seconds)

    app = FastAPI(title="slimserve", version=SERVER_VERSION, description=DESCRIPTION, lifespan=lifespan)
    app.state.slimserve = state
    install_error_handlers(app)
    app.include_router(v1_router)
    app.include_router(v2_router)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics(state: StateDep) -> Response:
        return Response(await state.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    default_openapi = app.openapi

    def openapi_with_settings() -> dict[str, Any]:
        """The budget header's documented maximum is this server's max_budget_ms."""
        schema = default_openapi()
        for methods in schema["paths"].values():
            for operation in methods.values():
                for parameter in operation.get("parameters", []):
                    if parameter.get("name") == BUDGET_HEADER:
                        parameter["schema"]["maximum"] = settings.max_budget_ms
        return schema

    app.openapi = openapi_with_settings  # type: ignore[method-assign]

    # The last added is outermost: the request context stamps arrival and id before the body is
    # read; the shedder sees the request last, just before routing.
    app.add_middleware(LoadShedder, retry_after=state.shed_retry_after, on_shed=state.count_shed)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext, clock=clock, max_header_bytes=settings.max_header_bytes)
    return app
