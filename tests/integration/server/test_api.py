"""The HTTP contract on a tiny real bundle: routes, errors, headers, OIP v2, metrics, readiness."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import BaseModel

from slimserve.models.bundle import load_bundle
from slimserve.server.app import create_app
from slimserve.server.runtime import ModelRuntime
from slimserve.server.schemas import ClassifyResponse
from slimserve.server.settings import Settings
from slimserve.server.warmup import warm_front_end
from tests.helpers import make_tiny_bundle
from tests.integration.server.conftest import png, wait_ready

EXPECTED_ROUTES = {
    "/v1/classify", "/v1/subnets", "/v1/status", "/livez", "/readyz", "/metrics",
    "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready", "/v2/models/{name}/infer",
}  # fmt: skip


def test_openapi_lists_only_inference_metadata_health_and_metrics_routes(client: TestClient) -> None:
    paths = set(client.get("/openapi.json").json()["paths"])
    assert paths == EXPECTED_ROUTES
    for path, methods in client.get("/openapi.json").json()["paths"].items():
        for method, operation in methods.items():
            assert method in ("get", "post"), (path, method)
            if method == "post":
                assert path in ("/v1/classify", "/v2/models/{name}/infer")
            assert not any(
                p.get("name") in ("path", "url", "file", "model_path") for p in operation.get("parameters", [])
            )


def test_classify_raw_body(client: TestClient) -> None:
    response = client.post("/v1/classify", content=png(), headers={"X-Latency-Budget-Ms": "80", "X-Request-Id": "abc"})
    assert response.status_code == 200
    body = response.json()
    assert body["request_id"] == "abc" == response.headers["x-request-id"]
    assert response.headers["x-subnet-id"] == body["subnet"]["id"]
    assert response.headers["server-timing"].startswith("queue;dur=")
    assert 0 <= body["class_index"] < 10 and body["class_name"] == body["top_k"][0]["name"]
    probabilities = [c["probability"] for c in body["top_k"]]
    # five of ten classes: the top five hold most, never more than all, of the probability
    assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
    assert 0.5 <= sum(probabilities) <= 1 + 1e-6
    assert body["subnet"]["depths"] == [1, 1, 1]  # the tiny test network has one block per stage
    timing = body["timing"]
    assert timing["budget_ms"] == 80 and timing["met"] == (timing["total_ms"] <= 80)
    assert timing["total_ms"] >= timing["inference_ms"] > 0


def undocumented(body: dict, model: type[BaseModel], where: str = "") -> list[str]:
    """Keys of ``body`` that ``model`` (the OpenAPI response shape) does not declare, at any depth."""
    missing = []
    for key, value in body.items():
        field = model.model_fields.get(key)
        if field is None:
            missing.append(where + key)
            continue
        nested = [a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type)]
        for candidate in nested:
            if issubclass(candidate, BaseModel) and isinstance(value, dict):
                missing += undocumented(value, candidate, f"{where}{key}.")
    return missing


def test_the_classify_body_is_exactly_the_documented_shape(client: TestClient) -> None:
    body = client.post("/v1/classify", content=png(), headers={"X-Latency-Budget-Ms": "30000"}).json()
    ClassifyResponse.model_validate(body)
    assert undocumented(body, ClassifyResponse) == []
    assert undocumented({"subnet": {"surprise": 1}}, ClassifyResponse) == ["subnet.surprise"]  # the check can fail


def test_classify_multipart_and_default_budget(client: TestClient) -> None:
    response = client.post("/v1/classify", files={"image": ("x.png", png(), "image/png")})
    assert response.status_code == 200
    assert response.json()["timing"]["budget_ms"] == Settings().default_budget_ms


@pytest.mark.parametrize("value", ["0", "-5", "nan", "NaN", "inf", "-inf", "1e12", "fast", "", "0x10"])
def test_bad_budget_headers_get_422_naming_the_header(client: TestClient, value: str) -> None:
    response = client.post("/v1/classify", content=png(), headers={"X-Latency-Budget-Ms": value})
    assert response.status_code == 422, value
    assert "X-Latency-Budget-Ms" in response.json()["error"]


def test_duplicated_budget_header_gets_422(client: TestClient) -> None:
    response = client.post(
        "/v1/classify", content=png(), headers=[("X-Latency-Budget-Ms", "5"), ("X-Latency-Budget-Ms", "50")]
    )
    assert response.status_code == 422 and "sent 2 times" in response.json()["error"]


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"content": b""}, 400, "empty body"),
        ({"content": b"GIF89a" + b"\x00" * 40}, 415, "GIF"),
        ({"content": b"plain text"}, 400, "not a recognizable image"),
        ({"json": {"image": "abc"}}, 415, "not JSON"),
        ({"files": {"a": ("a.png", png()), "b": ("b.png", png())}}, 400, "Too many files"),
        ({"data": {"note": "no file"}, "files": {}}, 400, ""),
    ],
)
def test_bad_bodies_get_clear_4xx(client: TestClient, kwargs: dict, status: int, message: str) -> None:
    response = client.post("/v1/classify", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"] and response.headers["x-request-id"]


def test_multipart_with_a_form_field_but_no_file(client: TestClient) -> None:
    response = client.post(
        "/v1/classify",
        data={"note": "hi"},
        headers={"content-type": "multipart/form-data; boundary=x"},
        content=b'--x\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--x--\r\n',
    )
    assert response.status_code == 400 and "exactly one file" in response.json()["error"]


def test_multipart_with_many_fields_or_a_huge_part_gets_4xx(client_factory) -> None:
    client = client_factory(max_body_bytes=64 * 1024)
    fields = {f"f{i}": "x" for i in range(50)}
    response = client.post("/v1/classify", data=fields, files={"image": ("x.png", png(), "image/png")})
    assert response.status_code == 400 and "Too many fields" in response.json()["error"], response.text
    huge = client.post("/v1/classify", files={"image": ("x.png", b"\x89PNG" + b"z" * 100_000, "image/png")})
    assert huge.status_code == 413, huge.text


def test_oversized_body_gets_413(client_factory) -> None:
    client = client_factory(max_body_bytes=2048)
    response = client.post("/v1/classify", content=b"\x89PNG" + b"x" * 5000)
    assert response.status_code == 413 and "exceeds 2048 bytes" in response.json()["error"]

    def chunks():
        for _ in range(10):
            yield b"y" * 1000

    assert client.post("/v1/classify", content=chunks()).status_code == 413


def test_subnets_and_status_expose_what_the_scheduler_knows(client: TestClient) -> None:
    # a budget no busy test machine can miss: with the 100-ms default a slow moment answered 504 undispatched
    assert client.post("/v1/classify", content=png(), headers={"X-Latency-Budget-Ms": "30000"}).status_code == 200
    subnets = client.get("/v1/subnets").json()
    assert subnets["device_profile"] == "cpu-2t"
    assert [s["id"] for s in subnets["subnets"]] == ["s0", "s1", "s2"]
    first = subnets["subnets"][0]
    assert first["depths"] == [1, 1, 1] and len(first["channels"]) == 6
    assert first["latency"][0]["batch_size"] == 1 and first["latency"][0]["predicted_ms"] > 0
    status = client.get("/v1/status").json()
    assert status["ready"] and status["policy"] == "adaptive" and status["dispatches"] >= 1
    assert status["gpu_percent"] is None and set(status["corrections"]) == {"s0", "s1", "s2"}
    assert status["safety_margin_ms"] == 3.0  # the documented default, which load-test reports name


def test_metrics_count_requests_by_outcome_and_subnet(client: TestClient) -> None:
    subnet = client.post("/v1/classify", content=png()).json()["subnet"]["id"]
    client.post("/v1/classify", content=b"junk")
    text = client.get("/metrics").text
    assert f'slimserve_requests_total{{outcome="ok",subnet="{subnet}"}} 1.0' in text
    assert 'slimserve_requests_total{outcome="invalid",subnet=""} 1.0' in text
    for name in ("slimserve_queue_seconds_bucket", "slimserve_inference_seconds_bucket", "slimserve_queue_depth",
                 "slimserve_batch_size_bucket", "slimserve_chosen_width_bucket", "slimserve_budget_total", "slimserve_ready 1.0"):  # fmt: skip
        assert name in text, name


# --- KServe v2 --------------------------------------------------------------------------------


def test_v2_metadata_and_health(client: TestClient) -> None:
    assert client.get("/v2").json()["name"] == "slimserve"
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/tiny-test").json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28] and meta["outputs"][0]["name"] == "probabilities"
    assert client.get("/v2/models/tiny-test/ready").status_code == 200
    missing = client.get("/v2/models/other")
    assert missing.status_code == 404 and "unknown model" in missing.json()["error"]


def infer_body(data, datatype="UINT8", shape=(2, 1, 28, 28), **extra):
    return {
        "id": "r1",
        "inputs": [{"name": "input", "shape": list(shape), "datatype": datatype, "data": data}],
        **extra,
    }


def test_v2_infer_batch_uint8_with_budget_parameter(client: TestClient) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28))
    response = client.post(
        # generous, so a busy test machine cannot turn the protocol check into a deadline miss
        "/v2/models/tiny-test/infer",
        json=infer_body(pixels.tolist(), parameters={"latency_budget_ms": 5000}),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "tiny-test" and body["id"] == "r1"
    probabilities = np.array(body["outputs"][0]["data"]).reshape(body["outputs"][0]["shape"])
    assert probabilities.shape == (2, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-4)
    assert body["outputs"][1]["data"] == probabilities.argmax(1).tolist()
    assert body["parameters"]["latency_budget_ms"] == 5000 and body["parameters"]["subnet_id"]


def test_v2_fp32_matches_uint8_and_binary_extension_works(client: TestClient) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (1, 1, 28, 28)).astype(np.uint8)
    as_uint8 = client.post(
        "/v2/models/tiny-test/infer", json=infer_body(pixels.flatten().tolist(), shape=(1, 1, 28, 28))
    ).json()
    as_fp32 = client.post(
        "/v2/models/tiny-test/infer", json=infer_body((pixels / 255.0).flatten().tolist(), "FP32", (1, 1, 28, 28))
    ).json()
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1, 1, 28, 28], "datatype": "UINT8", "parameters": {"binary_data_size": 784}}
            ],
            "outputs": [{"name": "class_index"}],
        }
    ).encode()
    binary = client.post(
        "/v2/models/tiny-test/infer",
        content=header + pixels.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"},
    ).json()
    assert as_uint8["outputs"][0]["data"] == pytest.approx(as_fp32["outputs"][0]["data"], abs=1e-5)
    assert [o["name"] for o in binary["outputs"]] == ["class_index"]
    assert binary["outputs"][0]["data"] == as_uint8["outputs"][1]["data"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (infer_body([1, 2, 3], shape=(1, 1, 28, 28)), "holds 3 values"),
        (infer_body([0] * 784, shape=(1, 3, 28, 28)), "does not match"),
        (infer_body([0] * 784, "INT64", (1, 1, 28, 28)), "not supported"),
        (infer_body([300] * 784, shape=(1, 1, 28, 28)), "integers in [0, 255]"),
        (infer_body([0.5] * 783 + [2.0], "FP32", (1, 1, 28, 28)), "in [0, 1]"),
        (infer_body(["a"] * 784, shape=(1, 1, 28, 28)), "must be numbers"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "input"}]}, "shape"),
        (infer_body([0] * 784, shape=(1, 1, 28, 28), outputs=[{"name": "logits"}]), "unknown output"),
    ],
)
def test_v2_malformed_requests_get_400_with_error_json(client: TestClient, body: dict, message: str) -> None:
    response = client.post("/v2/models/tiny-test/infer", json=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) <= {"error", "request_id"} and message in response.json()["error"]


def test_v2_budget_parameter_is_validated(client: TestClient) -> None:
    body = infer_body([0] * 784, shape=(1, 1, 28, 28), parameters={"latency_budget_ms": -1})
    assert client.post("/v2/models/tiny-test/infer", json=body).status_code == 422


# --- readiness --------------------------------------------------------------------------------


def test_readiness_is_503_until_warm_up_is_done(tiny_bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    original = ModelRuntime.warm_up

    def gated(self, max_batch, repeats=2):
        release.wait(10)
        return original(self, max_batch, repeats)

    monkeypatch.setattr(ModelRuntime, "warm_up", gated)
    with TestClient(create_app(Settings(bundle=tiny_bundle))) as client:
        assert client.get("/livez").status_code == 200
        loading = client.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert client.post("/v1/classify", content=png()).status_code == 503
        assert client.get("/v2/health/ready").status_code == 503
        release.set()
        wait_ready(client)
        assert client.post("/v1/classify", content=png()).status_code == 200
        client.app.state.slimserve.engine.begin_drain()
        draining = client.get("/readyz")
        assert draining.status_code == 503 and draining.json()["status"] == "draining"
        refused = client.post("/v1/classify", content=png())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"


def test_start_up_warms_both_inference_routes_before_the_engine_and_counts_nothing(
    tiny_bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, int]] = []

    async def spy(app, routes, channels, size):
        seen.append(await warm_front_end(app, routes, channels, size))
        return seen[-1]

    monkeypatch.setattr("slimserve.server.app.warm_front_end", spy)
    with TestClient(create_app(Settings(bundle=tiny_bundle))) as client:
        wait_ready(client)
        metrics = client.get("/metrics").text
    # each reached its endpoint and was refused there, not by the router (404) or a validator (422)
    assert seen == [{"POST /v1/classify": 503, "POST /v2/models/tiny-test/infer": 503}]
    assert "slimserve_requests_total{" not in metrics  # no warm-up request was counted


def test_front_end_warm_up_warns_about_a_route_it_could_not_reach(
    tiny_bundle, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(Settings(bundle=tiny_bundle))
    routes = [("POST", "/v1/classify"), ("POST", "/v1/no-such-route")]
    statuses = asyncio.run(warm_front_end(app, routes, 1, (28, 28)))
    assert statuses == {"POST /v1/classify": 503, "POST /v1/no-such-route": 404}
    assert "expected 503 (model is loading), got {'POST /v1/no-such-route': 404}" in caplog.text


def test_a_row_with_a_resolution_answers_as_its_module_on_the_shrunk_image(client_factory, tmp_path: Path) -> None:
    bundle_dir = make_tiny_bundle(tmp_path / "bundle", resolutions=(14, None, None))
    client = client_factory(bundle=bundle_dir, policy="static:s0")
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    response = client.post("/v1/classify", content=buffer.getvalue(), headers={"X-Latency-Budget-Ms": "5000"})
    assert response.status_code == 200
    body = response.json()
    assert body["subnet"]["id"] == "s0" and body["subnet"]["resolution"] == 14
    bundle = load_bundle(bundle_dir)
    mean, std = bundle.manifest.input.mean[0], bundle.manifest.input.std[0]
    x = (torch.from_numpy(image).float().reshape(1, 1, 28, 28) / 255 - mean) / std
    with torch.inference_mode():
        expected = torch.softmax(bundle.materialize(bundle.table.row("s0"))(x), 1)[0]
    assert body["class_index"] == int(expected.argmax())
    assert body["top_k"][0]["probability"] == pytest.approx(float(expected.max()), abs=1e-4)
    assert [s["resolution"] for s in client.get("/v1/subnets").json()["subnets"]] == [14, 28, 28]
