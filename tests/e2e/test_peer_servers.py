"""The load test's peers: LitServe and Ray Serve serving one row of a bundle, driven by Locust."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from slimserve.cli import main
from slimserve.loadtest.report import read_records
from slimserve.loadtest.runner import ServerProcess, Workload, run_fresh, run_locust

WORKLOAD = Workload(arrival="poisson", rate=15.0, duration=3.0, budget_mix="100:5000", images=60, seed=2)


@pytest.mark.parametrize(("stack", "batching"), [("litserve", "4x1"), ("litserve", "1x1"), ("ray", "4x1")])
def test_a_peer_serves_the_row_it_was_given_to_the_load_generator(
    stack: str, batching: str, tiny_bundle_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip(stack, reason=f"{stack} is an optional peer: pip install 'slimserve[peers]' (make test does)")
    table = json.loads((tiny_bundle_dir / "subnets.json").read_text())
    row = table["subnets"][1]
    server = ServerProcess(tiny_bundle_dir, f"{stack}:{row['id']}@{batching}", log_path=tmp_path / "peer.log")
    server.start(timeout=180)
    try:
        summary = run_locust(server.url, WORKLOAD, tmp_path / "run.csv", body=server.body)
        fresh = run_fresh(server.url, WORKLOAD, tmp_path / "fresh.csv", body=server.body)  # the other generator
        # a body in the stack's format that is not an image (LitServe itself answers 500 to non-JSON)
        not_image = {"json": {"image": base64.b64encode(b"not an image").decode()}} if stack == "litserve" else {}
        bad = httpx.post(f"{server.url}/v1/classify", content=None if not_image else b"not an image", **not_image)
    finally:
        server.stop()
    assert summary["sent"] == summary["scheduled"] > 30
    assert summary["status_counts"] == {"200": summary["sent"]}  # every request answered, none late at 5 s
    assert summary["subnet_mix"] == {row["id"]: 1.0} and summary["mean_width"] is not None
    assert 0.0 <= summary["served_accuracy"] <= 1.0 and summary["mean_batch"] >= 1
    assert fresh["status_counts"] == {"200": fresh["sent"]} and fresh["subnet_mix"] == {row["id"]: 1.0}
    assert read_records(tmp_path / "fresh.csv")[0].subnet == row["id"]
    assert bad.status_code == 400 and "not a recognizable image" in bad.text
    assert server.process is not None and server.process.returncode is not None


def test_a_peer_for_a_row_the_table_lacks_exits_with_one_line(
    tiny_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["peer", "litserve", "--bundle", str(tiny_bundle_dir), "--subnet", "s99"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no subnet 's99'" in error and "ids: s0, s1, s2" in error
