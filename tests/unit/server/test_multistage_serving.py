"""Serving a multi-stage (S2DNAS) bundle: rows exit by stage k, deadlines cut requests short (anytime)."""

from __future__ import annotations

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
from tests.helpers import make_tiny_multistage_bundle


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    # No confident exits (thresholds "never"): where a request leaves is decided by its deadline alone.
    bundle = load_bundle(make_tiny_multistage_bundle(tmp_path_factory.mktemp("ms"), thresholds=(None, None)))
    return ModelRuntime(bundle, threads=1, column="cpu-2t")


def test_each_row_runs_up_to_its_stage(runtime: ModelRuntime) -> None:
    assert [s.last_stage for s in runtime.subnets] == [0, 1, 2]
    images = torch.randint(0, 255, (5, 1, 28, 28), dtype=torch.uint8)
    for subnet in runtime.subnets:
        exits = runtime.infer_with_exits(subnet.index, images, None)
        assert exits.stage.tolist() == [subnet.last_stage] * 5
        torch.testing.assert_close(exits.probabilities, runtime.infer(subnet.index, images))  # the same path
        torch.testing.assert_close(exits.probabilities.sum(1), torch.ones(5))


def test_stage_times_come_from_the_profiled_column(runtime: ModelRuntime) -> None:
    # helpers: 1, 2, 4 ms per stage at batch 1, times (1 + batch / 4)
    assert runtime.stage_seconds(0, 1) == pytest.approx(0.00125)
    assert runtime.stage_seconds(2, 3) == pytest.approx(0.004 * 2.0)  # batch 3 -> the profiled batch 4
    assert runtime.stage_seconds(1, 64) == pytest.approx(0.002 * 9.0 * 2)  # beyond 32: linear in the batch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("anytime", [True, False])
def test_a_request_whose_budget_forbids_the_next_stage_is_answered_with_the_stage_it_reached(
    runtime: ModelRuntime, anytime: bool
) -> None:
    clock = Clock()
    profile = [{b: s.p50_ms for b, s in row.latency["cpu-2t"].items()} for row in runtime.bundle.table.subnets]
    metrics = Metrics()
    scheduler = Scheduler(
        runtime,
        StaticPolicy(2),  # the row that may run all three stages
        LatencyModel(profile, 8),
        Settings(max_batch=8, safety_margin_ms=0.0, anytime=anytime),
        Telemetry(),
        metrics,
        clock,
    )
    outcomes: dict[str, JobResult | Rejected] = {}

    def job(name: str, budget_s: float) -> Job:
        image = torch.randint(
            0, 255, (1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(len(name))
        )
        return Job(image, clock(), budget_s, lambda outcome: outcomes.__setitem__(name, outcome))

    # Stage 2 for two images is profiled at 3 ms (the clock does not move while the model runs):
    # a 2.5 ms budget allows stage 1 only; 1 s allows all three.
    scheduler.submit(job("loose", 1.0))
    scheduler.submit(job("tight", 0.0025))
    scheduler.dispatch()
    loose, tight = outcomes["loose"], outcomes["tight"]
    assert isinstance(loose, JobResult) and isinstance(tight, JobResult)
    assert (loose.stage, loose.cut_short) == (2, False)
    assert loose.batch_size == tight.batch_size == 2
    if not anytime:  # it runs to its exit stage and answers late
        assert (tight.stage, tight.cut_short) == (2, False)
        return
    assert (tight.stage, tight.cut_short) == (0, True)
    counted = {
        (s.labels["stage"], s.labels["reason"]): s.value
        for family in metrics.registry.collect()
        if family.name == "slimserve_exits"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert counted == {("3", "last"): 1.0, ("1", "anytime"): 1.0}


def test_a_table_row_that_names_no_stage_is_refused(tmp_path: Path) -> None:
    import json

    directory = make_tiny_multistage_bundle(tmp_path / "bundle")
    table = json.loads((directory / "subnets.json").read_text())
    table["subnets"][1]["channels"][0] += 8  # no stage computes these widths
    (directory / "subnets.json").write_text(json.dumps(table))
    with pytest.raises(BundleError, match=r"subnets\[1\]\.channels: a multi-stage row runs stages 1..k"):
        load_bundle(directory, verify=False)
