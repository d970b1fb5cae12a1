"""LC-Net end to end on a tiny bundle and real images: gates trained, points measured, a servable bundle, resume."""

import json
from pathlib import Path

import pytest
import torch

from slimserve.models.bundle import load_bundle, supernet_info
from slimserve.models.checkpoint import CheckpointError
from slimserve.models.datasets import Splits, split_off
from slimserve.models.evaluate import accuracy
from slimserve.models.fine_tune import FineTuneConfig
from slimserve.models.flops import count_flops
from slimserve.models.gating import GatedResNet
from slimserve.models.gating_train import evaluate_gates, gate_flops, load_gated, train_gates
from slimserve.searcher.latency import ProfileSettings
from slimserve.searcher.lcnet_report import write_lcnet_report
from slimserve.searcher.lcnet_run import LCNetConfig, checkpoint_path, run
from slimserve.server.runtime import ModelRuntime
from tests.helpers import make_tiny_bundle, make_tiny_gated_bundle


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, fmnist_train, fmnist_test):
    bundle = load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("source")))
    train_set, search = split_off(fmnist_train.subset(torch.arange(2000), ""), 300, seed=0)
    return bundle, Splits(train_set, search, fmnist_test.subset(torch.arange(300), "[:300]"))


def test_open_gates_measure_as_the_ungated_network(source) -> None:
    bundle, splits = source
    row = bundle.table.subnets[-1]
    info = supernet_info(bundle.manifest)
    teacher = bundle.supernet.materialize(row.channels, bundle.bn_stats[row.id])
    model = GatedResNet(bundle.supernet, row.channels)
    static = model.materialize(bundle.bn_stats[row.id])  # gates open: the same statistics apply
    flops = count_flops(teacher, bundle.supernet.input_shape)
    fixed = flops - sum(model.branch_flops) + gate_flops(model)
    outcome = evaluate_gates(static, splits.test, info.mean, info.std, fixed)
    assert outcome.accuracy == pytest.approx(accuracy(teacher, splits.test, info.mean, info.std))
    assert outcome.blocks_run == len(model.running) and outcome.groups_run == pytest.approx(1.0)
    assert outcome.flops == pytest.approx(count_flops(static, bundle.supernet.input_shape), rel=0.01)


def test_training_resumes_and_refuses_another_penalty(source, tmp_path: Path) -> None:
    bundle, splits = source
    row = bundle.table.subnets[-1]
    info = supernet_info(bundle.manifest)
    path = tmp_path / "gated.safetensors"
    config = FineTuneConfig(steps=4, batch_size=16, warmup_steps=1, checkpoint_every=2)
    model = GatedResNet(bundle.supernet, row.channels)
    train_gates(model, splits.train, info.mean, info.std, config, 0.5, checkpoint=path, info=info, progress=False)
    saved, _, penalty, extra = load_gated(path)
    assert penalty == 0.5 and int(extra["train.step"]) == 4
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], tensor)
    with pytest.raises(CheckpointError, match=r"penalty 0\.5, not 1\.0"):
        train_gates(model, splits.train, info.mean, info.std, config, 1.0, checkpoint=path, info=info, progress=False)


def test_the_pipeline_writes_a_report_and_a_servable_bundle(source, tmp_path: Path) -> None:
    bundle, splits = source
    row, *_ = reversed(bundle.table.subnets)
    info = supernet_info(bundle.manifest)
    config = LCNetConfig(
        penalties=(0.5, 2.0),
        thresholds=(0.0, 0.3),
        finetune=FineTuneConfig(steps=6, batch_size=16, warmup_steps=1, checkpoint_every=3),
    )
    front = [(r, bundle.bn_stats[r.id]) for r in bundle.table.subnets[:-1]]
    profile = ProfileSettings(threads=1, batch_sizes=(1, 8, 32), repeats=2, warmup=1, idle_gap_ms=0.0)
    report = run(
        bundle.supernet, row.channels, bundle.bn_stats[row.id], info, splits, config, tmp_path / "out",
        front=front, profile=profile, bundle_dir=tmp_path / "gated",
    )  # fmt: skip
    assert len(report["points"]) == 4 and {p["penalty"] for p in report["points"]} == {0.5, 2.0}
    for p in report["points"]:
        assert 0 < p["test"]["flops"] <= report["ungated"]["flops"] * 1.01
        assert set(p["latency"]) == {"1", "8", "32"}
    assert [r["id"] for r in report["front"]] == [r.id for r in bundle.table.subnets[:-1]]
    assert all(checkpoint_path(tmp_path / "out", p).exists() for p in config.penalties)
    served = load_bundle(tmp_path / "gated")
    assert served.manifest.gating is not None and served.manifest.gating.penalty == report["chosen"]["penalty"]
    runtime = ModelRuntime(served, threads=1)
    answers = runtime.infer_gated(0, splits.test.images[:4])
    assert answers.probabilities.shape == (4, 10)
    page = write_lcnet_report(report, tmp_path / "docs", "fashion-mnist", "slimserve lcnet --quick")
    assert "Operating points" in page.read_text() and (tmp_path / "docs" / "lcnet-fashion-mnist.png").exists()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["chosen"] == report["chosen"]


def test_the_command_refuses_a_gated_bundle_as_its_start_in_one_line(tmp_path: Path, capsys) -> None:
    from slimserve.cli import main

    assert main(["lcnet", "--from", str(make_tiny_gated_bundle(tmp_path / "gated")), "--out", str(tmp_path)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("slimserve lcnet:") and "not a multi-stage or gated bundle" in error
    assert len(error.splitlines()) == 1
    assert main(["lcnet", "--row", "nope", "--out", str(tmp_path)]) == 1
    assert "no subnet 'nope' in the table" in capsys.readouterr().err


def test_profiling_a_gated_bundle_on_blank_images_is_refused(tmp_path: Path) -> None:
    from slimserve.models.schema import BundleError
    from slimserve.searcher.profile import profile_bundle

    bundle = load_bundle(make_tiny_gated_bundle(tmp_path / "gated"))
    with pytest.raises(BundleError, match="a gated bundle's rows are timed on real images"):
        profile_bundle(bundle, ProfileSettings(repeats=1))
