"""A tiny supernet trained for a few hundred steps on real Fashion-MNIST: every width learns."""

from pathlib import Path

import torch

from slimserve.models.bn_calibration import calibrate_bn
from slimserve.models.checkpoint import load_supernet
from slimserve.models.datasets import Splits, split_off
from slimserve.models.evaluate import accuracy, calibration_images
from slimserve.models.ops import FrozenStatsNorm
from slimserve.models.train import TrainConfig, train
from slimserve.models.transforms import normalize


def test_every_width_learns_and_calibration_is_what_makes_it_work(tmp_path: Path, fmnist_train, fmnist_test) -> None:
    train_set, search = split_off(fmnist_train.subset(torch.arange(20_000), ""), 1000, seed=0)
    test = fmnist_test.subset(torch.arange(2000), "[:2000]")
    config = TrainConfig(
        # US-Nets' [0.25, 1] range: at width 1/8 this 16-channel network keeps a single group per stage
        family_args={"depth": 8, "base_channels": 16, "min_width": 0.25},
        epochs=2.0,
        batch_size=128,
        warmup_steps=20,
        eval_each_epoch=False,
    )
    result = train(config, Splits(train_set, search, test), tmp_path, progress=False)
    assert set(result.test_accuracy) == {"0.125", "0.25", "0.5", "0.75", "1"}
    assert all(acc > 0.75 for acc in result.test_accuracy.values()), result.test_accuracy  # chance is 0.10

    # The US-Nets calibration bug: statistics never collected (what calibrating in eval mode leaves
    # behind: running mean 0, variance 1) give near-chance accuracy for the very same weights.
    net, info, _ = load_supernet(result.checkpoint)
    subnet = net.space.uniform(0.5)
    stats = calibrate_bn(net, subnet, calibration_images(train_set, info.mean, info.std))
    stale = {k: (torch.zeros_like(m), torch.ones_like(v)) for k, (m, v) in stats.items()}
    images = normalize(test.images, info.mean, info.std)
    with torch.no_grad():
        calibrated = (net(images, subnet, FrozenStatsNorm(stats)).argmax(1) == test.labels).float().mean().item()
        uncalibrated = (net(images, subnet, FrozenStatsNorm(stale)).argmax(1) == test.labels).float().mean().item()
    assert calibrated > 0.75 and uncalibrated < 0.45, (calibrated, uncalibrated)
    assert abs(accuracy(net.materialize(subnet, stats), test, info.mean, info.std) - calibrated) < 0.005
