"""LC-Net gates: open gates change nothing, the served form equals the trained one, skipped work is not done."""

import pytest
import torch

from slimserve.models.bn_calibration import calibrate_bn, calibrate_module_bn
from slimserve.models.families import create_supernet
from slimserve.models.gating import GatedResNet, _runs, applied
from slimserve.models.ops import FrozenStatsNorm

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
@pytest.mark.parametrize(
    ("batch", "batching", "kernels"),
    [(1, "union", "gather"), (1, "union", "slices"), (8, "union", "gather"), (8, "pattern", "slices")],
)
def test_the_served_form_equals_the_trained_form(depths, batch: int, batching, kernels) -> None:
    base, subnet, images = setup(depths)
    gated = GatedResNet(base, subnet)
    randomize_gates(gated)
    stats = calibrate_module_bn(gated, images)
    served = gated.materialize(stats).at_threshold(0.0, batching, kernels)
    x = images[:batch]
    with torch.no_grad():
        expected, expected_gates = gated(x, FrozenStatsNorm(stats))
        logits, gates = served.run(x)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    for index, (layer, channel) in enumerate(zip(expected_gates.layer, expected_gates.channel, strict=True)):
        expected_layer, expected_channel = applied(layer, channel, 0.0)
        torch.testing.assert_close(gates.layer[index], expected_layer, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gates.channel[index], expected_channel, atol=1e-4, rtol=1e-4)
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


def test_a_threshold_skips_low_gates_and_each_image_gets_its_batch_one_answer() -> None:
    base, subnet, images = setup()
    gated = GatedResNet(base, subnet)
    randomize_gates(gated, seed=3)
    stats = calibrate_module_bn(gated, images)
    served = gated.materialize(stats)
    kept = []
    with torch.no_grad():
        _, raw = gated(images, FrozenStatsNorm(stats))
        for threshold in (0.0, 0.3, 0.6):
            at = served.at_threshold(threshold)
            logits, gates = at.run(images)
            # the first block reads the same input in both forms (later ones see what earlier skips changed)
            _, expected = applied(raw.layer[0], raw.channel[0], threshold)
            assert torch.equal(gates.channel[0] > 0, expected > 0)
            kept.append(sum(int((channel > 0).sum()) for channel in gates.channel))
            alone = torch.cat([at(images[i : i + 1]) for i in range(4)])
            torch.testing.assert_close(logits[:4], alone, atol=1e-4, rtol=1e-4)
            by_pattern = at.at_threshold(threshold, "pattern")(images)
            torch.testing.assert_close(logits, by_pattern, atol=1e-4, rtol=1e-4)
    assert kept[0] > kept[1] > kept[2]  # a higher threshold skips more
    assert served.threshold == 0.0  # at_threshold made other views; the original is unchanged


def test_applied_gates_follow_the_rule_on_plain_numbers() -> None:
    layer = torch.tensor([0.0, 0.5, 0.5, 0.05])
    channel = torch.tensor([[1.0, 1.0], [0.0, 0.7], [0.0, 0.05], [1.0, 1.0]])
    applied_layer, applied_channel = applied(layer, channel, 0.1)
    assert applied_layer.tolist() == [0.0, 0.5, 0.0, 0.0]  # image 3: its groups all at or below 0.1
    torch.testing.assert_close(applied_channel, torch.tensor([[0.0, 0.0], [0.0, 0.7], [0.0, 0.0], [0.0, 0.0]]))


def test_branch_flops_run_counts_each_images_kept_groups() -> None:
    base, subnet, images = setup()
    gated = GatedResNet(base, subnet)
    with torch.no_grad():
        gated.layer_gate_list[0].bias.fill_(-1.0)
        gated.channel_gate_list[1].bias[:1] = -1.0
    served = gated.materialize(calibrate_module_bn(gated, images))
    with torch.no_grad():
        _, gates = served.run(images[:2])
    flops = gated.branch_flops
    groups = gates.channel[1].shape[1]
    expected = sum(flops) - flops[0] - flops[1] / groups
    assert served.branch_flops_run(gates).tolist() == pytest.approx([expected, expected])


def test_kept_groups_become_runs_of_consecutive_groups() -> None:
    assert _runs([0, 1, 2, 5, 7, 8]) == [(0, 2), (5, 5), (7, 8)]
    assert _runs([3]) == [(3, 3)]
