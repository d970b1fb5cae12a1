"""The whole search on a briefly trained tiny supernet: a loadable bundle, a ranked table, a report."""

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from slimserve.models.bundle import load_bundle
from slimserve.models.checkpoint import load_supernet
from slimserve.models.datasets import Splits, split_off
from slimserve.models.evaluate import accuracy
from slimserve.models.flops import count_flops
from slimserve.models.schema import LatencyStat
from slimserve.models.train import TrainConfig, train
from slimserve.searcher.latency import ProfileSettings
from slimserve.searcher.ranking import NoiseRankingConfig
from slimserve.searcher.report import write_report
from slimserve.searcher.search import SearchConfig, run_search, write_search_bundle
from slimserve.searcher.search_state import SearchState


def flops_clock(
    modules: Sequence[nn.Module], input_shape: tuple[int, ...], settings: ProfileSettings, *_: object, **__: object
) -> list[dict[int, LatencyStat]]:
    """A deterministic stand-in for measured latency (0.2 ms + 1 ms per 10 MFLOPs per image): a tiny
    network's subnets differ by less than this machine's timing noise, and which of them survive the
    filter must not depend on it. Real timing has its own tests (tests/unit/searcher/test_latency.py)."""
    return [
        {
            b: LatencyStat(p50_ms=0.2 + b * flops / 1e7, p95_ms=0.3 + b * flops / 1e7, threads=settings.threads)
            for b in settings.batch_sizes
        }
        for flops in (count_flops(m, input_shape) for m in modules)
    ]


def tiny_search_config(**settings: object) -> SearchConfig:
    """Few images, steps, noise-ranking steps and predictor samples; k = 3: the whole pipeline in seconds."""
    quick = {
        "search_images": 300,
        "quick_calibration_images": 128,
        "calibration_images": 256,
        "finetune_steps": 3,
        "finetune_threshold": 0.02,
        "noise": NoiseRankingConfig(steps=3, batch_size=16),
        "k": 3,
        "spare": 0,
        "predictor_subnets": 6,
        "predictor_holdout": 2,
    }
    return SearchConfig(**{**quick, **settings})  # type: ignore[arg-type]


def small_splits(fmnist_train, fmnist_test, train_images: int, test_images: int) -> Splits:
    """The first ``train_images`` training images less 1,000 held out for the search, and a test prefix."""
    train_set, search = split_off(fmnist_train.subset(torch.arange(train_images), ""), 1000, seed=0)
    return Splits(train_set, search, fmnist_test.subset(torch.arange(test_images), f"[:{test_images}]"))


def trained_tiny(splits: Splits, directory: Path, **settings: object) -> Path:
    """A ResNet-8 of base width 16 after one epoch: its checkpoint."""
    config = TrainConfig(
        family_args={"depth": 8, "base_channels": 16}, epochs=1.0, warmup_steps=10, eval_each_epoch=False,
        **settings,  # type: ignore[arg-type]
    )  # fmt: skip
    return train(config, splits, directory, progress=False).checkpoint


@pytest.mark.parametrize("resolutions", [(), (28, 14)], ids=["width-depth", "width-depth-resolution"])
def test_search_writes_a_servable_bundle_and_a_report(
    tmp_path: Path, fmnist_train, fmnist_test, resolutions: tuple[int, ...]
) -> None:
    splits = small_splits(fmnist_train, fmnist_test, 8000, 1000)
    supernet, info, _ = load_supernet(trained_tiny(splits, tmp_path / "train", resolutions=resolutions))

    search_config = tiny_search_config(
        k=4,
        spare=3,
        predictor_holdout=4,
        step_fraction=0.25,
        compare=True,
        uniform_widths=(0.25, 0.5, 1.0),
        random_subnets=4,
        profile=ProfileSettings(batch_sizes=(1, 2, 8), repeats=4, warmup=1, burst=2),
        resolutions=resolutions,
    )
    outcome = run_search(supernet, info, splits, search_config, progress=False, timer=flops_clock)
    write_search_bundle(outcome, info, splits, search_config, tmp_path / "bundle", {"command": "test", "seed": 0})
    page = write_report(outcome.report, tmp_path / "report", "fashion-mnist", "test")

    bundle = load_bundle(tmp_path / "bundle")  # hashes, schema and ranking invariants all checked here
    rows = bundle.table.subnets
    assert 2 <= len(rows) <= 4 and all(row.origin == "searched" for row in rows)
    assert rows[-1].accuracy > 0.5 and all(row.accuracy_split == "fashion-mnist/test[:1000]" for row in rows)
    assert set(rows[0].latency["cpu-2t"]) == {1, 2, 8}
    assert outcome.report["ranking"]["chosen"] in ("identity", "weight-norm", "noise")
    assert outcome.report["path"][0]["channels"] == "-".join(map(str, supernet.space.largest()))
    # the path ends narrowest and shallowest (one block per stage; depth 8 has one anyway), at the lowest resolution
    assert outcome.report["path"][-1]["channels"] == "-".join(map(str, supernet.space.smallest()))
    assert [p["resolution"] for p in outcome.report["path"]][:: len(outcome.report["path"]) - 1] == [
        28,
        min(resolutions or [28]),
    ]
    assert {row.resolution for row in rows} <= set(resolutions or [28]) and bundle.table.schema_version == 4
    assert [row.depths for row in rows] == [supernet.space.depths(row.channels) for row in rows]
    assert outcome.report["gain"]["per_subnet"] is not None
    assert len(outcome.report["random"]) == 4 and "gain_vs_random" in outcome.report
    assert 0 < outcome.report["gain"]["noise_sd"] < 0.05
    assert page.exists() and (tmp_path / "report" / "search-fashion-mnist.png").stat().st_size > 10_000
    # the table's accuracy is what the stored weights deliver
    for row in (rows[0], rows[-1]):
        assert abs(accuracy(bundle.materialize(row), splits.test, info.mean, info.std) - row.accuracy) < 1e-6


