import torch
import torch.nn.functional as F

from slimserve.models.bn_calibration import calibrate_bn
from slimserve.models.families import create_supernet
from slimserve.models.ops import CalibratingNorm, FrozenStatsNorm, batch_stats_norm


def tiny():
    torch.manual_seed(0)
    return create_supernet("cifar_resnet", depth=8, base_channels=16, in_channels=1, image_size=28)


def test_statistics_are_cumulative_averages_of_batch_statistics() -> None:
    net = tiny()
    subnet = net.space.uniform(0.5)
    images = torch.randn(96, 1, 28, 28) * 3 + 1
    stats = calibrate_bn(net, subnet, images, batch_size=32)
    stem_out = F.conv2d(images, net.stem_conv.weight[: subnet[0]], padding=1)
    batches = stem_out.split(32)
    mean, var = stats["stem_bn"]
    torch.testing.assert_close(mean, torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        var, torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0), rtol=1e-4, atol=1e-5
    )
    assert mean.shape == (subnet[0],)


def test_calibration_normalizes_with_batch_statistics_like_training() -> None:
    # the US-Nets bug is collecting in eval mode: each layer would see stale statistics
    net = tiny()
    subnet = net.space.largest()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(net(x, subnet, CalibratingNorm()), net(x, subnet, batch_stats_norm), atol=1e-5)


def test_calibration_leaves_weights_and_mode_untouched_and_is_per_subnet() -> None:
    net = tiny().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small = calibrate_bn(net, net.space.smallest(), torch.randn(8, 1, 28, 28))
    large = calibrate_bn(net, net.space.largest(), torch.randn(8, 1, 28, 28))
    assert not net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert small["stem_bn"][0].shape[0] < large["stem_bn"][0].shape[0]
    assert set(small) == set(large)


def test_frozen_statistics_for_an_uncalibrated_layer_are_an_error() -> None:
    net = tiny()
    try:
        net(torch.randn(2, 1, 28, 28), net.space.largest(), FrozenStatsNorm({}))
    except KeyError as error:
        assert "calibrate" in str(error)
    else:
        raise AssertionError("expected a KeyError")
