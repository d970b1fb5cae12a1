"""Every registered family: forward at any width, exact materialization, consistent channel axes."""

import itertools
import random
import threading

import pytest
import torch

from slimserve.models.bn_calibration import calibrate_bn
from slimserve.models.families import create_supernet, list_families
from slimserve.models.flops import count_flops, count_params
from slimserve.models.ops import FrozenStatsNorm
from slimserve.models.registry import register_family
from slimserve.models.subnet import InvalidSubnetError

# Small instances of each family so the suite stays fast; the structure is what is under test.
SMALL_ARGS = {
    "cifar_resnet": {"depth": 14, "base_channels": 16, "in_channels": 1, "image_size": 28},
    "imagenet_resnet18": {"image_size": 64, "num_classes": 20},
}
SUBNETS_PER_FAMILY = {"cifar_resnet": 25, "imagenet_resnet18": 6}


@pytest.fixture(scope="module", params=list_families())
def family(request: pytest.FixtureRequest) -> str:
    assert request.param in SMALL_ARGS, f"add small test arguments for new family {request.param!r}"
    return str(request.param)


def build(family: str):
    torch.manual_seed(0)
    return create_supernet(family, **SMALL_ARGS[family])


def inputs(net, n: int = 16) -> torch.Tensor:
    return torch.randn(n, *net.input_shape, generator=torch.Generator().manual_seed(1))


def test_forward_runs_at_largest_smallest_and_random_subnets(family: str) -> None:
    net = build(family)
    x = inputs(net, 4)
    rng = random.Random(0)
    for subnet in (
        net.space.largest(),
        net.space.smallest(),
        net.space.random(rng),
        net.space.validate([8] * len(net.space.units)),
    ):
        assert net(x, subnet).shape == (4, net.num_classes)


def test_invalid_subnet_is_refused_with_the_unit_named(family: str) -> None:
    net = build(family)
    bad = list(net.space.largest())
    bad[1] += 8
    with pytest.raises(InvalidSubnetError, match=net.space.units[1].name):
        net(inputs(net, 2), tuple(bad))


def test_materialized_subnet_equals_dynamic_forward(family: str) -> None:
    net = build(family).eval()
    x = inputs(net, 32)
    rng = random.Random(1)
    subnets = [net.space.largest(), net.space.smallest()] + [
        net.space.random(rng) for _ in range(SUBNETS_PER_FAMILY[family] - 2)
    ]
    worst = 0.0
    for subnet in subnets:
        stats = calibrate_bn(net, subnet, x)
        with torch.no_grad():
            dynamic = net(x[:8], subnet, FrozenStatsNorm(stats))
        static = net.materialize(subnet, stats)
        with torch.inference_mode():
            worst = max(worst, (static(x[:8]) - dynamic).abs().max().item())
        assert all(p.is_contiguous() and not p.requires_grad for p in static.parameters())
    assert worst <= 1e-4


def test_materialized_equals_dynamic_over_depth_x_width(family: str) -> None:
    net = build(family).eval()
    space = net.space
    x = inputs(net, 16)
    for width in (space.units[0].min_channels / space.units[0].max_channels, 0.5, 1.0):
        for depths in itertools.product(*(range(g.min_blocks, len(g.units) + 1) for g in space.depth_groups)):
            subnet = space.with_depths(space.uniform(width), depths)
            stats = calibrate_bn(net, subnet, x)
            static = net.materialize(subnet, stats)
            with torch.no_grad():
                dynamic = net(x[:4], subnet, FrozenStatsNorm(stats))
                assert (static(x[:4]) - dynamic).abs().max().item() <= 1e-4, (width, depths)
            # a dropped block leaves no module, no weights and no statistics behind
            assert len(static.blocks) == sum(depths)
            assert sum(1 for key in stats if key.endswith(".bn1")) == sum(depths)


def test_dropping_blocks_makes_the_static_module_cheaper(family: str) -> None:
    net = build(family)
    space, x = net.space, inputs(net, 4)
    full, shallow = space.largest(), space.with_depths(space.largest(), [g.min_blocks for g in space.depth_groups])
    flops = [count_flops(net.materialize(s, calibrate_bn(net, s, x)), net.input_shape) for s in (full, shallow)]
    assert flops[1] < flops[0]


