"""A multi-stage (S2DNAS) bundle served by `slimserve serve`'s two-process design: exits in responses and metrics."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from slimserve.server.app import create_app
from slimserve.server.engine_client import launch
from slimserve.server.settings import Settings
from tests.helpers import make_tiny_multistage_bundle
from tests.integration.server.conftest import png, wait_ready


def test_responses_say_which_stage_answered_and_metrics_count_exits(tmp_path: Path) -> None:
    settings = Settings(bundle=make_tiny_multistage_bundle(tmp_path / "bundle", thresholds=(0.5, None)))
    (engine,) = launch(settings)
    assert engine.info.stages == 3
    with TestClient(create_app(settings, engine=engine), raise_server_exceptions=False) as client:
        wait_ready(client)
        answers = [
            client.post("/v1/classify", content=png(v), headers={"X-Latency-Budget-Ms": "2000"}) for v in (0, 90, 200)
        ]
        assert [a.status_code for a in answers] == [200, 200, 200]
        for answer in answers:
            body = answer.json()
            exit_ = body["subnet"]["exit"]
            assert exit_["stages"] == 3 and 1 <= exit_["stage"] <= int(body["subnet"]["id"][1:])
            assert exit_["anytime"] is False  # a 2 s budget never cuts a stage short
            assert exit_["confidence"] == body["top_k"][0]["probability"]
            if exit_["stage"] < int(body["subnet"]["id"][1:]):
                assert exit_["confidence"] >= 0.5  # it left early because it was sure enough
        batch = {"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "UINT8", "data": [7] * 1568}]}
        v2 = client.post(f"/v2/models/{engine.info.name}/infer", json=batch, headers={"X-Latency-Budget-Ms": "2000"})
        assert v2.status_code == 200 and len(v2.json()["parameters"]["exit_stages"]) == 2
        metrics = client.get("/metrics").text
        exits = sum(
            float(v) for v in re.findall(r'^slimserve_exits_total\{reason="\w+",stage="\d"\} (\S+)$', metrics, re.M)
        )
        assert exits == 5.0
    assert engine.process.poll() is not None
