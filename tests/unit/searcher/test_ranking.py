import random

import pytest
import torch

from slimserve.models.bn_calibration import calibrate_bn
from slimserve.models.families import create_supernet
from slimserve.models.ops import FrozenStatsNorm
from slimserve.searcher.ranking import (
    NoiseRankingConfig,
    apply_ranking,
    noise_importance,
    permutation_from_importance,
    permute_unit,
    weight_norm_importance,
)


def tiny():
    torch.manual_seed(0)
    return create_supernet("cifar_resnet", depth=14, base_channels=16, in_channels=1, image_size=28)


def test_any_channel_permutation_preserves_the_full_width_function() -> None:
    net = tiny()
    x = torch.randn(8, 1, 28, 28)
    full = net.space.largest()
    with torch.no_grad():
        before_train = net(x, full)
        stats = calibrate_bn(net, full, x)
        before_eval = net(x, full, FrozenStatsNorm(stats))
    generator = torch.Generator().manual_seed(0)
    for unit_index, unit in enumerate(net.space.units):
        permute_unit(net, unit_index, torch.randperm(unit.max_channels, generator=generator))
    with torch.no_grad():
        assert torch.allclose(net(x, full), before_train, atol=1e-4)
        assert torch.allclose(net(x, full, FrozenStatsNorm(calibrate_bn(net, full, x))), before_eval, atol=1e-4)
        # ...while a narrower subnet now keeps different channels
        assert not torch.allclose(net(x, net.space.smallest()), tiny()(x, net.space.smallest()), atol=1e-3)


def test_permutation_moves_important_groups_first_and_keeps_ties_in_order() -> None:
    order = permutation_from_importance(torch.tensor([1.0, 3.0, 2.0]), group_size=2)
    assert order.tolist() == [2, 3, 4, 5, 0, 1]
    assert permutation_from_importance(torch.ones(3), 2).tolist() == list(range(6))


def test_weight_norm_ranks_a_zeroed_group_last() -> None:
    net = tiny()
    with torch.no_grad():
        net.stem_conv.weight[8:16] = 0  # unit 0 ("stage0"): its second group
        for block in net.basic_blocks[:2]:
            block.conv2.weight[8:16] = 0
    scores = weight_norm_importance(net)
    assert int(scores[0].argmin()) == 1
    apply_ranking(net, scores)
    assert net.stem_conv.weight[-8:].abs().sum() == 0  # the dead group moved to the end


def test_noise_ranking_finds_the_group_nothing_reads() -> None:
    net = tiny()
    unit = 1  # stage0.block0.mid: produced by blocks.0.conv1, read by blocks.0.conv2
    with torch.no_grad():
        net.basic_blocks[0].conv2.weight[:, 8:16] = 0  # group 1's output is never read
    images = torch.randn(256, 1, 28, 28)
    labels = torch.randint(0, 10, (256,))
    scores = noise_importance(
        net, images, labels, NoiseRankingConfig(steps=25, batch_size=32, learning_rate=0.1), seed=0
    )
    assert [s.shape[0] for s in scores] == [u.max_channels // 8 for u in net.space.units]
    assert int(scores[unit].argmin()) == 1
    # the network itself is untouched
    assert net.basic_blocks[0].conv2.weight[:, 8:16].abs().sum() == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_ranking_is_deterministic_for_a_seed(seed: int) -> None:
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    config = NoiseRankingConfig(steps=3, batch_size=16)
    a = noise_importance(tiny(), images, labels, config, seed=seed)
    b = noise_importance(tiny(), images, labels, config, seed=seed)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    random.seed(0)
