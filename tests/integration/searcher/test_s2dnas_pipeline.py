"""S2DNAS end to end on a briefly trained tiny static network: search, fine-tune, exits, report, resume."""

import json
from pathlib import Path

import pytest
import torch

from slimserve.models.bundle import load_bundle, row_stages, stage_widths
from slimserve.models.checkpoint import CheckpointError, load_supernet
from slimserve.models.datasets import Splits, split_off
from slimserve.models.evaluate import accuracy
from slimserve.models.fine_tune import FineTuneConfig
from slimserve.models.multistage import ExitCapped, MultiStageResNet, fraction_plan
from slimserve.models.multistage_train import fine_tune, load_multistage, save_multistage
from slimserve.models.train import TrainConfig, train
from slimserve.searcher.latency import ProfileSettings
from slimserve.searcher.s2dnas import S2DNASConfig
from slimserve.searcher.s2dnas_report import write_s2dnas_report
from slimserve.searcher.s2dnas_run import run


@pytest.fixture(scope="module")
def static(tmp_path_factory: pytest.TempPathFactory, fmnist_train, fmnist_test):
    train_set, search = split_off(fmnist_train.subset(torch.arange(4000), ""), 500, seed=0)
    splits = Splits(train_set, search, fmnist_test.subset(torch.arange(600), "[:600]"))
    config = TrainConfig(
        family_args={"depth": 8, "base_channels": 32},
        epochs=0.5,
        warmup_steps=5,
        eval_each_epoch=False,
        static_width=1.0,
    )
    trained = train(config, splits, tmp_path_factory.mktemp("static"), progress=False)
    return trained.checkpoint, splits


def small_config() -> S2DNASConfig:
    return S2DNASConfig(
        candidates=2,
        candidate_steps=3,
        score_images=300,
        calibration_images=128,
        finetune=FineTuneConfig(batch_size=32, warmup_steps=2),
    )


def test_pipeline_writes_the_network_the_search_and_a_report_and_resumes(tmp_path: Path, static) -> None:
    checkpoint, splits = static
    base, info, _ = load_supernet(checkpoint)
    profile = ProfileSettings(batch_sizes=(1, 2, 8), repeats=3, warmup=1, burst=1, idle_gap_ms=0.0)
    report = run(
        base,
        base.space.largest(),
        info,
        splits,
        small_config(),
        tmp_path / "out",
        6,
        3,
        tmp_path / "bundle",
        profile,
        static_bundle_dir=tmp_path / "bundle-static",
    )
    candidates = json.loads((tmp_path / "out" / "search.json").read_text())["candidates"]
    assert [c["method"] for c in candidates] == ["controller", "random"] * 2
    assert report["chosen"]["reward"] == max(c["reward"] for c in candidates)
    points = report["operating_points"]
    costs = [p["search_mean_flops"] for p in points]  # looser targets never cost more on the split they were fit on
    assert costs == sorted(costs, reverse=True)
    assert all(p["search_accuracy"] >= p["target_search_accuracy"] or p["thresholds"] == [None, None] for p in points)
    assert set(report["timing"]) == {"1", "8", "32"}
    assert sum(report["stage_flops"]) <= report["static"]["flops"] * 1.01
    page = write_s2dnas_report(report, tmp_path / "report", "fashion-mnist", "test")
    assert "Operating points" in page.read_text() and (tmp_path / "report" / "s2dnas-fashion-mnist.png").exists()

    bundle = load_bundle(tmp_path / "bundle")  # digests, schema, plan and rows all checked here
    assert bundle.staged is not None and len(bundle.table.subnets) >= 1
    served = report["served_point"]  # the bundle's exits aim at the best stage's search accuracy
    assert [t if t != float("inf") else None for t in bundle.thresholds] == served["thresholds"]
    assert served["search_accuracy"] >= served["target_search_accuracy"] or served["thresholds"] == [None, None]
    for row, last in zip(bundle.table.subnets, row_stages(bundle.staged_plan, bundle.table), strict=True):
        assert row.id == f"e{last + 1}" and row.channels == stage_widths(bundle.staged_plan, last)
        served = ExitCapped(bundle.staged, bundle.thresholds, last)
        assert accuracy(served, splits.test, info.mean, info.std) == pytest.approx(
            row.accuracy, abs=1.5 / len(splits.test)
        )
        assert set(row.latency[bundle.table.primary_device]) == {1, 2, 8}

    static = load_bundle(tmp_path / "bundle-static")
    assert [row.id for row in static.table.subnets] == ["static"] and static.staged is None
    assert static.table.subnets[0].accuracy == report["static"]["test_accuracy"]

    _, _, extra = load_multistage(tmp_path / "out" / "multistage.safetensors")
    assert int(extra["train.step"]) == 6
    base_again, _, _ = load_supernet(checkpoint)
    again = run(base_again, base_again.space.largest(), info, splits, small_config(), tmp_path / "out", 6, 3)
    assert again["chosen"] == report["chosen"]  # the search was read back, not redone
    assert again["stage_test_accuracy"] == report["stage_test_accuracy"]  # nothing more was trained


def test_a_checkpoint_of_another_plan_is_refused(tmp_path: Path, static) -> None:
    checkpoint, splits = static
    base, info, _ = load_supernet(checkpoint)
    subnet = base.space.largest()
    first = MultiStageResNet(base, subnet, fraction_plan(base, subnet, [(0.25, 0.5)] * 3, [True] * 3))
    save_multistage(tmp_path / "ms.safetensors", first, info, {"train.step": torch.tensor(1)})
    loaded, _, _ = load_multistage(tmp_path / "ms.safetensors")
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    other = MultiStageResNet(base, subnet, fraction_plan(base, subnet, [(0.5, 0.75)] * 3, [False] * 3))
    with pytest.raises(CheckpointError, match="different multi-stage network"):
        fine_tune(
            other,
            splits.train,
            info.mean,
            info.std,
            FineTuneConfig(steps=2),
            checkpoint=tmp_path / "ms.safetensors",
            info=info,
            progress=False,
        )
