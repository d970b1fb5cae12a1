"""Training on real data (a small Fashion-MNIST subset): resume, run identity, static baselines."""

from pathlib import Path

import pytest
import torch

from slimserve.models.checkpoint import load_weights
from slimserve.models.datasets import ImageDataset, Splits, split_off
from slimserve.models.train import LAST_CHECKPOINT, TrainConfig, train

TINY = {"depth": 8, "base_channels": 16}


def small_splits(fmnist_test: ImageDataset) -> Splits:
    rest, test = split_off(fmnist_test.subset(torch.arange(1600), ""), 300, seed=5)
    train_set, search = split_off(rest, 300, seed=6)
    return Splits(train=train_set, search=search, test=test)


def config(**overrides) -> TrainConfig:
    base = dict(family_args=TINY, epochs=2, batch_size=64, warmup_steps=5, checkpoint_every=7, eval_each_epoch=False)
    return TrainConfig(**{**base, **overrides})


def test_resumed_training_matches_an_uninterrupted_run(tmp_path: Path, fmnist_test: ImageDataset) -> None:
    splits = small_splits(fmnist_test)
    straight = train(config(), splits, tmp_path / "straight", progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_step_9(step: int, loss: float) -> None:
        if step == 9:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config(), splits, tmp_path / "resumed", progress=False, on_step=stop_at_step_9)
    assert (tmp_path / "resumed" / LAST_CHECKPOINT).exists()  # saved at step 7
    resumed = train(config(), splits, tmp_path / "resumed", progress=False)
    assert resumed.test_accuracy == straight.test_accuracy
    first, _ = load_weights(straight.checkpoint)
    second, _ = load_weights(resumed.checkpoint)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_refuses_a_different_run(tmp_path: Path, fmnist_test: ImageDataset) -> None:
    splits = small_splits(fmnist_test)
    train(config(epochs=0.2), splits, tmp_path, progress=False)
    with pytest.raises(ValueError, match="seed"):
        train(config(epochs=0.4, seed=1), splits, tmp_path, progress=False)


def test_static_baseline_reports_only_its_width(tmp_path: Path, fmnist_test: ImageDataset) -> None:
    result = train(config(epochs=0.2, static_width=0.5), small_splits(fmnist_test), tmp_path, progress=False)
    assert list(result.test_accuracy) == ["0.5"]


def test_elastic_resolution_reports_the_smallest_at_the_lowest_and_resume_checks_it(
    tmp_path: Path, fmnist_test: ImageDataset
) -> None:
    splits = small_splits(fmnist_test)
    result = train(config(epochs=0.2, resolutions=(28, 14, 8)), splits, tmp_path, progress=False)
    assert set(result.test_accuracy) == {"0.125", "0.25", "0.5", "0.75", "1", "smallest@8"}
    with pytest.raises(ValueError, match="resolutions"):
        train(config(epochs=0.4, resolutions=(28, 14)), splits, tmp_path, progress=False)
    with pytest.raises(ValueError, match="one resolution"):
        train(config(static_width=0.5, resolutions=(28, 14)), splits, tmp_path / "static", progress=False)