def test_the_paper_order_from_a_static_network(tmp_path: Path, fmnist_train, fmnist_test) -> None:
    """Noise ranking on a network trained alone, selective fine-tuning along the path, then training
    on the subnets found: the searched network is made dynamic by the search itself."""
    splits = small_splits(fmnist_train, fmnist_test, 6000, 500)
    static, info, _ = load_supernet(trained_tiny(splits, tmp_path / "static", static_width=1.0))

    search_config = tiny_search_config(
        step_fraction=0.5,
        profile=ProfileSettings(batch_sizes=(1, 2), repeats=2, warmup=1, burst=1),
        start="static",
        final_training_steps=6,
    )
    outcome = run_search(static, info, splits, search_config, progress=False, timer=flops_clock)
    report = outcome.report
    assert report["ranking"]["chosen"] == "noise" and list(report["ranking"]["scores"]) == ["noise"]
    # a static network's narrow subnets start near chance, so the path must have fine-tuned
    assert report["finetunes"] >= 1
    assert "training on the subnets found" in report["phases_s"]
    assert report["config"]["start"] == "static" and report["config"]["final_training_steps"] == 6
    assert len(outcome.table.subnets) >= 2


class Crash(Exception):
    pass


def test_a_search_stopped_midway_resumes_from_its_state_and_finds_the_same_table(
    tmp_path: Path, fmnist_train, fmnist_test, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits = small_splits(fmnist_train, fmnist_test, 6000, 500)
    checkpoint = trained_tiny(splits, tmp_path / "train")
    search_config = tiny_search_config(
        step_fraction=0.25,
        finetune_threshold=0.003,  # fine-tunes before and after the stop
        profile=ProfileSettings(batch_sizes=(1,), repeats=2, warmup=1, burst=1),
    )

    def search_from_checkpoint(state: SearchState | None = None):
        supernet, info, _ = load_supernet(checkpoint)
        return run_search(supernet, info, splits, search_config, progress=False, timer=flops_clock, state=state)

    whole = search_from_checkpoint()
    save_walk = SearchState.save_walk

    def save_then_crash(self: SearchState, network, walked) -> None:  # the machine is lost after step 4
        save_walk(self, network, walked)
        if len(walked.path) == 5:
            raise Crash

    monkeypatch.setattr(SearchState, "save_walk", save_then_crash)
    state_path = tmp_path / "search-state.safetensors"
    with pytest.raises(Crash):
        search_from_checkpoint(SearchState.open(state_path, {"search": 1}))
    monkeypatch.undo()

    state = SearchState.open(state_path, {"search": 1})
    assert state.walked is not None and len(state.walked.path) == 5
    assert 0 < state.walked.stats.finetunes < whole.report["finetunes"]
    resumed = search_from_checkpoint(state)
    assert resumed.report["path"] == whole.report["path"]
    assert resumed.report["ranking"] == whole.report["ranking"]
    assert [(r.channels, r.resolution, r.accuracy) for r in resumed.table.subnets] == [
        (r.channels, r.resolution, r.accuracy) for r in whole.table.subnets
    ]
