"""A gated (LC-Net) bundle served by `slimserve serve`'s two-process design: responses say what the gates ran."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from slimserve.server.app import create_app
from slimserve.server.engine_client import launch
from slimserve.server.settings import Settings
from tests.helpers import make_tiny_gated_bundle
from tests.integration.server.conftest import png, wait_ready


def test_responses_report_the_blocks_and_channel_groups_run(tmp_path: Path) -> None:
    settings = Settings(bundle=make_tiny_gated_bundle(tmp_path / "bundle"))
    (engine,) = launch(settings)
    assert engine.info.gated_blocks == 3 and engine.info.stages == 0
    with TestClient(create_app(settings, engine=engine), raise_server_exceptions=False) as client:
        wait_ready(client)
        for value in (0, 90, 200):
            answer = client.post("/v1/classify", content=png(value), headers={"X-Latency-Budget-Ms": "2000"})
            assert answer.status_code == 200
            subnet = answer.json()["subnet"]
            assert "exit" not in subnet
            gates = subnet["gates"]
            assert gates["blocks"] == 3 and 0 <= gates["blocks_run"] <= 3
            assert 0.0 <= gates["channel_groups_run"] <= 1.0
            assert (gates["blocks_run"] == 0) == (gates["channel_groups_run"] == 0.0)
        batch = {"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "UINT8", "data": [7] * 1568}]}
        v2 = client.post(f"/v2/models/{engine.info.name}/infer", json=batch, headers={"X-Latency-Budget-Ms": "2000"})
        assert v2.status_code == 200 and len(v2.json()["parameters"]["blocks_run"]) == 2
    assert engine.process.poll() is not None
