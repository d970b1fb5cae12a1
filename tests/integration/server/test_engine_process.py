"""The inference engine in a process of its own (what `slimserve serve` runs), through the real socket."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from pathlib import Path

import psutil
import pytest
import torch
from fastapi.testclient import TestClient

from slimserve.server.app import create_app
from slimserve.server.engine_client import EngineStartError, RemoteEngine, launch
from slimserve.server.settings import Settings
from tests.integration.server.conftest import png, wait_ready


@pytest.fixture
def remote_client(tiny_bundle: Path):
    clients: list[tuple[TestClient, RemoteEngine]] = []

    def make(**overrides) -> tuple[TestClient, RemoteEngine]:
        settings = Settings(bundle=tiny_bundle, **overrides)
        (engine,) = launch(settings)
        client = TestClient(create_app(settings, engine=engine), raise_server_exceptions=False)
        client.__enter__()
        clients.append((client, engine))
        wait_ready(client)
        return client, engine

    yield make
    for client, engine in clients:
        client.__exit__(None, None, None)
        assert engine.process.poll() is not None, "the inference process outlived its front end"


def test_requests_status_subnets_and_metrics_all_come_from_the_inference_process(remote_client) -> None:
    client, engine = remote_client()
    answers = [
        client.post("/v1/classify", content=png(v), headers={"X-Latency-Budget-Ms": "2000"}) for v in (0, 90, 200)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    ids = {subnet.id for subnet in engine.info.subnets}
    for answer in answers:
        body = answer.json()
        assert body["subnet"]["id"] in ids and answer.headers["x-subnet-id"] == body["subnet"]["id"]
        probabilities = [c["probability"] for c in body["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001
        assert body["timing"]["inference_ms"] > 0 and body["timing"]["total_ms"] >= body["timing"]["inference_ms"]
    batch = {"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "UINT8", "data": [7] * (2 * 28 * 28)}]}
    v2 = client.post(f"/v2/models/{engine.info.name}/infer", json=batch, headers={"X-Latency-Budget-Ms": "2000"})
    assert v2.status_code == 200 and v2.json()["outputs"][0]["shape"] == [2, 10]

    status = client.get("/v1/status").json()
    assert status["ready"] and status["dispatches"] >= 2 and status["queue_depth"] == 0
    assert [row["id"] for row in client.get("/v1/subnets").json()["subnets"]] == [s.id for s in engine.info.subnets]
    # ANSWERED frames travel on the same ordered stream as the metrics query, so all five are counted.
    metrics = client.get("/metrics").text
    answered = sum(
        float(v) for v in re.findall(r'^slimserve_requests_total\{outcome="ok",subnet="s\d"\} (\S+)$', metrics, re.M)
    )
    assert answered == 5.0
    assert re.search(r"^slimserve_ready 1\.0$", metrics, re.M)


def test_impossible_budgets_get_504_and_with_reject_before_the_body_is_decoded(remote_client) -> None:
    client, _ = remote_client()
    late = client.post("/v1/classify", content=png(), headers={"X-Latency-Budget-Ms": "0.001"})
    assert late.status_code == 504 and "model was not run" in late.json()["error"]
    strict, engine = remote_client(infeasible_action="reject", safety_margin_ms=0.5)
    deadline = time.monotonic() + 10
    while engine.fastest_seconds() is None:  # the first LOAD report arrives with readiness
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # Not an image at all: a 400 if it were decoded; the budget alone decides it first.
    refused = strict.post("/v1/classify", content=b"not an image", headers={"X-Latency-Budget-Ms": "0.6"})
    assert refused.status_code == 504 and "no subnet can answer" in refused.json()["error"]


def test_draining_refuses_new_requests_and_stopping_reaps_the_process(remote_client) -> None:
    client, _ = remote_client()
    client.app.state.slimserve.engine.begin_drain()
    refused = client.post("/v1/classify", content=png())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert client.get("/readyz").json()["status"] == "draining"


def test_a_dead_inference_process_turns_into_503s_that_say_so(remote_client) -> None:
    client, engine = remote_client()
    engine.process.kill()
    engine.process.wait(10)
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ready = client.get("/readyz").json()
    assert ready["status"] == "failed" and "inference process exited" in ready["detail"]
    answer = client.post("/v1/classify", content=png())
    assert answer.status_code == 503 and "inference process" in answer.json()["error"]
    assert client.get("/v1/status").status_code == 503
    assert client.get("/livez").status_code == 503 and client.get("/v2/health/live").json() == {"live": False}


def test_a_tampered_bundle_fails_the_launch_naming_the_file(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    table = json.loads((bundle / "subnets.json").read_text())
    table["subnets"][0]["accuracy"] = 0.99
    (bundle / "subnets.json").write_text(json.dumps(table))
    with pytest.raises(EngineStartError, match=r"subnets\.json: SHA-256"):
        launch(Settings(bundle=bundle))


def test_the_inference_process_and_its_threads_run_at_the_niceness_set(remote_client) -> None:
    client, engine = remote_client(inference_nice=4)
    assert client.post("/v1/classify", content=png(), headers={"X-Latency-Budget-Ms": "5000"}).status_code == 200
    assert engine.process is not None
    threads = psutil.Process(engine.process.pid).threads()
    assert len(threads) > 1  # the loader, telemetry and OpenMP threads as well as the main thread
    expected = os.getpriority(os.PRIO_PROCESS, 0) + 4
    assert {os.getpriority(os.PRIO_PROCESS, thread.id) for thread in threads} == {expected}


def test_cancelled_requests_are_dropped_and_the_rest_still_answered(tiny_bundle: Path) -> None:
    (engine,) = launch(Settings(bundle=tiny_bundle))
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)

    async def scenario() -> list[object]:
        await engine.start(wait_until_ready=True)
        tasks = [asyncio.create_task(engine.infer(image, time.monotonic(), 5.0)) for _ in range(16)]
        await asyncio.sleep(0)  # every SUBMIT is written before half of them are cancelled
        for task in tasks[::2]:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await engine.stop(5.0)
        return outcomes

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes[::2])
    assert all(o.probabilities.shape == (10,) for o in outcomes[1::2])  # type: ignore[attr-defined]
    assert engine.process.returncode == 0


def test_two_front_ends_share_one_inference_process_and_its_counters(tiny_bundle: Path) -> None:
    first, second = launch(Settings(bundle=tiny_bundle, frontends=2))
    assert first.process is not None and second.process is None  # the first owns (and reaps) it
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)

    async def scenario() -> tuple[list[object], str]:
        await first.start(wait_until_ready=True)
        await second.start(wait_until_ready=True)
        answers = await asyncio.gather(
            *(engine.infer(image, time.monotonic(), 5.0) for engine in (first, second) for _ in range(8))
        )
        for engine in (first, second):
            for answer in answers:
                engine.record_answer(answer.subnet, True, 0.01, answer.queued, 0.001)  # type: ignore[attr-defined]
        # Each connection is ordered, the two are not: the first's reports may still be in
        # flight when the second's query is answered. A query on the first is the barrier.
        await first.metrics_text()
        metrics = (await second.metrics_text()).decode()
        # One front end stopping (it drains the shared engine: front ends stop together) does
        # not end the inference process while another is connected; it still answers that one.
        await second.stop(5.0)
        assert first.process is not None and first.process.poll() is None
        assert (await first.status()).dispatches >= 1
        await first.stop(5.0)
        return list(answers), metrics

    answers, metrics = asyncio.run(scenario())
    assert all(a.probabilities.shape == (10,) for a in answers)  # type: ignore[attr-defined]
    counted = sum(
        float(v) for v in re.findall(r'^slimserve_requests_total\{outcome="ok",subnet="s\d"\} (\S+)$', metrics, re.M)
    )
    assert counted == 32.0  # 16 answers, reported by both front ends, in one registry
    assert first.process.returncode == 0


class JumpingClock:
    """Jumps 30 ms per reading: every event-loop lag sample looks 20 ms late."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        self.now += 0.030
        return self.now


def test_a_front_end_whose_event_loop_lags_past_the_target_sheds_new_requests_with_503(tiny_bundle: Path) -> None:
    settings = Settings(bundle=tiny_bundle, frontend_delay_target_ms=5.0)
    (engine,) = launch(settings)
    with TestClient(create_app(settings, engine=engine, clock=JumpingClock())) as client:
        wait_ready(client)
        shed = [r for r in (client.post("/v1/classify", content=png()) for _ in range(20)) if r.status_code == 503]
        assert shed and shed[0].headers["retry-after"] == "1" and "overloaded" in shed[0].json()["error"]


def test_with_inference_in_the_http_process_the_loop_lag_does_not_shed(tiny_bundle: Path) -> None:
    """There, the inference thread's GIL holds show up as loop lag; they are not a request backlog."""
    settings = Settings(bundle=tiny_bundle, frontend_delay_target_ms=5.0, default_budget_ms=60_000.0)
    with TestClient(create_app(settings, clock=JumpingClock())) as client:
        wait_ready(client)
        statuses = [client.post("/v1/classify", content=png()).status_code for _ in range(20)]
        assert 503 not in statuses, statuses
