"""Serving a gated (LC-Net) bundle: rows are gate thresholds of one network; answers say what ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimserve.models.bundle import load_bundle
from slimserve.models.schema import BundleError
from slimserve.server.latency_model import LatencyModel
from slimserve.server.metrics import Metrics
from slimserve.server.policy import StaticPolicy
from slimserve.server.refusals import Rejected
from slimserve.server.runtime import ModelRuntime
from slimserve.server.scheduler import Job, JobResult, Scheduler
from slimserve.server.settings import Settings
from slimserve.server.telemetry import Telemetry
from tests.helpers import make_tiny_gated_bundle


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    return ModelRuntime(load_bundle(make_tiny_gated_bundle(tmp_path_factory.mktemp("gated"))), threads=1)


def test_a_higher_threshold_row_runs_less_of_the_same_network(runtime: ModelRuntime) -> None:
    images = torch.randint(0, 255, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tight, loose = (runtime.infer_gated(s.index, images) for s in runtime.subnets)  # thresholds 0.6, 0.0
    blocks = len(runtime.bundle.gated.block_list) if runtime.bundle.gated is not None else 0
    assert blocks == 3
    assert bool((tight.blocks_run <= loose.blocks_run).all()) and bool((tight.groups_run <= loose.groups_run).all())
    assert float(tight.groups_run.sum()) < float(loose.groups_run.sum())  # the random gates do differ per threshold
    assert bool(((loose.blocks_run >= 0) & (loose.blocks_run <= blocks)).all())
    torch.testing.assert_close(loose.probabilities, runtime.infer(1, images))  # one network, the same answers
    torch.testing.assert_close(loose.probabilities.sum(1), torch.ones(16))


def test_the_scheduler_reports_what_each_image_ran(runtime: ModelRuntime) -> None:
    profile = [{b: s.p50_ms for b, s in row.latency["cpu-2t"].items()} for row in runtime.bundle.table.subnets]
    scheduler = Scheduler(
        runtime, StaticPolicy(0), LatencyModel(profile, 8), Settings(max_batch=8), Telemetry(), Metrics(), lambda: 5.0
    )
    outcomes: list[JobResult | Rejected] = []
    images = torch.randint(0, 255, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for image in images:
        scheduler.submit(Job(image, 5.0, 1.0, outcomes.append))
    scheduler.dispatch()
    expected = runtime.infer_gated(0, images)
    assert [o.blocks_run for o in outcomes if isinstance(o, JobResult)] == expected.blocks_run.tolist()
    assert [o.groups_run for o in outcomes if isinstance(o, JobResult)] == pytest.approx(expected.groups_run.tolist())


def edited(directory: Path, change) -> Path:
    table = json.loads((directory / "subnets.json").read_text())
    change(table["subnets"])
    (directory / "subnets.json").write_text(json.dumps(table))
    return directory


def test_gated_rows_must_carry_a_threshold_and_run_the_gated_network(tmp_path: Path) -> None:
    def no_threshold(rows):
        rows[0]["gate_threshold"] = None

    def other_channels(rows):
        rows[0]["channels"][0] -= 8

    with pytest.raises(BundleError, match=r"subnets\[0\]\.gate_threshold: required in a gated bundle"):
        load_bundle(edited(make_tiny_gated_bundle(tmp_path / "a"), no_threshold), verify=False)
    with pytest.raises(BundleError, match=r"subnets\[0\]\.channels: a gated row runs the gated network"):
        load_bundle(edited(make_tiny_gated_bundle(tmp_path / "b"), other_channels), verify=False)


def test_a_threshold_outside_a_gated_bundle_is_refused(tmp_path: Path) -> None:
    from tests.helpers import make_tiny_bundle

    def threshold(rows):
        rows[1]["gate_threshold"] = 0.1

    with pytest.raises(BundleError, match=r"subnets\[1\]\.gate_threshold: only rows of a gated bundle have one"):
        load_bundle(edited(make_tiny_bundle(tmp_path / "plain"), threshold), verify=False)
