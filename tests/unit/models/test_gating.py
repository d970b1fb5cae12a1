"""LC-Net gates: open gates change nothing, the served form equals the trained one, skipped work is not done."""

import pytest
import torch

from models.bn_calibration import calibrate_bn, calibrate_module_bn
from models.families import create_supernet
from models.gating import GatedResNet
from models.ops import FrozenStatsNorm

ARGS = {"depth": 14, "base_channels": 16, "in_channels": 1, "image_size": 28, "group_size": 4}


def setup(depths=(2, 2, 2)):
    torch.manual_seed(0)
    base = create_supernet("cifar_resnet", **ARGS)
    subnet = base.space.with_depths(base.space.largest(), depths)
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return base, subnet, images


def test_open_gates_leave_the_static_network_unchanged() -> None:
    base, subnet, images = setup()
    gated = GatedResNet(base, subnet)
    stats = calibrate_bn(base, subnet, images)
    with torch.no_grad():
        logits, gates = gated(images, FrozenStatsNorm(stats))
        torch.testing.assert_close(logits, base(images, subnet, FrozenStatsNorm(stats)))
    assert all(bool((g == 1).all()) for g in (*gates.layer, *gates.channel))
    assert float(gated.sparsity(gates)) == pytest.approx(1.0)


def randomize_gates(gated: GatedResNet, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in (*gated.layer_gate_list, *gated.channel_gate_list):
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator) * 2)
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("depths", [(2, 2, 2), (1, 2, 1)])
@pytest.mark.parametrize("batch", [1, 8])
def test_the_served_form_equals_the_trained_form(depths, batch: int) -> None:
    base, subnet, images = setup(depths)
    gated = GatedResNet(base, subnet)
    randomize_gates(gated)
    stats = calibrate_module_bn(gated, images)
    served = gated.materialize(stats)
    x = images[:batch]
    with torch.no_grad():
        expected, expected_gates = gated(x, FrozenStatsNorm(stats))
        logits, gates = served.run(x)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    for mine, theirs in zip(
        (*gates.layer, *gates.channel), (*expected_gates.layer, *expected_gates.channel), strict=True
    ):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    some_closed = any(bool((g == 0).any()) for g in (*gates.layer, *gates.channel))
    assert some_closed  # the random gates do skip work, so the comparison covers skipping


def test_a_closed_block_is_not_run_and_costs_nothing_in_the_penalty() -> None:
    base, subnet, images = setup()
    gated = GatedResNet(base, subnet)
    with torch.no_grad():
        gated.layer_gate_list[2].bias.fill_(-1.0)  # block 2: always skipped
        gated.channel_gate_list[3].bias[:2] = -1.0  # block 3: its first two channel groups skipped
    stats = calibrate_module_bn(gated, images)
    served = gated.materialize(stats)
    with torch.no_grad():
        _, gates = served.run(images[:1])
    assert [block.branch_runs for block in served.block_list] == [1, 1, 0, 1, 1, 1]
    flops = gated.branch_flops
    expected = (sum(flops) - flops[2] - flops[3] * 2 / gates.channel[3].shape[1]) / sum(flops)
    with torch.no_grad():
        _, training_gates = gated(images)
    assert float(gated.sparsity(training_gates)) == pytest.approx(expected)
