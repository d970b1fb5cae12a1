"""Scale-out: the same app on Ray Serve with two replicas on loopback, each with its own controller."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from slimserve.loadtest.runner import free_port
from slimserve.server.settings import Settings
from tests.integration.server.conftest import png

ray = pytest.importorskip("ray", reason="Ray Serve is optional: pip install 'slimserve[ray]' (make test installs it)")
serve = pytest.importorskip("ray.serve")


def test_two_replicas_serve_the_same_contract(tiny_bundle: Path) -> None:
    from slimserve.server.ray_serve import build_application

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        application = build_application(Settings(bundle=tiny_bundle, threads=1), replicas=2, cpus_per_replica=1)
        serve.run(application, name="slimserve", route_prefix="/")

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                budgets = [50, 1000, 10_000] * 30  # Ray's proxy adds a hop: tight budgets may get 504
                return await asyncio.gather(
                    *(
                        client.post("/v1/classify", content=png(i % 256), headers={"X-Latency-Budget-Ms": str(b)})
                        for i, b in enumerate(budgets)
                    )
                )

        responses = asyncio.run(burst())
        assert {r.status_code for r in responses} <= {200, 503, 504}
        ok = [r for r in responses if r.status_code == 200]
        assert all(r.status_code == 200 for r in responses[2::3])  # a 10 s budget leaves room for everyone
        for response in ok:
            body = response.json()
            assert response.headers["x-subnet-id"] == body["subnet"]["id"]
            assert body["timing"]["budget_ms"] in (50, 1000, 10_000) and 0 <= body["class_index"] < 10
        assert len({r.headers["x-replica-id"] for r in ok}) == 2  # both replicas served
        status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert status.status_code == 200
    finally:
        serve.shutdown()
        ray.shutdown()