def test_materialized_subnet_is_inference_only(family: str) -> None:
    net = build(family)
    subnet = net.space.smallest()
    static = net.materialize(subnet, calibrate_bn(net, subnet, inputs(net, 4)))
    assert not static.training
    with pytest.raises(RuntimeError, match="inference-only"):
        static.train()


def test_materialize_refuses_statistics_of_another_subnet(family: str) -> None:
    net = build(family)
    stats = calibrate_bn(net, net.space.smallest(), inputs(net, 4))
    with pytest.raises(ValueError, match="channels"):
        net.materialize(net.space.largest(), stats)


def test_channel_axes_cover_every_channel_dimension_exactly_once(family: str) -> None:
    net = build(family)
    params = dict(net.named_parameters())
    covered: dict[tuple[str, int], int] = {}
    for unit_index, unit in enumerate(net.space.units):
        for axis in net.channel_axes(unit_index):
            assert params[axis.parameter].shape[axis.axis] == unit.max_channels, axis
            covered[(axis.parameter, axis.axis)] = covered.get((axis.parameter, axis.axis), 0) + 1
    expected = {(name, 0) for name, p in params.items() if name != "fc.weight" and name != "fc.bias"}
    expected |= {(name, 1) for name, p in params.items() if p.dim() == 4 and p.shape[1] != net.input_shape[0]}
    expected.add(("fc.weight", 1))
    assert set(covered) == expected
    assert set(covered.values()) == {1}


def test_concurrent_forwards_at_different_widths_do_not_interfere(family: str) -> None:
    net = build(family).eval()
    x = inputs(net, 2)
    rng = random.Random(2)
    subnets = [net.space.largest(), net.space.smallest(), net.space.random(rng), net.space.random(rng)]
    stats = {s: calibrate_bn(net, s, inputs(net, 8)) for s in subnets}
    with torch.no_grad():
        expected = {s: net(x, s, FrozenStatsNorm(stats[s])) for s in subnets}
    failures: list[str] = []

    def worker(subnet: tuple[int, ...]) -> None:
        with torch.no_grad():
            for _ in range(5):
                if not torch.equal(net(x, subnet, FrozenStatsNorm(stats[subnet])), expected[subnet]):
                    failures.append(str(subnet))

    threads = [threading.Thread(target=worker, args=(s,)) for s in subnets for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_flops_and_params_grow_with_every_unit(family: str) -> None:
    net = build(family)
    rng = random.Random(3)
    x = inputs(net, 4)

    def measure(subnet):
        static = net.materialize(subnet, calibrate_bn(net, subnet, x))
        return count_flops(static, net.input_shape), count_params(static)

    for _ in range(4):
        small = net.space.random(rng)
        big = tuple(max(a, b) for a, b in zip(small, net.space.random(rng), strict=True))
        if big == small:
            continue
        (flops_small, params_small), (flops_big, params_big) = measure(small), measure(big)
        assert flops_big > flops_small and params_big > params_small
    full_flops, _ = measure(net.space.largest())
    half_flops, _ = measure(net.space.uniform(0.5))
    assert 0.2 < half_flops / full_flops < 0.35  # conv FLOPs scale with in x out channels


def test_flop_counter_matches_the_textbook_formula_for_the_stem() -> None:
    net = create_supernet("cifar_resnet", depth=8, base_channels=16, in_channels=1, image_size=28)
    subnet = net.space.largest()
    static = net.materialize(subnet, calibrate_bn(net, subnet, torch.randn(4, 1, 28, 28)))
    stem_only = torch.nn.Sequential(static.stem)
    assert count_flops(stem_only, (1, 28, 28)) == 2 * 16 * 1 * 9 * 28 * 28


def test_registry_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown supernet family 'nope'"):
        create_supernet("nope")
    with pytest.raises(ValueError, match="bad arguments"):
        create_supernet("cifar_resnet", colour="red")
    with pytest.raises(ValueError, match="6n \\+ 2"):
        create_supernet("cifar_resnet", depth=21)
    with pytest.raises(ValueError, match="registered twice"):
        register_family("cifar_resnet")(lambda: None)
