"""Elastic input resolution: block-mean shrinking, materialized == dynamic, the sandwich's resolutions."""

import pytest
import torch

from slimserve.models.bn_calibration import calibrate_bn
from slimserve.models.families import create_supernet, list_families
from slimserve.models.flops import count_flops
from slimserve.models.ops import FrozenStatsNorm
from slimserve.models.resolution import AtResolution, check_resolutions, materialize, resize, scaled_size
from slimserve.models.train import TrainConfig, make_optimizer, sandwich_step

SMALL_ARGS = {
    "cifar_resnet": {"depth": 14, "base_channels": 16, "in_channels": 1, "image_size": 28},
    "imagenet_resnet18": {"image_size": 64, "num_classes": 20},
}


def test_halving_the_resolution_averages_two_by_two_blocks() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    expected = torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]])
    torch.testing.assert_close(resize(x, 2), expected)
    assert resize(x, 4) is x and resize(x, None) is x


def test_the_height_keeps_the_aspect_ratio() -> None:
    assert scaled_size(28, 28, 14) == (14, 14)
    assert scaled_size(24, 32, 16) == (12, 16)
    assert resize(torch.zeros(2, 3, 24, 32), 16).shape == (2, 3, 12, 16)


@pytest.mark.parametrize(
    ("given", "message"),
    [((28, 40), "between 4 and the input width 28, got \\[40\\]"), ((28, 14, 14), "distinct"), ((20, 14), "include")],
)
def test_bad_resolution_lists_are_refused_with_the_reason(given: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_resolutions(given, 28)


def test_resolutions_are_ordered_from_the_input_width_down() -> None:
    assert check_resolutions((14, 28, 21), 28) == (28, 21, 14)
    assert check_resolutions((), 28) == (28,)


@pytest.mark.parametrize("family", list_families())
def test_a_subnet_materialized_at_a_resolution_is_the_dynamic_network_on_the_shrunk_image(family: str) -> None:
    assert family in SMALL_ARGS, f"add small test arguments for new family {family!r}"
    torch.manual_seed(0)
    net = create_supernet(family, **SMALL_ARGS[family]).eval()
    native = net.input_shape[-1]
    subnet = net.space.smallest()
    x = torch.randn(6, *net.input_shape, generator=torch.Generator().manual_seed(1))
    low = native // 2
    stats = calibrate_bn(net, subnet, x, resolution=low)
    native_stats = calibrate_bn(net, subnet, x)
    assert not all(torch.equal(stats[k][1], native_stats[k][1]) for k in stats)  # they depend on the resolution
    static = materialize(net, subnet, stats, low).eval()
    assert isinstance(static, AtResolution) and static.resolution == low
    with torch.no_grad():
        torch.testing.assert_close(static(x), net(resize(x, low), subnet, FrozenStatsNorm(stats)), rtol=1e-4, atol=1e-4)
    # at the input's own resolution nothing is wrapped, and the shrunk image costs fewer FLOPs
    assert not isinstance(materialize(net, subnet, stats, native), AtResolution)
    assert count_flops(static, net.input_shape) < count_flops(materialize(net, subnet, stats), net.input_shape)


def test_each_subnet_of_the_sandwich_sees_its_own_resolution() -> None:
    torch.manual_seed(0)
    net = create_supernet("cifar_resnet", depth=8, base_channels=16, in_channels=1, image_size=28)
    seen: list[tuple[int, ...]] = []
    net.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    optimizer = make_optimizer(net, TrainConfig())
    subnets = [net.space.largest(), net.space.smallest(), net.space.uniform(0.5)]
    losses = sandwich_step(
        net, optimizer, torch.randn(8, 1, 28, 28), torch.arange(8) % 10, subnets, resolutions=[28, 8, 20]
    )
    assert seen == [(28, 28), (8, 8), (20, 20)] and len(losses) == 3
