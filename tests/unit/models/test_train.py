"""Training's pure parts: the schedule, augmentation, the sandwich, config validation."""

import pytest
import torch

from slimserve.models.datasets import ImageDataset
from slimserve.models.families import create_supernet
from slimserve.models.train import TrainConfig, learning_rate, sandwich
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


def test_the_sandwich_adds_the_narrowest_full_depth_subnet_at_full_resolution_on_request() -> None:
    space = create_supernet("cifar_resnet", depth=20, base_channels=64).space
    resolutions = (28, 16, 8)
    plain, plain_at = sandwich(space, TrainConfig(random_subnets=2), resolutions, step=3)
    assert plain[:2] == [space.largest(), space.smallest()] and plain_at[:2] == [28, 8] and len(plain) == 4
    subnets, at = sandwich(space, TrainConfig(random_subnets=2, narrowest_full_depth=True), resolutions, step=3)
    narrowest = subnets[2]
    assert space.depths(narrowest) == space.max_depths() == (3, 3, 3)
    assert narrowest == space.uniform(0.125) and at[2] == 28
    assert subnets[3:] == plain[2:] and at[3:] == plain_at[2:]  # the random draws are unchanged
    with pytest.raises(ValueError, match="narrowest-full-depth"):
        TrainConfig(static_width=0.5, narrowest_full_depth=True)
