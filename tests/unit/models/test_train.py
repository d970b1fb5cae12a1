"""Training's pure parts: the schedule, augmentation, config validation."""

import pytest
import torch

from slimserve.models.datasets import ImageDataset
from slimserve.models.train import TrainConfig, learning_rate
from slimserve.models.transforms import augment


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    cfg = TrainConfig(learning_rate=0.2, warmup_steps=10)
    assert learning_rate(cfg, 0, 100) == pytest.approx(0.02)
    assert learning_rate(cfg, 9, 100) == pytest.approx(0.2)
    assert learning_rate(cfg, 55, 100) == pytest.approx(0.1, rel=0.05)
    assert learning_rate(cfg, 100, 100) == pytest.approx(0.0, abs=1e-9)


def test_augmentation_is_deterministic_and_keeps_pixels(fmnist_test: ImageDataset) -> None:
    images = fmnist_test.images[:32]
    a = augment(images, torch.Generator().manual_seed(0))
    b = augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == images.shape and a.dtype == torch.uint8
    assert not torch.equal(a, images)
    # a crop of a zero-padded image only moves pixels or drops them at the border, never invents values
    assert a.sum() <= images.sum()


@pytest.mark.parametrize("bad", [{"sampling": "odd"}, {"precision": "fp8"}, {"epochs": 0}, {"static_width": 1.5}])
def test_bad_configs_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**bad)
